"""``train_step``: forward + backward + AdamW step, ours vs transformers' class of a model family (``--family``:
LLaVA by default, ``qwen2_5_vl``; see ``vlm.bench.models.FAMILIES``) on identical weights and batches.

Variants, interleaved: ``transformers`` (``LlavaForConditionalGeneration(..., labels=...)``: logits and loss over
every position), ``ours`` (the ``lm`` objective: label-only LM head), ``ours_selective`` (the same plus
``trainer.gradient_checkpointing=selective``: matmul and attention outputs kept, elementwise ops recomputed, see
``vlm.recompute``; a copy of the model with the same weights) and ``ours_full_logits`` (the ``lm`` objective with
``label_only_head=False``: what vlm computed before the label-only head). Reports the median step time, the
peak memory growth of a step (``vlm.bench.common.peak_memory``) and both as ratios to transformers, plus the
difference of the first losses (same weights, same batch: ~0).
"""
from __future__ import annotations

import argparse
from typing import Any, Callable

import torch

from vlm.bench.common import interleaved, median, peak_memory
from vlm.bench.models import build_pair, get_family, size
from vlm.bench.registry import BENCHES


def step_fn(module: torch.nn.Module, loss_fn: Callable[[], torch.Tensor], lr: float = 1e-5) -> Callable[[], float]:
    """One optimizer step of ``loss_fn`` on ``module``'s parameters (AdamW, gradients set to None before)."""
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def selective_copy(ours: Any) -> Any:
    """A copy of ``ours`` (same weights) whose decoder layers and tower blocks use selective activation
    checkpointing, as ``trainer.gradient_checkpointing=selective`` builds it."""
    import copy

    other = copy.deepcopy(ours)
    other.llm.enable_gradient_checkpointing("selective")
    other.encoder.enable_gradient_checkpointing("selective")
    return other.train()


def variants(ours: Any, theirs: Any, b: dict[str, torch.Tensor], compile_layers: bool = False,
             ours_b: dict[str, torch.Tensor] | None = None) -> dict[str, Callable[[], float]]:
    """The steps to compare: transformers (on ``b``), ours (label-only head), ours with selective activation
    checkpointing and ours with the full logits (on ``ours_b``, default ``b``)."""
    ob = b if ours_b is None else ours_b
    from vlm.objectives import build as build_objective

    selective = selective_copy(ours)
    fast = build_objective({"name": "lm"}, model=ours)
    fast_selective = build_objective({"name": "lm"}, model=selective)
    full = build_objective({"name": "lm", "label_only_head": False}, model=ours)
    if compile_layers:
        from vlm.train.stage import compile_layers

        compile_layers(ours)   # what trainer.compile=true does
        compile_layers(selective)
    return {"transformers": step_fn(theirs, lambda: theirs(**b).loss),
            "ours": step_fn(ours, lambda: fast(ours, ob).loss),
            "ours_selective": step_fn(selective, lambda: fast_selective(selective, ob).loss),
            "ours_full_logits": step_fn(ours, lambda: full(ours, ob).loss)}


@BENCHES.register("train_step")
def train_step(args: argparse.Namespace) -> dict[str, Any]:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    family = getattr(args, "family", "llava")
    spec = size(args.quick, args.size, family)
    ours, theirs = build_pair(spec, device, dtype, family=family)
    fam = get_family(family)
    b = fam.batch(ours, spec, device, dtype)
    ours_b = fam.ours_batch(b)
    from vlm.objectives import build as build_objective

    with torch.no_grad():
        loss_diff = abs(float(build_objective({"name": "lm"}, model=ours)(ours, ours_b).loss)
                        - float(theirs(**b).loss))
    steps = variants(ours, theirs, b, compile_layers=args.compile, ours_b=ours_b)
    times = interleaved(steps, repeats=args.repeats, warmup=args.warmup, device=device)
    memory: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(args.memory_repeats):
        for name in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            with peak_memory(device) as m:
                steps[name]()
            memory[name].append(m["peak_mib"])
    ref_t, ref_m = median(times["transformers"]), median(memory["transformers"])
    rows = [{"model": name, "step_s": median(times[name]), "time_ratio": median(times[name]) / ref_t,
             "peak_mib": median(memory[name]), "memory_ratio": median(memory[name]) / ref_m}
            for name in steps]
    tokens = b["input_ids"].numel()
    return {"rows": rows, "columns": ["model", "step_s", "time_ratio", "peak_mib", "memory_ratio"],
            "setup": {"family": family, "size": args.size or ("quick" if args.quick else "full"), "spec": spec, "tokens_per_step": tokens,
                      "labelled_tokens": int((b["labels"] != -100).sum()), "dtype": args.dtype,
                      "repeats": args.repeats, "warmup": args.warmup, "memory_repeats": args.memory_repeats,
                      "compile": args.compile},
            "first_loss_abs_diff": loss_diff, "times_s": times, "peak_mib": memory,
            "targets": {"time_ratio": 0.8, "memory_ratio": 0.6}}
