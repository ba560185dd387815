"""Readers: one record format per module, registered by name in :data:`READERS`.

>>> from vlm.data.readers import READERS, detect_format, load_records, make_reader
>>> records = load_records("train.json")            # json / jsonl / parquet / save_to_disk dir / list
>>> reader = make_reader(detect_format(records[0]), image_folder="images/")
>>> sample = reader.convert(records[0], index=0)     # -> vlm.data.sample.Sample (validated)

Formats: ``llava``, ``qwen_vl``, ``query_response``, ``messages`` (ShareGPT / OpenAI). Add one by subclassing
:class:`Reader` with ``@register("name")`` in a new module imported below (see docs/data.md).
"""
from __future__ import annotations

from typing import Any

from vlm.data.readers import llava, messages, query_response, qwen_vl  # noqa: F401  (registration)
from vlm.data.readers.base import (
    ROLE_ALIASES,
    Reader,
    SampleError,
    canonical_role,
    locate,
    reason_of,
    split_placeholders,
)
from vlm.data.readers.records import JsonlRecords, load_records
from vlm.data.readers.registry import READERS, detect_format, get_reader, register


def make_reader(name: str, **options: Any) -> Reader:
    """Instantiate the reader registered as ``name`` with ``options`` (``image_folder``, ``allow_urls``, ...)."""
    return READERS.build({"name": name, **options})


__all__ = [
    "READERS",
    "ROLE_ALIASES",
    "JsonlRecords",
    "Reader",
    "SampleError",
    "canonical_role",
    "detect_format",
    "get_reader",
    "load_records",
    "locate",
    "make_reader",
    "reason_of",
    "register",
    "split_placeholders",
]
