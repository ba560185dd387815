"""Shared helpers for the data-pipeline tests (images on disk, a tiny processor, expected-token builders)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

COLORS = {"a.png": ((255, 0, 0), (40, 30)), "b.png": ((0, 255, 0), (20, 50)), "c.jpg": ((0, 0, 255), (64, 64)),
          "big.png": ((255, 255, 0), (200, 90))}
K = 4  # image tokens per tile in the tiny processors


def write_images(root: Path) -> Path:
    """Solid-colour images plus the bad cases: ``tiny.png`` (1x1), ``thin.png`` (1x40), ``corrupt.jpg`` (garbage),
    ``empty.png`` (0 bytes)."""
    root.mkdir(parents=True, exist_ok=True)
    for name, (color, size) in COLORS.items():
        Image.new("RGB", size, color).save(root / name)
    Image.new("RGB", (1, 1), (9, 9, 9)).save(root / "tiny.png")
    Image.new("RGB", (1, 40), (9, 9, 9)).save(root / "thin.png")
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" * 3)
    (root / "empty.png").write_bytes(b"")
    return root


def image_processor(size: int = 16, **kw: Any) -> Any:
    from vlm.data.images import ImageProcessor

    return ImageProcessor(size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), **kw)


def processor(tok: Any, template: Any = "chatml", k: int = K, **kw: Any) -> Any:
    from vlm.data.processor import Processor

    ip = kw.pop("image_processor", None) or image_processor(kw.pop("image_size", 16), **kw.pop("image_kw", {}))
    return Processor(tok, template, ip, lambda hw: k, **kw)


def expected(tok: Any, pieces: list[Any]) -> tuple[list[int], list[int]]:
    """Expected ``(input_ids, labels)`` from literal pieces: ``("text", trained)`` or ``("IMG", n_tokens)``.

    Text is encoded piece by piece (for the byte tokenizer: one id per byte, special strings as one id)."""
    ids: list[int] = []
    labels: list[int] = []
    img = tok.convert_tokens_to_ids("<image>")
    for what, arg in pieces:
        if what == "IMG":
            ids += [img] * arg
            labels += [-100] * arg
        else:
            t = tok(what, add_special_tokens=False)["input_ids"]
            ids += t
            labels += t if arg else [-100] * len(t)
    return ids, labels


def trained_text(tok: Any, item: dict) -> str:
    lab = item["labels"]
    return tok.decode(lab[lab != -100])


def mean_color(pixels: torch.Tensor) -> tuple[int, int, int]:
    """Mean RGB (0..255) of normalized (3, S, S) pixels (mean = std = 0.5)."""
    return tuple(round(float(v)) for v in ((pixels * 0.5 + 0.5) * 255).mean(dim=(1, 2)))
