"""The reader registry: ``@register("name")`` on a :class:`~vlm.data.readers.base.Reader` subclass."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vlm.data.readers.base import SampleError
from vlm.registry import Registry

READERS: Registry = Registry("reader")
register = READERS.register


def get_reader(name: str) -> type:
    """The reader class registered as ``name`` (exact); unknown names raise ``KeyError`` listing known ones."""
    return READERS.get(name)


def detect_format(record: Any) -> str:
    """The one registered format whose ``detect`` accepts ``record``; ``DataError`` if none or several do."""
    if not isinstance(record, Mapping):
        raise SampleError(f"cannot detect the format of a {type(record).__name__} record; expected a mapping",
                        reason="format")
    hits = [n for n in READERS.names() if READERS.get(n).detect(record)]
    if len(hits) != 1:
        what = "no" if not hits else f"several ({', '.join(hits)})"
        raise SampleError(f"{what} reader formats match a record with keys {sorted(record)}; known formats: "
                        f"{', '.join(READERS.names())}; pass format=... explicitly", reason="format")
    return hits[0]
