"""Training objectives other than next-token prediction (``stage.<name>.objective``).

An objective is an ``nn.Module`` built per stage by ``OBJECTIVES.build(cfg, model=vlm)``. It may own parameters a
stage needs only for that objective (e.g. a text tower): the stage attaches it as ``model.objective_head`` for the
stage's lifetime (so optimizer, checkpoints and DDP see it) and never exports it. ``VLM.forward(..., objective=True)``
returns ``objective_head(model, **batch)``: an output with ``.loss``.

``lm`` (next-token prediction) is the default and needs no head: it is the model's own forward.
"""
from typing import Any

from torch import nn

from vlm.registry import Registry

OBJECTIVES: Registry[nn.Module] = Registry("objective")
LM = "lm"

from vlm.objectives import siglip  # noqa: E402,F401  (registration)


def build(cfg: Any, **extra: Any) -> nn.Module:
    return OBJECTIVES.build(cfg, **extra)


__all__ = ["LM", "OBJECTIVES", "build"]
