"""The naming convention of evaluation metrics, stated once.

A metrics dict maps names to numbers: scores (``vqa_color``, ``grounding/iou``), each score group's sample count
under ``count_key(name)`` (``vqa_color/n``) and bookkeeping (``INFO_KEYS``: seconds taken, samples not evaluated).
"""
from __future__ import annotations

from collections.abc import Mapping

COUNT_SUFFIX = "/n"
INFO_KEYS = ("eval_seconds", "eval_dropped")


def count_key(name: str) -> str:
    """The key of ``name``'s sample count."""
    return f"{name}{COUNT_SUFFIX}"


def is_count(key: str) -> bool:
    return key.endswith(COUNT_SUFFIX)


def score_keys(metrics: Mapping[str, float]) -> list[str]:
    """The score keys of ``metrics`` in their order: neither counts nor bookkeeping."""
    return [k for k in metrics if not is_count(k) and k not in INFO_KEYS]
