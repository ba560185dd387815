"""``lm``: next-token prediction on the labelled tokens, weighted by ``stage.<name>.loss_weighting`` (``vlm.loss``).

``token`` weighting (every target token weighs the same) is the model's own loss (``VLM.forward(labels=...)``, the
same as transformers' LLaVA) with ``num_items_in_batch`` = the step's target count, so the step's loss is the mean
over all its target tokens. ``sample``/``square`` compute ``vlm.loss.lm_loss`` from the logits and scale the
micro-batch's weighted mean by its share of the step's total weight. Packed rows (``segment_ids``): a segment's first
token is never a target of the previous segment, and a "sample" is a segment.

``label_only_head`` (default on, when the model ``supports_label_only_head``): the model returns its last hidden
states and ``vlm.loss.label_only_lm_loss`` projects only the positions that have a target onto the vocabulary,
``head_chunk_size`` at a time; same loss and gradients as the full logits (up to float summation order), without
the ``(B, L, V)`` logits. ``ObjectiveOutput.logits`` is then ``None``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlm.loss import Weighting, batch_weight, label_only_lm_loss, lm_loss, mask_segment_starts, weighting_of
from vlm.objectives.base import Objective, ObjectiveOutput
from vlm.objectives.registry import OBJECTIVES


@OBJECTIVES.register("lm")
class LMObjective(Objective):
    """Next-token loss. ``loss_weighting``: a name from ``vlm.loss.WEIGHTINGS`` (filled in from the stage);
    ``label_only_head``: project only labelled positions onto the vocabulary, ``head_chunk_size`` (tokens) at a
    time."""

    stage_args = ("model", "loss_weighting")

    def __init__(self, model: nn.Module | None = None, loss_weighting: str | Weighting = "token",
                 label_only_head: bool = True, head_chunk_size: int = 4096) -> None:
        super().__init__()
        if int(head_chunk_size) < 1:
            raise ValueError(f"objective 'lm': head_chunk_size must be >= 1 (tokens per chunk); got {head_chunk_size}")
        self.weighting = weighting_of(loss_weighting)
        self.label_only_head, self.head_chunk_size = bool(label_only_head), int(head_chunk_size)

    def weight(self, batch: dict[str, Any]) -> float:
        """The batch's total target weight (``vlm.loss.batch_weight``): its target tokens under ``token``."""
        return batch_weight(batch["labels"], self.weighting, batch.get("segment_ids"))

    def forward(self, model: nn.Module, batch: dict[str, Any], weight: float | None = None,
                total: float | None = None) -> ObjectiveOutput:
        """``batch``: the collator's tensors (``input_ids``/``labels (B, L)``, ``pixel_values``, ...). Training
        forwards build no KV cache (``use_cache=False``)."""
        if batch.get("labels") is None:
            raise ValueError("objective 'lm' needs labels (the collator's targets, -100 elsewhere)")
        if self.label_only_head and getattr(model, "supports_label_only_head", False):
            return self.label_only(model, batch, weight, total)
        if self.weighting.per_token:
            extra = {} if total is None else {"num_items_in_batch": max(int(total), 1)}
            out = model(**batch, **extra, use_cache=False)
            return ObjectiveOutput(loss=out.loss, logits=out.logits)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        out = model(**inputs, use_cache=False)
        segment_ids = batch.get("segment_ids")
        loss: torch.Tensor = lm_loss(out.logits, mask_segment_starts(batch["labels"], segment_ids), self.weighting,
                                     segment_ids)
        if total is not None:
            loss = loss * ((self.weight(batch) if weight is None else weight) / max(total, 1e-12))
        return ObjectiveOutput(loss=loss, logits=out.logits)

    def label_only(self, model: nn.Module, batch: dict[str, Any], weight: float | None,
                   total: float | None) -> ObjectiveOutput:
        """The loss from the model's hidden states, the vocabulary projection only where labels are."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        segment_ids = batch.get("segment_ids")
        n_items = None if total is None or not self.weighting.per_token else max(int(total), 1)
        hidden = model.hidden_states(**inputs, use_cache=False)
        loss = label_only_lm_loss(hidden, model.output_head, batch["labels"], self.weighting,
                                  segment_ids, num_items_in_batch=n_items, chunk_size=self.head_chunk_size)
        if total is not None and not self.weighting.per_token:
            loss = loss * ((self.weight(batch) if weight is None else weight) / max(total, 1e-12))
        return ObjectiveOutput(loss=loss)
