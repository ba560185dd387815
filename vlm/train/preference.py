"""The stage's part for objectives on preference pairs (``dpo``): held-out pairs scored in every evaluation and the
``precomputed`` reference's table, computed before training. ``stage`` is the running ``vlm.train.stage.Stage``."""
from __future__ import annotations

import time
from typing import Any

import torch

from vlm.data.dataset_registry import DATASETS
from vlm.data.datasets import build_dataset
from vlm.objectives import TrainModule
from vlm.registry import to_dict
from vlm.train.errors import ConfigError
from vlm.train.rng import derive_seed, isolated


def held_out_spec(cfg: Any, stage_name: str, eval_data: str | None) -> dict[str, Any] | None:
    """The data spec of the stage's held-out pairs: ``eval_data`` is ``None`` (none), a key of ``cfg.data``, or
    ``auto``: the training pairs' own held-out part, given by their data set's ``held_out(spec)`` (a user's file,
    ``preference``: its ``eval`` file or ``heldout`` pairs left out of training; ``shapes_preference``: its ``val``
    split; ``None`` for a data set without one). Raises ``ConfigError`` for a key that is not in ``cfg.data``."""
    if eval_data is None:
        return None
    if eval_data != "auto":
        if eval_data not in cfg.data or cfg.data[eval_data] is None:
            raise ConfigError(f"stage.{stage_name}.objective.eval_data={eval_data!r} is not a key of data; expected "
                              f"one of {[k for k in cfg.data if cfg.data[k] is not None]}, auto or null")
        return to_dict(cfg.data[eval_data])
    key = cfg.stage[stage_name].data
    train = to_dict(cfg.data[key])
    held_out = getattr(DATASETS.get(train["name"]), "held_out", None)
    return held_out(train) if held_out is not None else None


def preference_setup(stage: Any, module: TrainModule, dataset: Any, collator: Any, processor: Any,
                     precision: torch.dtype) -> Any:
    """For an objective on preference pairs (``dpo``): its held-out pairs (``objective.eval_data``:
    ``held_out_spec``; ``None`` without) and, with a ``precomputed`` reference, the reference log-probs of every training
    and held-out pair under the starting model, stored with the data (before any checkpoint is loaded: a resumed
    run computes the same table)."""
    objective = module.objective
    spec = held_out_spec(stage.cfg, stage.name, getattr(objective, "eval_data", None))
    held_out = build_dataset(spec, processor) if spec is not None else None
    if spec is None and getattr(objective, "eval_data", None) is not None:
        stage.log.info(f"[{stage.name}] objective.eval_data=auto: data.{stage.stage.data} has no held-out part; no "
                       f"held-out pairs are scored")
    if held_out is not None and (selection := getattr(getattr(held_out, "samples", None), "selection", None)):
        stage.log.info(f"[{stage.name}] held-out pairs: {selection}")
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

    def batches() -> Any:
        for s in range(0, len(data), size):
            items = [data[i] for i in range(s, min(s + size, len(data)))]
            batch = t.collator(items)
            kinds = [it["meta"].get("kind") for it in items if it is not None]
            yield to_device({k: v for k, v in batch.items() if k != "meta"}, stage.strategy.device), kinds

    return t.module.objective.evaluate_pairs(t.wrapped, batches(), t.precision)
