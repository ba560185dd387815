"""Synthetic preference pairs on shapes scenes (data set ``shapes_preference``): chosen = the right answer, rejected
= a plausible wrong one.

Each pair is a one-turn ``shapes`` sample (``vlm.data.shapes.ShapesDataset``, its options) and the same prompt with
a wrong answer of the same kind, drawn from a generator seeded by the sample's own seed: ``vqa_color`` another
colour, ``vqa_shape`` another shape, ``vqa_count`` one more or one fewer, ``vqa_position`` the other of yes/no,
``grounding`` the right box moved onto another shape of the scene (or by a third of the image when it is alone),
``referring`` another shape's name, ``caption`` one shape's colour changed.
"""
from __future__ import annotations

import dataclasses
import random
import re
from typing import Any

from vlm.data import boxes
from vlm.data.dataset_registry import DATASETS
from vlm.data.preference import Pair, processed_pairs
from vlm.data.shapes.dataset import ShapesDataset, sample_seed
from vlm.data.shapes.scene import COLORS, DEFAULT_SHAPES
from vlm.data.sample import Message, Sample

#: tasks of the default pairs: the answers a preference can fix (colour, count, box, ...)
DEFAULT_TASKS = {"vqa_color": 1.0, "vqa_count": 1.0, "vqa_shape": 1.0, "grounding": 1.0}


def _other(rng: random.Random, options: Any, right: str) -> str:
    return rng.choice([o for o in options if o != right])


def moved_box(box: Any, others: list[dict[str, Any]], size: int, rng: random.Random) -> tuple[int, int, int, int]:
    """The right box ``(x1, y1, x2, y2)`` in ``[0, 1000)``, moved (same size) onto another shape of the scene (its
    centre on that shape's centre; ``others``: shape dicts with a pixel ``box``, ``size``: the image side in px), or
    by a third of the image when the shape is alone; kept inside the image. The pair then differs in where the box
    is, not in its exact size and offsets: another shape's own box differs in both, and a model that places boxes
    to within a few units ranks such pairs by the size and offset tokens as much as by the place."""
    x1, y1, x2, y2 = box
    if others:
        o = boxes.from_pixels(rng.choice(others)["box"], size, size)
        dx, dy = round((o[0] + o[2] - x1 - x2) / 2), round((o[1] + o[3] - y1 - y2) / 2)
    else:
        dx, dy = (333 if x2 + 333 < 1000 else -333), 0
    dx = min(max(dx, -x1), 999 - x2)  # inside [0, 999]
    dy = min(max(dy, -y1), 999 - y2)
    return x1 + dx, y1 + dy, x2 + dx, y2 + dy


def wrong_answer(sample: Sample, rng: random.Random) -> str:
    """A plausible wrong answer to ``sample``'s (one-turn shapes sample) question."""
    meta, right = sample.meta, sample.meta["answer"]
    task = meta["task"]
    shapes = meta["scenes"][0]["shapes"]
    if task == "vqa_color":
        return _other(rng, COLORS, right)
    if task == "vqa_shape":
        return _other(rng, DEFAULT_SHAPES, right)
    if task == "vqa_count":
        n = int(right)
        return str(n + 1 if n == 1 or rng.random() < 0.5 else n - 1)
    if task == "vqa_position":
        return "no" if right == "yes" else "yes"
    size = meta["image_size"]
    others = [s for s in shapes if s["color"] + " " + s["shape"] != meta.get("target")]
    if task == "referring":
        return rng.choice(others)["color"] + " " + rng.choice(others)["shape"] if others else \
            _other(rng, COLORS, right.split()[0]) + " " + right.split()[1]
    if task == "grounding":
        return boxes.format(meta["target"], moved_box(meta["box_norm"], others, size, rng),
                            style=meta.get("box_style", "qwen"))
    if task == "caption":  # one shape's colour changed, and its article ("a red", "an orange")
        s = rng.choice(shapes)
        colour = _other(rng, COLORS, s["color"])
        article = "an" if colour[0] in "aeiou" else "a"
        return re.sub(rf"\b(an?) {s['color']} {s['shape']}\b", f"{article} {colour} {s['shape']}", right, count=1)
    raise KeyError(f"shapes_preference: no wrong answer for task {task!r}; expected one of "
                   f"{sorted(DEFAULT_TASKS) + ['vqa_position', 'referring', 'caption']}")


class ShapesPairs:
    """``sample(i)`` -> ``Pair`` of shapes sample ``i`` (its right answer) and the same prompt with a wrong one;
    ``len``, ``__getitem__`` (the chosen ``Sample``, for what reads samples: image placement, evaluation)."""

    def __init__(self, split: str = "train", size: int | None = None, tasks: Any = None, seed: int = 0,
                 **options: Any) -> None:
        self.shapes = ShapesDataset(split=split, size=size, tasks=DEFAULT_TASKS if tasks is None else tasks,
                                    seed=seed, turns=1, **options)

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, index: int) -> Sample:
        return self.shapes[index]

    def sample(self, index: int) -> Pair:
        chosen = self.shapes[index]
        chosen.meta.setdefault("index", index)
        rng = random.Random(sample_seed(self.shapes.seed, self.shapes.split + "/rejected", index))
        wrong = wrong_answer(chosen, rng)
        rejected = dataclasses.replace(chosen, messages=chosen.messages[:-1] + [Message("assistant", [wrong])],
                                       meta={**chosen.meta, "answer": wrong})
        return Pair(chosen, rejected)


@DATASETS.register("shapes_preference")
def shapes_preference(processor: Any = None, add_generation_prompt: bool = False, heldout: int | str = "auto",
                      **options: Any) -> Any:
    """Synthetic pairs on shapes scenes (``ShapesPairs`` options: ``split``, ``size``, ``tasks``, ``seed`` and
    ``ShapesDataset``'s). ``heldout``: the size of the held-out part (``shapes_preference_held_out``)."""
    heldout_size(heldout, options.get("size"))  # a bad value fails when the set is built
    return processed_pairs(ShapesPairs(**options), processor)


def heldout_size(heldout: int | str, size: int | None) -> int:
    """``heldout`` pairs, or for ``auto`` a tenth of ``size`` within ``[1, 256]`` (256 without a size)."""
    if heldout == "auto":
        return 256 if size is None else min(256, max(1, int(size) // 10))
    if isinstance(heldout, bool) or not isinstance(heldout, int) or heldout < 1:
        raise ValueError(f"shapes_preference heldout={heldout!r}; expected a positive number of pairs or 'auto'")
    return heldout


def shapes_preference_held_out(spec: dict[str, Any]) -> dict[str, Any]:
    """The held-out part of a ``shapes_preference`` spec: its ``val`` split (other scenes: ``ShapesDataset`` seeds
    each split apart) of ``heldout`` pairs (``heldout_size``), the other options the same."""
    return {**spec, "split": "val", "size": heldout_size(spec.get("heldout", "auto"), spec.get("size"))}


shapes_preference.held_out = shapes_preference_held_out  # type: ignore[attr-defined]
