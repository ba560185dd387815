"""``lm``: next-token prediction on the labelled tokens, weighted by ``stage.<name>.loss_weighting`` (``vlm.loss``).

``token`` weighting (every target token weighs the same) is the model's own loss (``VLM.forward(labels=...)``, the
same as transformers' LLaVA) with ``num_items_in_batch`` = the step's target count, so the step's loss is the mean
over all its target tokens. ``sample``/``square`` compute ``vlm.loss.lm_loss`` from the logits and scale the
micro-batch's weighted mean by its share of the step's total weight. Packed rows (``segment_ids``): a segment's first
token is never a target of the previous segment, and a "sample" is a segment.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlm.loss import Weighting, batch_weight, lm_loss, mask_segment_starts, weighting_of
from vlm.objectives import OBJECTIVES
from vlm.objectives.base import Objective, ObjectiveOutput


@OBJECTIVES.register("lm")
class LMObjective(Objective):
    """Next-token loss. ``loss_weighting``: a name from ``vlm.loss.WEIGHTINGS`` (filled in from the stage)."""

    stage_args = ("model", "loss_weighting")

    def __init__(self, model: nn.Module | None = None, loss_weighting: str | Weighting = "token") -> None:
        super().__init__()
        self.weighting = weighting_of(loss_weighting)

    def weight(self, batch: dict[str, Any]) -> float:
        """The batch's total target weight (``vlm.loss.batch_weight``): its target tokens under ``token``."""
        return batch_weight(batch["labels"], self.weighting, batch.get("segment_ids"))

    def forward(self, model: nn.Module, batch: dict[str, Any], weight: float | None = None,
                total: float | None = None) -> ObjectiveOutput:
        """``batch``: the collator's tensors (``input_ids``/``labels (B, L)``, ``pixel_values``, ...)."""
        if batch.get("labels") is None:
            raise ValueError("objective 'lm' needs labels (the collator's targets, -100 elsewhere)")
        if self.weighting.per_token:
            extra = {} if total is None else {"num_items_in_batch": max(int(total), 1)}
            out = model(**batch, **extra)
            return ObjectiveOutput(loss=out.loss, logits=out.logits)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        out = model(**inputs)
        segment_ids = batch.get("segment_ids")
        loss: torch.Tensor = lm_loss(out.logits, mask_segment_starts(batch["labels"], segment_ids), self.weighting,
                                     segment_ids)
        if total is not None:
            loss = loss * ((self.weight(batch) if weight is None else weight) / max(total, 1e-12))
        return ObjectiveOutput(loss=loss, logits=out.logits)
