"""``ShapesDataset``: the built-in procedurally generated dataset (no files, no network).

Sample ``i`` of split ``s`` depends only on ``(seed, s, i)`` and the configuration: its RNG is
``random.Random(sha256(f"vlm.shapes/{seed}/{s}/{i}"))``, so it is identical on every call, process and machine, and
the train/val/test streams never share a seed.
"""
from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping
from typing import Any, Sequence

from torch.utils.data import Dataset

from vlm.data.sample import ImageRef, Message, Sample
from vlm.data.shapes import metrics
from vlm.data.shapes.scene import DEFAULT_SHAPES, SceneConfig, make_scene, BACKGROUNDS, COLORS
from vlm.data.shapes.tasks import GROUPS, MULTI_TASKS, QA, SINGLE_TASKS, TASKS, TaskOptions, ask, ask_pair

SPLITS = {"train": "train", "val": "val", "validation": "val", "test": "test"}
DEFAULT_SIZES = {"train": 20000, "val": 500, "test": 1000}
DEFAULT_TASKS = {"caption": 1.0, "vqa": 4.0, "grounding": 2.0, "referring": 1.0, "multi_image": 1.0}


def sample_seed(seed: int, split: str, index: int) -> int:
    """The per-sample seed: stable across Python versions, processes and machines (no ``hash()``)."""
    return int.from_bytes(hashlib.sha256(f"vlm.shapes/{seed}/{split}/{index}".encode()).digest()[:8], "little")


def task_weights(tasks: str | Sequence[str] | Mapping[str, float] | None) -> dict[str, float]:
    """Normalize ``tasks`` (a name, a list of names or ``{name: weight}``; group names ``vqa`` and ``multi_image``
    spread their weight evenly over their members) to ``{task: weight}`` over concrete tasks."""
    if tasks is None:
        tasks = DEFAULT_TASKS
    if isinstance(tasks, str):
        tasks = {tasks: 1.0}
    elif not isinstance(tasks, Mapping):
        tasks = {t: 1.0 for t in tasks}
    out: dict[str, float] = {}
    for name, w in dict(tasks).items():
        w = float(w)
        if w < 0:
            raise ValueError(f"task weight for {name!r} is negative ({w})")
        members = GROUPS.get(name, (name,))
        for m in members:
            if m not in TASKS:
                raise KeyError(f"unknown shapes task {name!r}; known: {', '.join(TASKS + tuple(GROUPS))}")
            out[m] = out.get(m, 0.0) + w / len(members)
    out = {k: v for k, v in out.items() if v > 0}
    if not out:
        raise ValueError("no task has a positive weight")
    return out


class ShapesDataset(Dataset):
    """Map-style dataset of ``Sample`` (images as in-memory ``PIL`` RGB, rendered in ``__getitem__``).

    Args:
        split: ``train`` | ``val`` (``validation``) | ``test``.
        size: number of samples (default 20000 / 500 / 1000 for train / val / test).
        tasks: task name, list, or ``{task_or_group: weight}`` (see ``vlm.data.shapes.tasks``); default
            ``DEFAULT_TASKS``. Each sample draws its task from these weights.
        image_size: side of the square images in pixels.
        seed: base seed; change it for a different (still deterministic) dataset.
        shapes, colors, backgrounds: vocabularies (subsets of ``SHAPES``, ``COLORS``, ``BACKGROUNDS``).
        min_shapes, max_shapes: shapes per image (distinct types and colours, so at most ``len(shapes)``).
        layout: ``grid`` (one shape per cell of a ``grid x grid`` lattice; easy, the default) or ``free``.
        noise, gradient: background texture strength in 0..255 units (0 = plain).
        box_format: ``qwen`` (``<ref>..</ref><box>(x1,y1),(x2,y2)</box>``, ``[0, 1000)``) or ``json``
            (``{"bbox_2d": [...], "label": ...}`` in pixels of this image); ``box_style``: ``qwen`` | ``qwen2`` tags.
        turns: question/answer turns per single-image sample (> 1 asks several distinct questions about one image;
            two-image tasks stay single-turn).

    ``sample.meta``: ``task`` (``multi_turn`` when ``turns > 1``), ``question``, ``answer``, task fields (``box``
    pixels and ``box_norm`` for grounding/referring, ``target``, ...), ``qa`` (one dict per turn), ``scenes``
    (background and shapes with pixel boxes per image), ``image_size``, ``box_format``, ``box_style``, ``split``,
    ``index``.
    """

    def __init__(self, split: str = "train", size: int | None = None,
                 tasks: str | Sequence[str] | Mapping[str, float] | None = None, image_size: int = 64, seed: int = 0,
                 *, shapes: Sequence[str] = DEFAULT_SHAPES, colors: Sequence[str] = tuple(COLORS),
                 backgrounds: Sequence[str] = tuple(BACKGROUNDS), min_shapes: int = 1, max_shapes: int = 4,
                 layout: str = "grid", grid: int = 3, noise: float = 0.0, gradient: float = 0.0,
                 box_format: str = "qwen", box_style: str = "qwen", turns: int = 1) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
        self.split = SPLITS[split]
        self.size = DEFAULT_SIZES[self.split] if size is None else int(size)
        if self.size < 0:
            raise ValueError(f"size must be >= 0; got {size}")
        self.seed = int(seed)
        self.weights = task_weights(tasks)
        self.scene_cfg = SceneConfig(size=int(image_size), shapes=tuple(shapes), colors=tuple(colors),
                                     backgrounds=tuple(backgrounds), min_shapes=int(min_shapes),
                                     max_shapes=int(max_shapes), layout=layout, grid=int(grid), noise=float(noise),
                                     gradient=float(gradient))
        self.options = TaskOptions(box_format=box_format, box_style=box_style)
        if turns < 1:
            raise ValueError(f"turns must be >= 1; got {turns}")
        self.turns = int(turns)
        if "multi_image_count" in self.weights and min_shapes == max_shapes:
            raise ValueError("multi_image_count needs min_shapes < max_shapes")
        self._names = list(self.weights)
        self._w = [self.weights[k] for k in self._names]
        self._single_names = [k for k in self._names if k in SINGLE_TASKS]
        self._single_w = [self.weights[k] for k in self._single_names]

    @property
    def image_size(self) -> int:
        return self.scene_cfg.size

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return (f"ShapesDataset(split={self.split!r}, size={self.size}, image_size={self.image_size}, "
                f"seed={self.seed}, tasks={self.weights}, turns={self.turns})")

    def __getitem__(self, index: int) -> Sample:
        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} samples")
        rng = random.Random(sample_seed(self.seed, self.split, index))
        task = rng.choices(self._names, self._w)[0]
        if task in MULTI_TASKS:
            scenes, qa = ask_pair(task, rng, self.scene_cfg)
            qas = [qa]
        else:
            scenes = [make_scene(rng, self.scene_cfg, min_n=2 if task == "vqa_position" else None)]
            qas = [ask(task, rng, scenes[0], self.options)]
            for _ in range(10 * (self.turns - 1)):
                if len(qas) >= self.turns:
                    break
                extra = ask(rng.choices(self._single_names, self._single_w)[0], rng, scenes[0], self.options)
                if extra is not None and all(extra.question != q.question for q in qas):
                    qas.append(extra)
        return self._sample(index, scenes, qas)

    def _sample(self, index: int, scenes: list, qas: list[QA]) -> Sample:
        if len(scenes) == 1:
            head: list = [ImageRef(0), "\n"]
        else:
            head = []
            for i in range(len(scenes)):
                head += [f"Image {i + 1}: " if i == 0 else f"\nImage {i + 1}: ", ImageRef(i)]
            head.append("\n")
        messages = []
        for k, qa in enumerate(qas):
            parts = head + [qa.question] if k == 0 else [qa.question]
            messages += [Message("user", parts), Message("assistant", [qa.answer])]
        meta: dict[str, Any] = {
            "task": qas[0].task if len(qas) == 1 else "multi_turn",
            "qa": [qa.as_dict() for qa in qas],
            "scenes": [{"background": s.background, "shapes": [x.as_dict() for x in s.shapes]} for s in scenes],
            "image_size": self.image_size, "box_format": self.options.box_format,
            "box_style": self.options.box_style, "split": self.split, "index": index,
        }
        if len(qas) == 1:
            meta.update({k: v for k, v in qas[0].as_dict().items() if k != "task"})
        return Sample(messages=messages, images=[s.render() for s in scenes], id=f"shapes/{self.split}/{index}",
                      meta=meta)

    @staticmethod
    def evaluate(predictions: Sequence[str | Sequence[str]], samples: Sequence[Any]) -> dict[str, float]:
        """See ``vlm.data.shapes.metrics.evaluate``."""
        return metrics.evaluate(predictions, samples)

    @staticmethod
    def score(task: str | None, prediction: str | Sequence[str], sample: Any) -> float:
        """See ``vlm.data.shapes.metrics.score``."""
        return metrics.score(task, prediction, sample)


def build_shapes(**cfg: Any) -> ShapesDataset:
    """Build a ``ShapesDataset`` from config keys (``split``, ``size``, ``tasks``, ``image_size``, ``seed``, ...);
    a ``name: shapes`` key is accepted and ignored, so a Hydra data node can be passed as is."""
    cfg = dict(cfg)
    name = cfg.pop("name", "shapes")
    if name != "shapes":
        raise ValueError(f"build_shapes got name={name!r}")
    if "tasks" in cfg and cfg["tasks"] is not None and not isinstance(cfg["tasks"], (str, Mapping)):
        cfg["tasks"] = list(cfg["tasks"])
    return ShapesDataset(**cfg)
