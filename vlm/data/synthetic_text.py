"""A synthetic text-image dataset of the kind users bring first, written as LLaVA JSON + PNGs.

Each image (``min_size..max_size`` px a side, noisy background) shows 2-3 items in distinct colours: two-digit
numbers, sometimes a short word. Each image gets questions of three tasks (the record's ``task`` field; the ``files``
dataset scores each):

- ``read``: "What is written in red?" -> ``42``;
- ``compare``: "Which number is larger, the red one or the blue one?" -> ``blue``;
- ``grounding``: "Where is the red text?" / "Where is 42?" -> ``<ref>42</ref><box>(x1,y1),(x2,y2)</box>``
  (Qwen-VL, ``[0, 1000)`` of the image's width / height; the box is the drawn text's pixel bounding box).

Deterministic from ``seed`` (same files for the same arguments)::

    python -m vlm.data.synthetic_text OUT_DIR --images 6000 --val-images 200 --seed 0
    # -> OUT_DIR/train.json, OUT_DIR/val.json, OUT_DIR/images/*.png (paths relative to OUT_DIR)
"""
from __future__ import annotations

import argparse
import json
import random
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vlm.data import boxes

COLORS = {"red": (235, 50, 40), "green": (40, 200, 60), "blue": (60, 110, 255), "yellow": (240, 220, 40),
          "white": (245, 245, 245), "magenta": (230, 60, 230)}
WORDS = ("cat", "dog", "sun", "car", "box", "tree", "fish", "bird")
TASKS = ("read", "compare", "grounding")


@lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _scene(rng: random.Random, min_size: int, max_size: int, font_sizes: tuple[int, int]) -> tuple[Image.Image,
                                                                                                  list[dict]]:
    """One image and its items ``{text, color, box}`` (pixel boxes), items not overlapping."""
    w, h = rng.randint(min_size, max_size), rng.randint(min_size, max_size)
    base = np.array([rng.randint(0, 90)] * 3, dtype=np.float32) + np.array([rng.randint(-15, 15) for _ in range(3)])
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 18, size=(h, w, 3))
    image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    items: list[dict] = []
    colors = rng.sample(sorted(COLORS), rng.randint(2, 3))
    numbers = rng.sample(range(10, 100), len(colors))
    for k, (color, number) in enumerate(zip(colors, numbers)):
        text = rng.choice(WORDS) if k == len(colors) - 1 and k >= 2 and rng.random() < 0.5 else str(number)
        font = _font(rng.randint(*font_sizes))
        for _ in range(100):
            x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
            tw, th = x1 - x0, y1 - y0
            if tw + 2 >= w or th + 2 >= h:
                break
            x, y = rng.randint(1, w - tw - 1) - x0, rng.randint(1, h - th - 1) - y0
            box = (x + x0, y + y0, x + x1, y + y1)
            if all(boxes.iou(box, it["box"]) == 0 and not _touch(box, it["box"]) for it in items):
                draw.text((x, y), text, fill=COLORS[color], font=font)
                items.append({"text": text, "color": color, "box": box})
                break
    return image, items


def _touch(a: tuple, b: tuple, gap: int = 2) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def _questions(rng: random.Random, items: list[dict], w: int, h: int) -> list[tuple[str, str, str]]:
    """``(task, question, answer)`` for one image: one of each task it supports."""
    out = []
    it = rng.choice(items)
    out.append(("read", f"What is written in {it['color']}?", it["text"]))
    nums = [i for i in items if i["text"].isdigit()]
    if len(nums) >= 2:
        a, b = rng.sample(nums, 2)
        larger = a if int(a["text"]) > int(b["text"]) else b
        out.append(("compare", f"Which number is larger, the {a['color']} one or the {b['color']} one?",
                    larger["color"]))
    it = rng.choice(items)
    question = f"Where is the {it['color']} text?" if rng.random() < 0.5 else f"Where is {it['text']}?"
    out.append(("grounding", question, boxes.format(it["text"], boxes.from_pixels(it["box"], w, h))))
    return out


def make_split(out_dir: str | Path, name: str, images: int, seed: int, min_size: int = 64, max_size: int = 96,
               font_sizes: tuple[int, int] = (13, 17)) -> Path:
    """Write ``images`` images to ``out_dir/images/<name>_<i>.png`` and their records to ``out_dir/<name>.json``
    (LLaVA JSON with a ``task`` field; image paths relative to ``out_dir``). Returns the JSON path."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{name}:{seed}")
    records: list[dict[str, Any]] = []
    for i in range(images):
        image, items = _scene(rng, min_size, max_size, font_sizes)
        rel = f"images/{name}_{i:05d}.png"
        image.save(out / rel)
        for task, q, a in _questions(rng, items, *image.size):
            records.append({"id": f"{name}_{i:05d}_{task}", "task": task, "image": rel,
                            "conversations": [{"from": "human", "value": f"<image>\n{q}"},
                                              {"from": "gpt", "value": a}]})
    path = out / f"{name}.json"
    path.write_text(json.dumps(records, indent=0))
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m vlm.data.synthetic_text", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--images", type=int, default=6000, help="training images (each gets 2-3 questions)")
    p.add_argument("--val-images", type=int, default=200, help="evaluation images (0: no val.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-size", type=int, default=64)
    p.add_argument("--max-size", type=int, default=96)
    a = p.parse_args(argv)
    train = make_split(a.out_dir, "train", a.images, a.seed, a.min_size, a.max_size)
    print(f"wrote {train}")
    if a.val_images:
        print(f"wrote {make_split(a.out_dir, 'val', a.val_images, a.seed, a.min_size, a.max_size)}")


if __name__ == "__main__":
    main()
