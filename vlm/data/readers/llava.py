"""LLaVA JSON: ``{"id", "image": path | [paths] | absent, "conversations": [{"from": "human"|"gpt", "value"}]}``.

``<image>`` in a ``value`` marks where the next image goes (images are numbered in order of appearance over the
whole conversation). Records without ``image`` are text-only. The number of placeholders must equal the number of
images (no silent insertion).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vlm.data.readers.base import Reader, SampleError, as_list, message, split_placeholders
from vlm.data.readers.registry import register
from vlm.data.sample import Sample


def _conversation_roles(record: Mapping[str, Any]) -> set[str]:
    return {str(t.get("from", "")).lower() for t in record.get("conversations") or [] if isinstance(t, Mapping)}


def _has_img_tags(record: Mapping[str, Any]) -> bool:
    return any("<img>" in str(t.get("value", "")) for t in record.get("conversations") or [] if isinstance(t, Mapping))


def is_qwen_vl(record: Mapping[str, Any]) -> bool:
    """Qwen-VL: ``conversations`` with ``<img>..</img>`` tags, or user/assistant roles and no ``image`` key."""
    if not isinstance(record.get("conversations"), list):
        return False
    if _has_img_tags(record):
        return True
    no_image = record.get("image") is None and record.get("images") is None
    return no_image and bool(_conversation_roles(record)) and _conversation_roles(record) <= {"user", "assistant",
                                                                                              "system"}


@register("llava")
class LlavaReader(Reader):
    name = "llava"

    @classmethod
    def detect(cls, record: Mapping[str, Any]) -> bool:
        return isinstance(record.get("conversations"), list) and not is_qwen_vl(record)

    def parse(self, record: Mapping[str, Any]) -> Sample:
        turns = record["conversations"]
        if not turns:
            raise SampleError("empty conversation", reason="empty")
        sources = as_list(record.get("image", record.get("images")))
        messages, n = [], 0
        for turn in turns:
            value = turn.get("value")
            if not isinstance(value, str):
                raise SampleError(f"turn 'value' must be a string, got {type(value).__name__}", reason="format")
            parts, n = split_placeholders(value, self.image_token, n)
            messages.append(message(turn.get("from"), parts))
        self.check_count(n, sources)
        return Sample(messages=messages, images=[self.image(s) for s in sources], id=record.get("id"))
