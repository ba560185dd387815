"""Qwen-VL JSON: ``{"conversations": [{"from": "user"|"assistant", "value": "Picture 1: <img>p.jpg</img>\\n..."}]}``.

Each ``<img>path</img>`` becomes an image (several per turn and across turns allowed), in order of appearance. The
surrounding text (``Picture 1: ``) stays; the template decides whether ``<img>``/``</img>`` markers are re-added
around the image tokens. Grounding text ``<ref>..</ref><box>(x1,y1),(x2,y2)</box>`` stays in the text untouched.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from vlm.data.readers.base import Reader, SampleError, message
from vlm.data.readers.llava import is_qwen_vl
from vlm.data.readers.registry import register
from vlm.data.sample import ImageRef, Part, Sample

IMG_RE = re.compile(r"<img>(.*?)</img>", re.DOTALL)


@register("qwen_vl")
class QwenVLReader(Reader):
    name = "qwen_vl"

    @classmethod
    def detect(cls, record: Mapping[str, Any]) -> bool:
        return is_qwen_vl(record)

    def parse(self, record: Mapping[str, Any]) -> Sample:
        turns = record["conversations"]
        if not turns:
            raise SampleError("empty conversation", reason="empty")
        messages, images = [], []
        for turn in turns:
            value = turn.get("value")
            if not isinstance(value, str):
                raise SampleError(f"turn 'value' must be a string, got {type(value).__name__}", reason="format")
            parts: list[Part] = []
            pos = 0
            for m in IMG_RE.finditer(value):
                if m.start() > pos:
                    parts.append(value[pos:m.start()])
                parts.append(ImageRef(len(images)))
                images.append(self.image(m.group(1).strip()))
                pos = m.end()
            if pos < len(value):
                parts.append(value[pos:])
            messages.append(message(turn.get("from"), parts))
        return Sample(messages=messages, images=images, id=record.get("id"))
