"""The stage's part for objectives on preference pairs (``dpo``): held-out pairs scored in every evaluation and the
``precomputed`` reference's table, computed before training. ``stage`` is the running ``vlm.train.stage.Stage``."""
from __future__ import annotations

import time
from typing import Any

import torch

from vlm.data.datasets import build_dataset
from vlm.objectives import TrainModule
from vlm.train.errors import ConfigError
from vlm.train.rng import derive_seed, isolated


def preference_setup(stage: Any, module: TrainModule, dataset: Any, collator: Any, processor: Any,
                     precision: torch.dtype) -> Any:
    """For an objective on preference pairs (``dpo``): its held-out pairs (``objective.eval_data``, a key of
    ``data``; ``None`` without) and, with a ``precomputed`` reference, the reference log-probs of every training
    and held-out pair under the starting model, stored with the data (before any checkpoint is loaded: a resumed
    run computes the same table)."""
    objective = module.objective
    key = getattr(objective, "eval_data", None)
    held_out = build_dataset(stage.cfg.data[key], processor) if key else None
    if getattr(objective, "precomputes", False):
        if stage.strategy.shards_parameters:  # the pass calls the model's parts, not the sharded root
            raise ConfigError(f"stage.{stage.name}.objective.reference=precomputed is not supported with "
                              f"trainer.strategy={stage.trainer.strategy}; expected reference=copy (or adapters "
                              f"with a LoRA policy), or trainer.strategy=ddp")
        t0 = time.perf_counter()
        with isolated(derive_seed("reference", stage.cfg.seed, stage.name), stage.strategy.device):
            for data in (dataset, held_out):
                if data is not None:
                    data.ref_logps = objective.reference_table(module.model, data, collator,
                                                               stage.strategy.device, precision)
        stage.log.info(f"[{stage.name}] reference log-probs of {len(dataset)} training"
                      + (f" and {len(held_out)} held-out" if held_out is not None else "")
                      + f" pairs computed before training ({time.perf_counter() - t0:.1f}s)")
    return held_out


def evaluate_pairs(stage: Any, t: Any) -> dict[str, float]:
    """The objective's held-out preference metrics (``pairs/preference_accuracy``, ...) over every held-out
    pair; each process scores the same pairs (they are few), so every process returns the same numbers."""
    from vlm.train.loop import to_device

    data, size = t.held_out_pairs, stage.cfg.eval.batch_size
    batches = (to_device({k: v for k, v in t.collator([data[i] for i in range(s, min(s + size, len(data)))])
                          .items() if k != "meta"}, stage.strategy.device) for s in range(0, len(data), size))
    return t.module.objective.evaluate_pairs(t.wrapped, batches, t.precision)
