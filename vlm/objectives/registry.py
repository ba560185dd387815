"""The objective registry and ``build``: kept apart from ``vlm.objectives`` so that each objective module registers
itself without importing the package that imports it."""
from typing import Any

from vlm.objectives.base import Objective
from vlm.registry import Registry

OBJECTIVES: Registry[Objective] = Registry("objective")
LM = "lm"


def build(cfg: Any, **context: Any) -> Objective:
    """Build objective ``cfg`` (``name`` + options); of ``context`` (what the stage knows: ``model``,
    ``loss_weighting``), each passes only the arguments in its ``stage_args``.

    Raises:
        KeyError: unknown objective name (lists the known ones).
        TypeError: an option the objective does not take.
    """
    name = cfg["name"] if isinstance(cfg, dict) else cfg.name
    wanted = OBJECTIVES.get(name).stage_args
    return OBJECTIVES.build(cfg, **{k: v for k, v in context.items() if k in wanted})
