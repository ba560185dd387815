"""``packing``: padding waste and training tokens/s, padding vs packing, on two length distributions.

- ``shapes``: the built-in shapes mixture (1-3 turns, 16 tokens per image; ``vlm.data.report_padding``), trained
  through the whole pipeline (tiny CLIP tower + MLP + Llama).
- ``llava665k_like``: per-sample token counts synthesized from ``LLAVA_665K_LIKE``, a histogram shaped like the
  length distribution of LLaVA-1.5's 665k instruction mix (an approximation written for this bench, not the real
  data: most samples are one 576-token image plus 50-1000 text tokens, ~6 % text-only, a tail to 2048). Waste is
  computed at full scale (pack budget 2048); tokens/s runs a text-only tiny Llama on the same lengths divided by 4
  (budget 512) so that an epoch takes seconds on a CPU.

Padding batches ``batch_size`` samples in data order; packing fills rows of the budget first-fit in data order
(``vlm.data.collate.greedy_pack``) and batches ``batch_size`` rows. tokens/s = real (non-padding) tokens of an epoch
/ its forward + backward time, the two schemes interleaved.
"""
from __future__ import annotations

import argparse
from typing import Any

import torch

from vlm.bench.common import interleaved, median
from vlm.bench.registry import BENCHES
from vlm.data.collate import PadCollator, concat_items, greedy_pack
from vlm.data.report_padding import padding_waste, shapes_items

# (share of samples, image tokens, text tokens low, text tokens high): an approximation of LLaVA-665k's lengths
LLAVA_665K_LIKE: list[tuple[float, int, int, int]] = [
    (0.22, 576, 20, 80),       # short VQA / OCR / region answers
    (0.28, 576, 80, 250),      # multi-question VQA conversations
    (0.27, 576, 250, 600),     # long conversations, detailed descriptions
    (0.13, 576, 600, 1200),    # the long multi-turn tail
    (0.04, 576, 1200, 1472),   # at the 2048 budget
    (0.06, 0, 100, 2048),      # text-only (ShareGPT)
]


def llava_like_lengths(n: int, seed: int = 0, scale: float = 1.0) -> list[int]:
    """``n`` sample lengths (image + text tokens) drawn from ``LLAVA_665K_LIKE``, multiplied by ``scale``."""
    g = torch.Generator().manual_seed(seed)
    shares = torch.tensor([b[0] for b in LLAVA_665K_LIKE])
    buckets = torch.multinomial(shares, n, replacement=True, generator=g).tolist()
    out = []
    for b in buckets:
        _, image, lo, hi = LLAVA_665K_LIKE[b]
        text = int(torch.randint(lo, hi + 1, (1,), generator=g))
        out.append(max(2, int((image + text) * scale)))
    return out


def text_items(lengths: list[int], vocab: int, seed: int = 0) -> list[dict[str, Any]]:
    """Text-only items of the given lengths: random ids, the second half labelled."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i, n in enumerate(lengths):
        ids = torch.randint(3, vocab, (n,), generator=g)
        labels = ids.clone()
        labels[: n // 2] = -100
        items.append({"input_ids": ids, "labels": labels, "pixel_values": None, "meta": {"id": i}})
    return items


def batches(items: list[dict[str, Any]], batch_size: int, max_length: int, pad_id: int, packed: bool) \
        -> list[dict[str, Any]]:
    """The epoch's batches under padding or packing (``meta`` dropped)."""
    pad = PadCollator(pad_id)
    rows = [concat_items([items[i] for i in r]) for r in greedy_pack([it["input_ids"].numel() for it in items],
                                                                     max_length)] if packed else items
    out = []
    for i in range(0, len(rows), batch_size):
        b = pad(rows[i:i + batch_size])
        b.pop("meta")
        out.append(b)
    return out


def throughput(model: Any, items: list[dict[str, Any]], batch_size: int, max_length: int, pad_id: int,
               args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved epochs of forward + backward (the ``lm`` objective), padding vs packing: tokens/s of each."""
    from vlm.objectives import build as build_objective

    obj = build_objective({"name": "lm"}, model=model)
    epochs = {name: batches(items, batch_size, max_length, pad_id, name == "packing")
              for name in ("padding", "packing")}
    tokens = {name: sum(int(b["attention_mask"].sum()) for b in bs) for name, bs in epochs.items()}

    def epoch(name: str):
        def go() -> None:
            for b in epochs[name]:
                model.zero_grad(set_to_none=True)
                obj(model, b).loss.backward()
        return go

    times = interleaved({name: epoch(name) for name in epochs}, repeats=args.repeats, warmup=args.warmup)
    tps = {name: tokens[name] / median(times[name]) for name in epochs}
    return {"tokens_per_s": tps, "times_s": times, "speedup": tps["packing"] / tps["padding"]}


def tiny_model(vocab: int, image_size: int = 32, tokenizer: bool = False) -> Any:
    """A tiny CLIP + MLP + Llama (16 tokens per 32 px image); ``tokenizer``: with the byte tokenizer (the shapes
    items' image token)."""
    import vlm
    from vlm.data.tokenizer import byte_tokenizer

    torch.manual_seed(0)
    return vlm.build({"encoder": {"name": "clip", "image_size": image_size, "patch_size": 8, "hidden_size": 64,
                                  "num_layers": 2, "num_heads": 4, "intermediate_size": 128, "select": "patch"},
                      "connector": {"name": "mlp", "depth": 2},
                      "llm": {"name": "hf_causal_lm", "config": {
                          "model_type": "llama", "hidden_size": 512, "intermediate_size": 1376,
                          "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 8,
                          "vocab_size": vocab, "max_position_embeddings": 4096}}},
                     tokenizer=byte_tokenizer() if tokenizer else None).train()


@BENCHES.register("packing")
def packing(args: argparse.Namespace) -> dict[str, Any]:
    batch_size = 8
    n = args.samples or (24 if args.quick else 256)
    results: dict[str, Any] = {}
    # shapes: the real pipeline
    items, pad_id = shapes_items(n)
    budget = 512
    waste = padding_waste(items, batch_size, budget, pad_id)
    results["shapes"] = {"waste": waste, "budget": budget,
                         **throughput(tiny_model(vocab=512, tokenizer=True), items, batch_size, budget, pad_id, args)}
    # LLaVA-665k-like lengths
    lengths = llava_like_lengths(n)
    full = text_items(lengths, vocab=512)
    results["llava665k_like"] = {"waste": padding_waste(full, batch_size, 2048, 0), "budget": 2048}
    scaled = text_items([max(2, x // 4) for x in lengths], vocab=512)
    results["llava665k_like"].update(throughput(tiny_model(vocab=512), scaled, batch_size, 512, 0, args))
    results["llava665k_like"]["throughput_budget"] = 512
    rows = []
    for dist, r in results.items():
        for scheme in ("padding", "packing"):
            rows.append({"lengths": dist, "scheme": scheme, "waste_pct": 100 * r["waste"][scheme]["waste"],
                         "batches": r["waste"][scheme]["batches"], "tokens_per_s": r["tokens_per_s"][scheme],
                         "speedup": r["tokens_per_s"][scheme] / r["tokens_per_s"]["padding"]})
    return {"rows": rows, "columns": ["lengths", "scheme", "waste_pct", "batches", "tokens_per_s", "speedup"],
            "setup": {"samples": n, "batch_size": batch_size, "repeats": args.repeats, "warmup": args.warmup,
                      "llava665k_like_histogram": LLAVA_665K_LIKE},
            "results": results, "targets": {"packed_waste_pct": 5.0, "speedup": 1.5}}
