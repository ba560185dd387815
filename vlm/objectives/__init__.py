"""Training objectives (``stage.<name>.objective``): ``objective(model, batch) -> loss (+ metrics)``.

``lm`` (next-token prediction, the default; ``stage.<name>.loss_weighting`` applies), ``siglip`` (contrastive
alignment of the vision tower) and ``siglip_tokens`` (the same, token by token) and ``readout`` (the tower answers the questions directly, byte by
byte) are registered in ``OBJECTIVES``; see ``vlm.objectives.base`` for the interface, the
step normalization and the capabilities an objective states. The stage builds one with ``build(cfg, **context)``
and trains ``TrainModule(model, objective)``.
"""
from typing import Any

from vlm.objectives.base import Objective, ObjectiveOutput, TrainModule
from vlm.registry import Registry

OBJECTIVES: Registry[Objective] = Registry("objective")
LM = "lm"

from vlm.objectives import lm, readout, siglip, siglip_tokens  # noqa: E402,F401  (registration)


def build(cfg: Any, **context: Any) -> Objective:
    """Build objective ``cfg`` (``name`` + options); of ``context`` (what the stage knows: ``model``,
    ``loss_weighting``), each passes only the arguments in its ``stage_args``."""
    name = cfg["name"] if isinstance(cfg, dict) else cfg.name
    wanted = OBJECTIVES.get(name).stage_args
    return OBJECTIVES.build(cfg, **{k: v for k, v in context.items() if k in wanted})


__all__ = ["LM", "OBJECTIVES", "Objective", "ObjectiveOutput", "TrainModule", "build"]
