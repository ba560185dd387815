"""Reference models of preference objectives (``stage.<name>.objective.reference``), one class per way:

- ``copy``: a frozen copy of the policy as the stage starts (eval mode, never trained, never checkpointed: it is
  rebuilt from the same starting weights on resume). Memory: a second set of weights (no gradients, no optimizer
  state), one more forward per pair.
- ``adapters``: the policy itself with its LoRA adapters switched off (eval mode, no gradient), as TRL does for a
  new PEFT adapter; needs ``policy: lora`` on the trained parts. Memory: nothing more than the policy; one more
  forward per pair.
- ``precomputed``: the log-probs of every training (and held-out) pair under the starting model, computed in one pass
  before the first step and stored with the data (the items carry ``ref_logps``). Memory: two floats per pair;
  no reference forward while training.

Each is a plain object (not an ``nn.Module``: the reference is no parameter of the stage) with
``logps(model, batch, fn) -> AnswerLogps`` where ``fn(model, batch)`` computes the policy's log-probs.
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from vlm.objectives.pair_logps import AnswerLogps
from vlm.registry import Registry

REFERENCES: Registry[Any] = Registry("reference")
LogpsFn = Callable[[nn.Module, dict[str, Any]], AnswerLogps]


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode and without gradients inside (dropout off: the reference is deterministic)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


@REFERENCES.register("copy")
class CopyReference:
    """A frozen deep copy of the policy as built (its starting weights)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = copy.deepcopy(model)
        self.model.requires_grad_(False)
        self.model.eval()

    def logps(self, model: nn.Module, batch: dict[str, Any], fn: LogpsFn) -> AnswerLogps:
        device = batch["input_ids"].device
        if next(self.model.parameters()).device != device:
            self.model.to(device)
        with evaluating(self.model):
            return fn(self.model, batch)


def lora_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """The model's peft LoRA layers disabled inside (each layer's ``enable_adapters(False)``; the parameters'
    ``requires_grad`` flags, which peft changes, are restored)."""
    layers = lora_layers(model)
    flags = [(p, p.requires_grad) for m in layers for p in m.parameters()]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)
        for p, flag in flags:
            p.requires_grad_(flag)


@REFERENCES.register("adapters")
class AdaptersReference:
    """The policy with its LoRA adapters disabled."""

    def __init__(self, model: nn.Module) -> None:
        if not lora_layers(model):
            raise ValueError("objective 'dpo': reference=adapters needs LoRA adapters on the policy (policy.llm=lora "
                             "and/or policy.encoder=lora); without them use reference=copy or reference=precomputed")

    def logps(self, model: nn.Module, batch: dict[str, Any], fn: LogpsFn) -> AnswerLogps:
        with adapters_off(model), evaluating(model):
            return fn(model, batch)


@REFERENCES.register("precomputed")
class PrecomputedReference:
    """Log-probs stored with the data (``batch["ref_logps"] (B, 2)``: chosen, rejected), computed by ``table``
    before training."""

    precomputes = True

    def __init__(self, model: nn.Module) -> None:
        pass

    def logps(self, model: nn.Module, batch: dict[str, Any], fn: LogpsFn) -> AnswerLogps:
        ref = batch.get("ref_logps")
        if ref is None:
            raise ValueError("objective 'dpo' with reference=precomputed: the batch carries no ref_logps; the stage "
                             "computes them before training (a data set of preference pairs is needed)")
        n = (batch["labels"] != -100)
        part = batch["part"]
        return AnswerLogps(ref[:, 0].float(), ref[:, 1].float(), (n & (part == 2)).sum(1), (n & (part == 3)).sum(1))

    @staticmethod
    def table(model: nn.Module, dataset: Any, collator: Any, fn: LogpsFn, device: torch.device,
              precision: torch.dtype, batch_size: int = 8) -> dict[int, tuple[float, float]]:
        """``{record index: (chosen, rejected)}`` summed log-probs of every pair of ``dataset`` under ``model``."""
        out: dict[int, tuple[float, float]] = {}
        enabled = precision != torch.float32
        with evaluating(model):
            for s in range(0, len(dataset), batch_size):
                items = [dataset[i] for i in range(s, min(s + batch_size, len(dataset)))]
                batch = collator(items)
                meta = batch.pop("meta")
                with torch.autocast(device.type, dtype=precision, enabled=enabled):
                    lp = fn(model, {k: v.to(device) if isinstance(v, torch.Tensor) else v
                                   for k, v in batch.items()})
                for m, c, r in zip(meta["samples"], lp.chosen.tolist(), lp.rejected.tolist()):
                    out[m["index"]] = (c, r)
        return out
