"""Questions and answers about shapes scenes, one function per task.

Single-image tasks (``ask(task, rng, scene, opts)``): ``caption``, ``vqa_color``, ``vqa_shape``, ``vqa_count``,
``vqa_position``, ``grounding``, ``referring``. Two-image tasks (``ask_pair``): ``multi_image_count``,
``multi_image_contains``. Groups: ``vqa`` = the four ``vqa_*``; ``multi_image`` = the two ``multi_image_*``.
Phrasing and answers are fixed per task (one template each) so a tiny model can learn them quickly.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from itertools import permutations
from typing import Any

from vlm.data import boxes
from vlm.data.shapes.scene import Scene, SceneConfig, make_scene

SINGLE_TASKS = ("caption", "vqa_color", "vqa_shape", "vqa_count", "vqa_position", "grounding", "referring")
MULTI_TASKS = ("multi_image_count", "multi_image_contains")
TASKS = SINGLE_TASKS + MULTI_TASKS
GROUPS = {"vqa": ("vqa_color", "vqa_shape", "vqa_count", "vqa_position"), "multi_image": MULTI_TASKS}
CAPTION_PROMPT = "Describe the image."
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
POSITION_MARGIN = 0.15  # centres must differ by this fraction of the image side along the asked axis


@dataclass
class QA:
    task: str
    question: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"task": self.task, "question": self.question, "answer": self.answer, **self.meta}


@dataclass(frozen=True)
class TaskOptions:
    box_format: str = "qwen"   # "qwen": <ref>..</ref><box>(x1,y1),(x2,y2)</box> in [0,1000); "json": bbox_2d pixels
    box_style: str = "qwen"    # Qwen-VL tags ("qwen") or Qwen2-VL special tokens ("qwen2"); qwen format only

    def __post_init__(self) -> None:
        if self.box_format not in ("qwen", "json"):
            raise ValueError(f"box_format must be 'qwen' or 'json'; got {self.box_format!r}")
        boxes._tags(self.box_style)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe(scene: Scene) -> str:
    """``"a red circle and a blue square on a gray background"`` — shapes listed left to right."""
    items = [f"{_article(s.color)} {s.name}" for s in sorted(scene.shapes, key=lambda s: (s.center, s.name))]
    body = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    return f"{body} on {_article(scene.background)} {scene.background} background"


def _box_answer(scene: Scene, shape, opts: TaskOptions, ref: str | None) -> str:
    if opts.box_format == "json":
        return boxes.format_json(shape.box, ref)
    return boxes.format(ref, boxes.from_pixels(shape.box, scene.size, scene.size), style=opts.box_style)


def ask(task: str, rng: random.Random, scene: Scene, opts: TaskOptions) -> QA | None:
    """One question about ``scene`` for a single-image ``task``; ``None`` when the scene cannot support it."""
    shapes = scene.shapes
    if task == "caption":
        return QA(task, CAPTION_PROMPT, describe(scene))
    if task == "vqa_count":
        return QA(task, "How many shapes are there?", str(len(shapes)))
    if task == "vqa_position":
        thr = POSITION_MARGIN * scene.size
        options = []
        for a, b in permutations(shapes, 2):
            (ax, ay), (bx, by) = a.center, b.center
            if abs(ax - bx) >= thr:
                options.append((a, b, "left of" if ax < bx else "right of"))
            if abs(ay - by) >= thr:
                options.append((a, b, "above" if ay < by else "below"))
        if not options:
            return None
        a, b, truth = rng.choice(options)
        yes = rng.random() < 0.5
        rel = truth if yes else _OPPOSITE[truth]
        return QA(task, f"Is the {a.name} {rel} the {b.name}?", "yes" if yes else "no",
                  {"relation": rel, "subject": a.name, "object": b.name})
    s = rng.choice(shapes)
    common = {"target": s.name, "box": list(s.box), "box_norm": list(boxes.from_pixels(s.box, scene.size, scene.size))}
    if task == "vqa_color":
        return QA(task, f"What color is the {s.shape}?", s.color, {"target": s.name})
    if task == "vqa_shape":
        return QA(task, f"What shape is {s.color}?", s.shape, {"target": s.name})
    if task == "grounding":
        return QA(task, f"Where is the {s.name}?", _box_answer(scene, s, opts, s.name), common)
    if task == "referring":
        return QA(task, f"What is in {_box_answer(scene, s, opts, None)}?", s.name, common)
    raise KeyError(f"unknown single-image task {task!r}; known: {SINGLE_TASKS}")


def ask_pair(task: str, rng: random.Random, cfg: SceneConfig) -> tuple[list[Scene], QA]:
    """Two new scenes and one comparison question about them."""
    if task == "multi_image_count":
        if cfg.min_shapes == cfg.max_shapes:
            raise ValueError("multi_image_count needs min_shapes < max_shapes (the two counts must differ)")
        na, nb = rng.sample(range(cfg.min_shapes, cfg.max_shapes + 1), 2)
        scenes = [make_scene(rng, cfg, n=na), make_scene(rng, cfg, n=nb)]
        return scenes, QA(task, "Which image has more shapes?", "the first" if na > nb else "the second",
                          {"counts": [na, nb]})
    if task == "multi_image_contains":
        t = rng.choice(list(cfg.shapes))
        yes = rng.random() < 0.5
        lacking = set() if yes else {0: {0}, 1: {1}, 2: {0, 1}}[rng.randrange(3)]
        scenes = [make_scene(rng, cfg, exclude=[t]) if i in lacking else make_scene(rng, cfg, include=[t])
                  for i in range(2)]
        return scenes, QA(task, f"Do both images contain {_article(t)} {t}?", "yes" if yes else "no", {"shape": t})
    raise KeyError(f"unknown two-image task {task!r}; known: {MULTI_TASKS}")
