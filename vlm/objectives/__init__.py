"""Training objectives (``stage.<name>.objective``): ``objective(model, batch) -> loss (+ metrics)``.

``lm`` (next-token prediction, the default; ``stage.<name>.loss_weighting`` applies), ``siglip`` (contrastive
alignment of the vision tower) and ``siglip_tokens`` (the same, token by token) and ``readout`` (the tower answers the questions directly, byte by
byte) and ``dpo`` (preference tuning on pairs: DPO / IPO / hinge, MPO's terms) are registered in ``OBJECTIVES``; see ``vlm.objectives.base`` for the interface, the
step normalization and the capabilities an objective states. The stage builds one with ``build(cfg, **context)``
and trains ``TrainModule(model, objective)``.
"""
from vlm.objectives import dpo, lm, readout, siglip, siglip_tokens  # noqa: F401  (registration)
from vlm.objectives.base import Objective, ObjectiveOutput, TrainModule
from vlm.objectives.registry import LM, OBJECTIVES, build

__all__ = ["LM", "OBJECTIVES", "Objective", "ObjectiveOutput", "TrainModule", "build"]
