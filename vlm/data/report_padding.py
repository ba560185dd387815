"""Padding waste of padding vs packing on a mixture: ``python -m vlm.data.report_padding [--samples N] ...``.

Uses the built-in ``shapes`` dataset (its default task mixture, 1-3 turns) processed with the byte tokenizer and the
``chatml`` template; waste is ``1 - real tokens / (rows * padded length)`` summed over batches of ``batch_size`` rows.
Padding batches ``batch_size`` samples; packing first packs the samples greedily into rows of at most
``--max-length`` tokens, then batches ``batch_size`` rows.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from vlm.data.collate import PadCollator, concat_items, greedy_pack


def padding_waste(items: Sequence[dict[str, Any]], batch_size: int, max_length: int, pad_token_id: int,
                  pad_to_multiple_of: int | None = None) -> dict[str, dict[str, float]]:
    """Waste of (a) padding ``batch_size`` samples per batch and (b) packing all items greedily into rows of
    ``max_length`` then batching ``batch_size`` rows. Returns ``{"padding": stats, "packing": stats}`` with
    ``tokens``, ``padded``, ``waste`` and ``batches``."""
    pad = PadCollator(pad_token_id, pad_to_multiple_of=pad_to_multiple_of)

    def run(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
        tokens = padded = batches = 0
        for i in range(0, len(rows), batch_size):
            stats = pad(rows[i:i + batch_size])["meta"]["padding"]
            tokens, padded, batches = tokens + stats["tokens"], padded + stats["padded"], batches + 1
        return {"tokens": tokens, "padded": padded, "waste": 1 - tokens / padded if padded else 0.0,
                "batches": batches}

    packed = [concat_items([items[i] for i in row])
              for row in greedy_pack([it["input_ids"].numel() for it in items], max_length)]
    return {"padding": run(items), "packing": run(packed)}


def shapes_items(n: int, image_size: int = 32, tokens_per_image: int = 16, seed: int = 0) -> tuple[list, int]:
    """``n`` processed samples of the shapes mixture (1-3 turns) and the pad id."""
    from vlm.data.images import ImageProcessor
    from vlm.data.processor import Processor
    from vlm.data.shapes import ShapesDataset
    from vlm.data.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    proc = Processor(tok, "chatml", ImageProcessor(image_size, (0.5,) * 3, (0.5,) * 3), tokens_per_image)
    parts = [ShapesDataset("train", size=n, seed=seed, turns=t, image_size=image_size) for t in (1, 2, 3)]
    return [proc(parts[i % 3][i]) for i in range(n)], tok.pad_token_id


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--pad-to-multiple-of", type=int, default=None)
    ap.add_argument("--image-size", type=int, default=32, help="side of the processed images")
    ap.add_argument("--tokens-per-image", type=int, default=16, help="placeholder tokens per image")
    ap.add_argument("--seed", type=int, default=0, help="shapes dataset seed")
    args = ap.parse_args(argv)
    items, pad_id = shapes_items(args.samples, args.image_size, args.tokens_per_image, args.seed)
    report = padding_waste(items, args.batch_size, args.max_length, pad_id, args.pad_to_multiple_of)
    lengths = sorted(it["input_ids"].numel() for it in items)
    print(f"{len(items)} shapes samples, lengths {lengths[0]}..{lengths[-1]} (median {lengths[len(lengths) // 2]}), "
          f"batch_size={args.batch_size}, pack budget={args.max_length}")
    for name, s in report.items():
        print(f"  {name:8s} batches={s['batches']:4d} real={s['tokens']:7d} padded={s['padded']:7d} "
              f"waste={100 * s['waste']:5.1f}%")
    return report


if __name__ == "__main__":
    main()
