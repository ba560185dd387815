"""Generation-based evaluation: greedy ``model.generate`` on an evaluation set, scored by the dataset.

A dataset with an ``evaluate(predictions, samples) -> {metric: value}`` method (``shapes``: VQA exact match per
subtype, grounding Acc@IoU0.5 and mean IoU, caption F1, ``all``) scores itself; other datasets get exact match against
the final assistant reply. Processes split the samples and gather the predictions; under FSDP every rank generates
the same number of tokens (no early stop) so the sharded forward passes stay in lockstep.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from vlm.generation import stop_ids
from vlm.train.distributed import Strategy


def exact_match(predictions: Sequence[str], samples: Sequence[Any]) -> dict[str, float]:
    def norm(t: str) -> str:
        return " ".join(str(t).lower().strip().rstrip(".").split())

    hits = [norm(p) == norm(s.messages[-1].text()) for p, s in zip(predictions, samples)]
    return {"exact_match": sum(hits) / max(1, len(hits)), "exact_match/n": len(hits)}


def decode(tokenizer: Any, rows: torch.Tensor, stops: Sequence[int]) -> list[str]:
    """New tokens -> text, cut at the first stop/pad token (special tokens before it are kept: box tags may be)."""
    out = []
    cut = set(stops) | ({tokenizer.pad_token_id} if tokenizer.pad_token_id is not None else set())
    for row in rows.tolist():
        n = next((i for i, t in enumerate(row) if t in cut), len(row))
        out.append(tokenizer.decode(row[:n], skip_special_tokens=False).strip())
    return out


@torch.no_grad()
def generate_predictions(model: nn.Module, processor: Any, collator: Any, samples: Sequence[Any], batch_size: int,
                         max_new_tokens: int, device: torch.device, precision: torch.dtype,
                         lockstep: bool = False) -> list[str]:
    tokenizer = processor.tokenizer
    stops = stop_ids(tokenizer, processor.template)
    preds: list[str] = []
    for i in range(0, len(samples), batch_size):
        items = [processor(s, add_generation_prompt=True) for s in samples[i:i + batch_size]]
        batch = collator(items)
        batch.pop("meta", None)
        kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": tokenizer.pad_token_id,
                  "eos_token_id": None if lockstep else stops}
        if lockstep:
            kwargs["min_new_tokens"] = max_new_tokens
        with torch.autocast(device.type, dtype=precision, enabled=precision != torch.float32):
            new = model.generate(batch["input_ids"].to(device),
                                 pixel_values=batch["pixel_values"].to(device) if "pixel_values" in batch else None,
                                 attention_mask=batch["attention_mask"].to(device), **kwargs)
        preds += decode(tokenizer, new, stops)
    return preds


def evaluate(wrapped: nn.Module, strategy: Strategy, processor: Any, samples: Any, *, batch_size: int,
             max_new_tokens: int, precision: torch.dtype, limit: int | None = None,
             lockstep: bool = False) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Metrics (on every rank) and, on rank 0, one record per sample (id, task, prediction, target)."""
    from vlm.data.collate import PadCollator

    n = len(samples) if limit is None else min(limit, len(samples))
    mine = list(range(strategy.rank, n, strategy.world_size))
    per_rank = -(-n // strategy.world_size)
    mine += mine[-1:] * (per_rank - len(mine)) if mine else [0] * per_rank  # equal work on every rank
    collator = PadCollator(processor.tokenizer.pad_token_id, padding_side="left")
    t0 = time.perf_counter()
    was_training = wrapped.training
    wrapped.eval()
    with strategy.inference(wrapped) as model:
        preds = generate_predictions(model, processor, collator, [samples[i] for i in mine], batch_size,
                                     max_new_tokens, strategy.device, precision, lockstep)
    wrapped.train(was_training)
    gathered = strategy.all_gather_object(list(zip(mine, preds)))
    by_index: dict[int, str] = {}
    for part in gathered:
        for i, p in part:
            by_index.setdefault(i, p)
    order = sorted(by_index)[:n]
    subset = [samples[i] for i in order]
    predictions = [by_index[i] for i in order]
    scorer = getattr(samples, "evaluate", None)
    metrics = dict(scorer(predictions, subset) if scorer else exact_match(predictions, subset))
    metrics["eval_seconds"] = time.perf_counter() - t0
    records = [{"id": s.id, "task": s.meta.get("task"), "prediction": p,
                "target": s.messages[-1].text() if s.messages else None} for s, p in zip(subset, predictions)]
    return metrics, records


def format_table(metrics: dict[str, float]) -> str:
    """A markdown table: one row per task/metric with its sample count."""
    rows = [k for k in metrics if not k.endswith("/n") and k != "eval_seconds"]
    order = {"all": 2, "vqa": 1, "multi_image": 1}
    rows.sort(key=lambda k: (order.get(k, 0), k))
    label = {"grounding": "grounding (Acc@IoU0.5)", "grounding/iou": "grounding (mean IoU)",
             "caption": "caption (colour-shape F1)", "all": "overall (mean over samples)"}
    lines = ["| task | score | n |", "| --- | ---: | ---: |"]
    for k in rows:
        n = metrics.get(f"{k}/n", metrics.get(f"{k.split('/')[0]}/n", ""))
        n = int(n) if isinstance(n, float) and n.is_integer() else n
        lines.append(f"| {label.get(k, k)} | {metrics[k]:.3f} | {n} |")
    return "\n".join(lines)

