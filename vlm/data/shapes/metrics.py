"""Scoring model answers on the ``shapes`` dataset.

- VQA (``vqa_*``), ``referring`` and ``multi_image_*``: exact match after normalization (lower case, punctuation and
  articles dropped, number words -> digits, ``grey`` -> ``gray``, ``first image``/``image 1`` -> ``first``).
- ``grounding``: Acc@IoU0.5 — the first box parsed from the prediction (Qwen-VL ``[0, 1000)`` -> pixels with
  ``to_pixels``, or JSON ``bbox_2d`` pixels) has IoU >= 0.5 with the ground-truth pixel box; no box scores 0.
  ``evaluate`` also reports the mean IoU as ``grounding/iou``.
- ``caption``: F1 between the sets of ``(colour, shape)`` pairs mentioned in the prediction and in the image.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Mapping, Sequence

from vlm.data import boxes
from vlm.data.shapes.scene import COLORS, SHAPES
from vlm.metrics import count_key

_NUMBERS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7",
            "eight": "8", "nine": "9", "ten": "10"}
_SYNONYMS = {"grey": "gray", "first image": "first", "image 1": "first", "1st": "first", "first one": "first",
             "second image": "second", "image 2": "second", "2nd": "second", "second one": "second"}
_PAIR_RE = re.compile(rf"\b({'|'.join(COLORS)})\s+({'|'.join(SHAPES)})(?:e?s)?\b")


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, map number words to digits and a few synonyms."""
    t = re.sub(r"[^\w\s]", " ", str(text).lower())
    words = [_NUMBERS.get(w, w) for w in t.split() if w not in ("a", "an", "the")]
    t = " ".join(words)
    for k, v in _SYNONYMS.items():
        t = re.sub(rf"\b{k}\b", v, t)
    return t.strip()


def _meta(sample: Any) -> Mapping[str, Any]:
    return sample if isinstance(sample, Mapping) else sample.meta


def caption_pairs(text: str) -> set[tuple[str, str]]:
    """``{(colour, shape), ...}`` mentioned in ``text``."""
    return set(_PAIR_RE.findall(str(text).lower()))


def grounding_iou(prediction: str, qa: Mapping[str, Any]) -> float:
    """IoU (pixels) of the first predicted box with ``qa["box"]``; 0 when no box can be parsed."""
    size = qa["image_size"]
    if qa.get("box_format", "qwen") == "json":
        found = boxes.parse_json(prediction, strict=False)
        box = found[0][1] if found else None
    else:
        found = boxes.parse(prediction, style=qa.get("box_style", "qwen"), strict=False)
        box = boxes.to_pixels(found[0][1], size, size) if found else None
    return 0.0 if box is None else boxes.iou(box, qa["box"])


def score_qa(prediction: str, qa: Mapping[str, Any]) -> float:
    """Score one answer against one turn's structured answer (``task``, ``answer``, ``box``, ...)."""
    task = qa["task"]
    if task == "grounding":
        return float(grounding_iou(prediction, qa) >= 0.5)
    if task == "caption":
        gt = {(s["color"], s["shape"]) for s in qa["shapes"]}
        pred = caption_pairs(prediction)
        tp = len(gt & pred)
        return 0.0 if tp == 0 else 2 * tp / (len(gt) + len(pred))
    return float(normalize_answer(prediction) == normalize_answer(qa["answer"]))


def _turns(meta: Mapping[str, Any]) -> list[dict]:
    shared = {k: meta[k] for k in ("image_size", "box_format", "box_style") if k in meta}
    shapes = meta["scenes"][0]["shapes"] if meta.get("scenes") else []
    return [{**shared, "shapes": shapes, **qa} for qa in meta["qa"]]


def score(task: str | None, prediction: str | Sequence[str], sample: Any) -> float:
    """Score ``prediction`` for ``sample`` (a ``Sample`` from ``ShapesDataset`` or its ``meta``). ``task`` must match
    the sample's task (``None``: take it from the sample). Multi-turn samples take one prediction per turn and return
    the mean."""
    meta = _meta(sample)
    if task is not None and task != meta["task"]:
        raise ValueError(f"task {task!r} does not match the sample's task {meta['task']!r}")
    turns = _turns(meta)
    preds = [prediction] if isinstance(prediction, str) else list(prediction)
    if len(preds) != len(turns):
        raise ValueError(f"sample {getattr(sample, 'id', None)!r} has {len(turns)} answer turn(s); got {len(preds)} "
                         f"prediction(s)")
    return sum(score_qa(p, t) for p, t in zip(preds, turns)) / len(turns)


def evaluate(predictions: Sequence[str | Sequence[str]], samples: Sequence[Any]) -> dict[str, float]:
    """Per-task mean scores (``vqa_color``, ``grounding``, ...), group means (``vqa``, ``multi_image``), ``all`` (mean
    over every scored turn), ``grounding/iou`` and counts ``<task>/n``. Multi-turn samples count each turn under its
    own task; their prediction is a list with one answer per turn."""
    if len(predictions) != len(samples):
        raise ValueError(f"{len(predictions)} predictions for {len(samples)} samples")
    from vlm.data.shapes.tasks import GROUPS

    per: dict[str, list[float]] = defaultdict(list)
    ious: list[float] = []
    for pred, sample in zip(predictions, samples):
        turns = _turns(_meta(sample))
        preds = [pred] if isinstance(pred, str) else list(pred)
        if len(preds) != len(turns):
            raise ValueError(f"sample {getattr(sample, 'id', None)!r} has {len(turns)} answer turn(s); got "
                             f"{len(preds)} prediction(s)")
        for p, t in zip(preds, turns):
            per[t["task"]].append(score_qa(p, t))
            if t["task"] == "grounding":
                ious.append(grounding_iou(p, t))
    out: dict[str, float] = {}
    for task, vals in sorted(per.items()):
        out[task] = sum(vals) / len(vals)
        out[count_key(task)] = len(vals)
    for group, members in GROUPS.items():
        vals = [v for m in members for v in per.get(m, [])]
        if vals:
            out[group] = sum(vals) / len(vals)
    every = [v for vals in per.values() for v in vals]
    if every:
        out["all"] = sum(every) / len(every)
    if ious:
        out["grounding/iou"] = sum(ious) / len(ious)
    return out
