"""``generate``: greedy decoding tokens/s with the KV cache at batch 1 and 8, ours (``VLM.generate``) vs
transformers' ``LlavaForConditionalGeneration.generate`` on identical weights and prompts (one image + text).

Both decode exactly ``new_tokens`` tokens (``min_new_tokens`` = ``max_new_tokens``) with the same ``eos_token_id`` and
``pad_token_id`` (the LLM config's), so both run the same logits processors and stopping checks (a trained model
always has an end-of-sequence id; without one transformers skips the min-length processors); the bench also reports
whether both produced the same tokens. ``--cache static`` passes ``cache_implementation="static"`` to both.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable

import torch

from vlm.bench.common import interleaved, median
from vlm.bench.models import batch, build_pair, size
from vlm.bench.registry import BENCHES


def prompts(ours: Any, spec: dict[str, Any], rows: int, device: torch.device, dtype: torch.dtype) \
        -> dict[str, torch.Tensor]:
    b = batch(ours, {**spec, "text_tokens": spec["prompt_tokens"], "answer_tokens": 1}, device, dtype, rows=rows)
    return {k: b[k] for k in ("input_ids", "attention_mask", "pixel_values")}


@BENCHES.register("generate")
def generate(args: argparse.Namespace) -> dict[str, Any]:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    spec = {**size(args.quick, args.size), "prompt_tokens": 8 if args.quick else 32}
    new = 4 if args.quick else 32
    ours, theirs = build_pair(spec, device, dtype)
    ours.eval(), theirs.eval()
    eos = ours.llm.hf_config.eos_token_id
    extra: dict[str, Any] = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False,
                             "eos_token_id": eos, "pad_token_id": eos}
    if args.cache == "static":
        extra["cache_implementation"] = "static"
    rows, times_all, same = [], {}, {}
    for bs in (1, 8):
        p = prompts(ours, spec, bs, device, dtype)
        prompt_len = p["input_ids"].shape[1]
        outs: dict[str, torch.Tensor] = {}

        def run(name: str, fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
            def go() -> None:
                with torch.inference_mode():
                    outs[name] = fn()
            return go

        fns = {"transformers": run("transformers", lambda: theirs.generate(**p, **extra)[:, prompt_len:]),
               "ours": run("ours", lambda: ours.generate(**p, **extra))}
        times = interleaved(fns, repeats=args.repeats, warmup=args.warmup, device=device)
        same[bs] = bool(torch.equal(outs["ours"], outs["transformers"]))
        ref = bs * new / median(times["transformers"])
        for name in fns:
            tps = bs * new / median(times[name])
            rows.append({"batch": bs, "model": name, "tokens_per_s": tps, "speed_ratio": tps / ref})
        times_all[bs] = times
    return {"rows": rows, "columns": ["batch", "model", "tokens_per_s", "speed_ratio"],
            "setup": {"size": "quick" if args.quick else "full", "spec": spec, "new_tokens": new,
                      "cache": args.cache, "dtype": args.dtype, "repeats": args.repeats, "warmup": args.warmup},
            "same_tokens": same, "times_s": times_all, "targets": {"speed_ratio": 1.0}}
