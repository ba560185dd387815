"""``quantize``: what weight-only quantization (``vlm.load(DIR, quantize=...)``, ``vlm.quantize``) costs and saves
on a trained checkpoint, fp32 vs ``int8`` vs ``int4`` (plus ``nf4`` on CUDA when bitsandbytes is installed):

- ``linear_mib`` / ``bytes_ratio``: the stored bytes of the quantized LLM linear weights (packed data + scales + zero
  points, ``vlm.quantize.linear_weight_bytes``) against the same weights in fp32;
- ``tokens_per_s`` (``speed_ratio``: over fp32's): greedy generation of exactly 32 new tokens for the first two
  batches of 32 prompts, interleaved timing (``vlm.bench.common.interleaved``), median of ``--repeats``;
- ``agreement_pct``: greedy tokens equal to the fp32 model's at the same position, over the fp32 model's reply tokens
  (up to and including its stop token), on the evaluation prompts; ``same_reply_pct``: replies identical throughout;
- the evaluation table (``vlm.eval.evaluator.evaluate``, as training's final evaluation and ``vlm.eval`` run it) of
  each model, and ``max_drop_points``: the largest drop of any row against fp32, in points (score x 100).

``--quantize int8,int4`` picks the schemes (default int8 and int4, plus nf4 on CUDA with bitsandbytes). ``--model``
is a run directory (its ``final/``, its evaluation set and template) or a model directory (the shapes
validation split); default: the newest ``runs/tiny/*`` (the default job's). ``--quick``: a few prompts and samples,
on a tiny random model unless ``--model`` is given (seconds; checks the bench runs, measures nothing meaningful).

``python -m vlm.bench quantize --model runs/tiny/<timestamp>`` (docs/deploy.md, "Quantized inference").
"""
from __future__ import annotations

import argparse
import importlib.util
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vlm.bench.common import interleaved, median
from vlm.bench.registry import BENCHES

SCHEMES = ("int8", "int4")


def default_model() -> Path:
    """The newest run directory of the default job (``runs/tiny/<timestamp>`` with a ``final/``)."""
    runs = sorted((p for p in Path("runs/tiny").glob("*") if (p / "final").is_dir()), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise SystemExit("vlm.bench quantize: no --model given and no finished default job under runs/tiny/*/final "
                         "(run python -m vlm.train first, or pass --model RUN_OR_MODEL_DIR)")
    return runs[-1]


def tiny_random_model(directory: Path) -> Path:
    """A tiny random clip + llama model with the byte tokenizer and chatml, saved to ``directory`` (``--quick``)."""
    import vlm
    from vlm.data.tokenizer import byte_tokenizer

    torch.manual_seed(0)
    cfg = {"encoder": {"name": "clip", "image_size": 32, "patch_size": 8, "hidden_size": 32, "num_layers": 1,
                       "num_heads": 4, "intermediate_size": 64},
           "connector": {"name": "mlp", "depth": 2},
           "llm": {"name": "hf_causal_lm", "config": {"model_type": "llama", "hidden_size": 64,
                                                       "intermediate_size": 128, "num_hidden_layers": 1,
                                                       "num_attention_heads": 4, "num_key_value_heads": 2,
                                                       "vocab_size": 128}}}
    model = vlm.build(cfg, tokenizer=byte_tokenizer("chatml"))
    model.set_template("chatml")
    model.save_pretrained(directory)
    return directory


def greedy(model: Any, batches: list[dict[str, torch.Tensor]], new_tokens: int, stops: list[int] | None,
           pad: int) -> list[list[int]]:
    """Greedy new tokens per prompt; with ``stops``, each row cut after its first stop id (else exactly
    ``new_tokens``)."""
    rows: list[list[int]] = []
    for batch in batches:
        kwargs = {"max_new_tokens": new_tokens, "do_sample": False, "pad_token_id": pad,
                  "eos_token_id": stops if stops else None}
        if not stops:
            kwargs["min_new_tokens"] = new_tokens
        with torch.inference_mode():
            new = model.generate(**batch, **kwargs)
        for row in new.tolist():
            cut = next((i + 1 for i, t in enumerate(row) if stops and t in stops), len(row))
            rows.append(row[:cut])
    return rows


def agreement(ref: list[list[int]], got: list[list[int]]) -> tuple[float, float]:
    """(% of the reference's tokens matched at the same position, % of replies identical)."""
    total = sum(len(r) for r in ref)
    same = sum(sum(a == b for a, b in zip(r, g)) for r, g in zip(ref, got))
    return 100.0 * same / max(total, 1), 100.0 * sum(r == g for r, g in zip(ref, got)) / max(len(ref), 1)


def prompt_batches(processor: Any, samples: Any, n: int, batch_size: int, device: torch.device) \
        -> list[dict[str, torch.Tensor]]:
    """The first ``n`` evaluation prompts (those the processor keeps), left-padded into batches on ``device``."""
    from vlm.data.collate import MEDIA_KEYS, PadCollator
    from vlm.eval.evaluator import _prompt

    collator = PadCollator(processor.tokenizer.pad_token_id, padding_side="left")
    # a prompt the processor drops (too long, unreadable, ...) is not a prompt of this bench
    items = [item for item, _ in (_prompt(processor, samples[i]) for i in range(min(n, len(samples))))
             if item is not None]
    batches = []
    for i in range(0, len(items), batch_size):
        b = collator(items[i:i + batch_size])
        batches.append({k: b[k].to(device) for k in ("input_ids", "attention_mask", *MEDIA_KEYS) if k in b})
    return batches


@BENCHES.register("quantize")
def quantize_bench(args: argparse.Namespace) -> dict[str, Any]:
    from vlm.eval.__main__ import data_spec
    from vlm.eval.evaluator import OneProcess, evaluate
    from vlm.inference.chat import processor_for
    from vlm.inference.generate import model_stop_ids
    from vlm.inference.load import open_model
    from vlm.metrics import score_keys
    from vlm.quantize import linear_weight_bytes, scheme_for, target_names

    device = torch.device(args.device)
    tmp = tempfile.TemporaryDirectory() if args.quick and not args.model else None
    path = Path(args.model) if args.model else tiny_random_model(Path(tmp.name)) if tmp else default_model()
    if getattr(args, "quantize", None):
        schemes = [s.strip() for s in args.quantize.split(",")]
        for s in schemes:
            scheme_for(s, device)  # ValueError naming the accepted schemes
    else:
        nf4 = device.type == "cuda" and importlib.util.find_spec("bitsandbytes") is not None
        schemes = list(SCHEMES) + (["nf4"] if nf4 else [])
    opened = {None: open_model(path, device=str(device))}
    for s in schemes:
        opened[s] = open_model(path, device=str(device), quantize=s)
    ref = opened[None]
    spec, data_name = data_spec(ref, [], ref.model.image_size)
    if args.samples or args.quick:
        spec["size"] = args.samples or 4
    from vlm.data.datasets import build_dataset

    samples = build_dataset(spec)
    processor = processor_for(ref.model, ref.template, truncation="drop")
    n_prompts = 4 if args.quick else min(len(samples), 128)
    batch_size = 4 if args.quick else 32
    new_tokens = 4 if args.quick else 32
    batches = prompt_batches(processor, samples, n_prompts, batch_size, device)
    pad = processor.tokenizer.pad_token_id
    stops = model_stop_ids(ref.model) or None
    replies = {s: greedy(o.model, batches, new_tokens, stops, pad) for s, o in opened.items()}

    timed_batches = batches[:2]  # timing: the first two batches (the agreement covers every prompt)

    def timed(model: Any) -> Callable[[], None]:
        return lambda: greedy(model, timed_batches, new_tokens, None, pad)

    times = interleaved({str(s): timed(o.model) for s, o in opened.items()}, repeats=args.repeats,
                        warmup=args.warmup, device=device)
    generated = sum(b["input_ids"].shape[0] for b in timed_batches) * new_tokens
    workers = OneProcess(str(device))
    limit = 8 if args.quick else None
    run_eval = ref.run_config.eval if ref.run_config is not None else {}  # the run's own evaluation settings
    eval_batch = int(run_eval.get("batch_size", 64))
    eval_tokens = 4 if args.quick else int(run_eval.get("max_new_tokens", 32))
    tables = {s: evaluate(o.model, workers, processor, samples, batch_size=eval_batch, max_new_tokens=eval_tokens,
                          precision=torch.float32, limit=limit)[0] for s, o in opened.items()}
    names = target_names(ref.model)
    fp32 = linear_weight_bytes(ref.model, names)
    rows_table = [{"task": k, "fp32": tables[None][k], **{s: tables[s][k] for s in schemes},
                   **{f"{s}_delta_points": 100.0 * (tables[s][k] - tables[None][k]) for s in schemes}}
                  for k in score_keys(tables[None])]
    rows = []
    fp32_tps = generated / median(times["None"])
    for s, o in opened.items():
        stored = linear_weight_bytes(o.model, names)["bytes"]
        agree, same = agreement(replies[None], replies[s])
        drop = max([100.0 * (tables[None][k] - tables[s][k]) for k in score_keys(tables[None])] + [0.0])
        rows.append({"scheme": s or "fp32", "linear_mib": stored / 2**20, "bytes_ratio": stored / fp32["fp32_bytes"],
                     "tokens_per_s": generated / median(times[str(s)]),
                     "speed_ratio": generated / median(times[str(s)]) / fp32_tps, "agreement_pct": agree,
                     "same_reply_pct": same, "max_drop_points": drop})
    if tmp:
        tmp.cleanup()
    return {"rows": rows,
            "columns": ["scheme", "linear_mib", "bytes_ratio", "tokens_per_s", "speed_ratio", "agreement_pct",
                        "same_reply_pct", "max_drop_points"],
            "eval_table": rows_table,
            "setup": {"model": "tiny random (--quick)" if tmp else str(path), "data": data_name,
                      "eval_samples": len(samples) if limit is None else min(limit, len(samples)),
                      "prompts": sum(b["input_ids"].shape[0] for b in batches), "new_tokens": new_tokens,
                      "eval_batch_size": eval_batch, "eval_max_new_tokens": eval_tokens,
                      "quantized_modules": len(names), "repeats": args.repeats, "warmup": args.warmup},
            "targets": {"bytes_ratio": {"int8": 0.3, "int4": 0.2}, "agreement_pct": {"int8": 80.0},
                        "max_drop_points": {"int8": 1.0}}}
