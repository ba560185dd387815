"""The ``Objective`` interface: ``objective(model, batch) -> ObjectiveOutput(loss, metrics)``.

An objective is an ``nn.Module`` built per stage (``vlm.objectives.build``). It may own parameters the stage needs
only for it (siglip's text tower): they train, are checkpointed with the stage and are never exported, because the
stage trains ``TrainModule(model, objective)`` (what DDP/FSDP wrap) and exports only ``model``. The model knows
nothing about training losses.

Step normalization: the loop asks each micro-batch's ``weight(batch)`` (on the CPU batch, before the forward), sums
it over the optimizer step's micro-batches and processes into ``total``, and calls
``objective(model, batch, weight=w, total=total)``: the returned loss is then this micro-batch's *share* of the step
loss, so the summed gradient is that of the step's loss whatever the accumulation or process count. Without
``total`` the batch is the whole step.

Capabilities (class attributes, read by config checks): ``supports_packing`` (rows holding several samples,
``segment_ids``), ``shardable`` (its parameters may be FSDP-sharded with the model's), ``stage_args`` (the
constructor arguments the stage fills in rather than ``stage.<name>.objective``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class ObjectiveOutput:
    """``loss``: scalar tensor; ``metrics``: extra scalars for logging; ``logits``: what the loss was computed
    from (shape per objective)."""

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    logits: torch.Tensor | None = None


class Objective(nn.Module):
    """Base class: subclasses implement ``forward(model, batch, weight=None, total=None)`` and may override
    ``weight`` (default: every micro-batch weighs 1, i.e. the step loss is the mean of the micro-batch losses)."""

    supports_packing = True
    shardable = True
    stage_args: tuple[str, ...] = ("model",)
    #: samples must hold exactly this many images (``None``: any number, text-only included); the stage's dataset
    #: skips the others as counted, named skips (reason ``images_per_sample``)
    images_per_sample: int | None = None

    def weight(self, batch: dict[str, Any]) -> float:
        """This batch's share of the step's normalizer (``batch`` on the CPU, before the forward)."""
        return 1.0

    def image_text_batch(self, batch: dict[str, Any], text: str, model: Any = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(input_ids, labels, pixel_values)`` of a batch with labels (``text``: what they are, for the message)
        and exactly one image per sample, ``pixel_values (B, 3, H, W)``; ``ValueError`` naming the objective
        otherwise. A ``model`` with an arrangement (``vlm.arrangements``) gets each image's views (``image_sizes``
        in the batch): its first view, the whole image (``Arrangement.whole_view``), stands for it."""
        name = getattr(self, "registry_name", type(self).__name__)
        input_ids, pixel_values, labels = batch["input_ids"], batch.get("pixel_values"), batch.get("labels")
        if labels is None or pixel_values is None:
            raise ValueError(f"objective {name!r} needs labels ({text}) and pixel_values (the images)")
        arrangement = getattr(model, "arrangement", None)
        if arrangement is not None and batch.get("image_sizes") is not None:
            pixel_values = arrangement.whole_views(pixel_values, batch["image_sizes"])
        if pixel_values.ndim != 4 or pixel_values.shape[0] != input_ids.shape[0]:
            raise ValueError(f"objective {name!r} needs exactly one image per sample: got pixel_values of shape "
                             f"{tuple(pixel_values.shape)} for {input_ids.shape[0]} samples")
        return input_ids, labels, pixel_values

    def share(self, loss: torch.Tensor, weight: float | None, total: float | None) -> torch.Tensor:
        """A micro-batch mean ``loss`` as its share of the step: ``loss / (total / weight)`` (unchanged without
        ``total``)."""
        return loss if total is None else loss / (total / (1.0 if weight is None else weight))


class TrainModule(nn.Module):
    """What a stage trains and DDP/FSDP wrap: the model plus the stage's objective (parameters ``model.*`` and
    ``objective.*``). ``forward(batch, weight, total)`` is ``objective(model, batch, weight, total)``."""

    def __init__(self, model: nn.Module, objective: Objective) -> None:
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, batch: dict[str, Any], weight: float | None = None,
                total: float | None = None) -> ObjectiveOutput:
        return self.objective(self.model, batch, weight=weight, total=total)

    # Checkpoints read like the model's own state dict: ``model.`` is dropped and the objective's parameters are
    # stored under ``objective_head.`` (a name the model never uses), so they load into a bare model (strict=False).
    OBJECTIVE_PREFIX = "objective_head."

    def checkpoint_key(self, key: str) -> str:
        """A parameter/buffer name of this module -> its name in checkpoints."""
        if key.startswith("model."):
            return key[len("model."):]
        if key.startswith("objective."):
            return self.OBJECTIVE_PREFIX + key[len("objective."):]
        return key

    def module_key(self, key: str) -> str:
        """A checkpoint name -> the name of the parameter/buffer of this module (inverse of ``checkpoint_key``)."""
        if key.startswith(self.OBJECTIVE_PREFIX):
            return "objective." + key[len(self.OBJECTIVE_PREFIX):]
        return "model." + key

    def model_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The ``model.*`` entries of a state dict of this module, keyed like the model (the objective's dropped)."""
        return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
