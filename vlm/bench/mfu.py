"""``mfu``: model FLOPs per training step counted from the configs, and the achieved fraction of the device's peak.

FLOPs (multiply-adds x 2) of the ``train_step`` model and batch, per part: vision tower (patch embedding, every
layer's projections, MLP and attention over its tokens), connector (2-layer MLP), LLM (projections, MLP, causal
attention, and the LM head at every position (``lm_head_all``, what transformers computes) or only at the labelled
ones (``lm_head_labels``, ours)); backward = 2 x forward. Cross-checked against ``torch.utils.flop_counter`` on one
forward + backward. Peak: CPU: the best of repeated square fp32 matmuls (``torch.mm``, n=2048) on this process's
threads; CUDA: the same in the bench dtype. MFU = counted FLOPs / median step time / peak.
"""
from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from vlm.bench.common import interleaved, median, sync
from vlm.bench.models import batch, build_pair, size
from vlm.bench.registry import BENCHES
from vlm.bench.train_step import step_fn


def vision_flops(enc: dict[str, Any], images: int) -> float:
    """Forward FLOPs of a ViT (CLS + patches) over ``images`` images."""
    p, c, i = enc["patch_size"], enc["hidden_size"], enc["intermediate_size"]
    patches = (enc["image_size"] // p) ** 2
    t = patches + 1
    per_layer = 2 * t * (4 * c * c + 2 * c * i) + 2 * 2 * t * t * c
    return images * (2 * patches * 3 * p * p * c + enc["num_layers"] * per_layer)


def connector_flops(tokens: int, c_in: int, d: int) -> float:
    return 2.0 * tokens * (c_in * d + d * d)


def llm_flops(llm: dict[str, Any], rows: int, length: int, head_positions: int) -> dict[str, float]:
    """Forward FLOPs of a Llama-style decoder over ``rows x length`` tokens, the head at ``head_positions``."""
    d, i, layers = llm["hidden_size"], llm["intermediate_size"], llm["num_hidden_layers"]
    kv = d * llm["num_key_value_heads"] // llm["num_attention_heads"]
    tokens = rows * length
    proj = 2 * tokens * (d * d + 2 * d * kv + d * d + 3 * d * i)
    attn = 2 * 2 * rows * (length * (length + 1) / 2) * d          # causal: half the score matrix
    return {"layers": layers * (proj + attn), "head": 2.0 * head_positions * d * llm["vocab_size"]}


def counted(spec: dict[str, Any], rows: int, length: int, labelled: int, image_tokens: int) -> dict[str, float]:
    """Forward + backward FLOPs of one step, per part, with the head at all positions or the labelled ones."""
    vision = vision_flops(spec["encoder"], rows)
    conn = connector_flops(rows * image_tokens, spec["encoder"]["hidden_size"], spec["llm"]["hidden_size"])
    lm_all = llm_flops(spec["llm"], rows, length, rows * length)
    lm_lab = llm_flops(spec["llm"], rows, length, labelled)
    fwd_common = vision + conn + lm_all["layers"]
    return {"vision": 3 * vision, "connector": 3 * conn, "llm_layers": 3 * lm_all["layers"],
            "lm_head_all": 3 * lm_all["head"], "lm_head_labels": 3 * lm_lab["head"],
            "total_all": 3 * (fwd_common + lm_all["head"]), "total_labels": 3 * (fwd_common + lm_lab["head"])}


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Best measured FLOP/s of an ``n x n`` matmul."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    best = 0.0
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t0))
    return best


def measured_flops(fn: Any) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


@BENCHES.register("mfu")
def mfu(args: argparse.Namespace) -> dict[str, Any]:
    from vlm.objectives import build as build_objective

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    spec = size(args.quick, args.size)
    ours, theirs = build_pair(spec, device, dtype)
    b = batch(ours, spec, device, dtype)
    rows_, length = b["input_ids"].shape
    labelled = int((b["labels"][:, 1:] != -100).sum())
    flops = counted(spec, rows_, length, labelled, ours.num_image_tokens())
    obj = build_objective({"name": "lm"}, model=ours)
    steps = {"ours": step_fn(ours, lambda: obj(ours, b).loss),
             "transformers": step_fn(theirs, lambda: theirs(**b).loss)}

    def fwd_bwd(fn: Any) -> Any:
        return lambda: fn().backward()

    check = {"ours": measured_flops(fwd_bwd(lambda: obj(ours, b).loss)),
             "transformers": measured_flops(fwd_bwd(lambda: theirs(**b).loss))}
    ours.zero_grad(set_to_none=True), theirs.zero_grad(set_to_none=True)
    times = interleaved(steps, repeats=args.repeats, warmup=args.warmup, device=device)
    peak = matmul_peak(device, dtype, n=512 if args.quick else 2048)
    per = {"ours": flops["total_labels"], "transformers": flops["total_all"]}
    rows = []
    for name in steps:
        t = median(times[name])
        rows.append({"model": name, "step_s": t, "model_gflop": per[name] / 1e9,
                     "flop_counter_gflop": check[name] / 1e9, "achieved_gflops": per[name] / t / 1e9,
                     "peak_gflops": peak / 1e9, "mfu_pct": 100 * per[name] / t / peak,
                     "mfu_full_head_pct": 100 * flops["total_all"] / t / peak})
    return {"rows": rows, "columns": ["model", "step_s", "model_gflop", "flop_counter_gflop", "achieved_gflops",
                                      "peak_gflops", "mfu_pct", "mfu_full_head_pct"],
            "setup": {"size": args.size or ("quick" if args.quick else "full"), "spec": spec, "tokens": rows_ * length,
                      "labelled_targets": labelled, "dtype": args.dtype, "repeats": args.repeats},
            "flops_per_step": flops, "flop_counter": check, "times_s": times, "matmul_peak_flops": peak}
