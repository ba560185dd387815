"""ShareGPT / OpenAI-style messages.

``{"messages": [{"role": ..., "content": str | [parts]}], "images": [...]?}`` where a part is
``{"type": "text", "text": ...}``, ``{"type": "image", "image" | "path" | "url": src}``,
``{"type": "image_url", "image_url": {"url": src}}`` (OpenAI), or ``{"type": "image"}`` with no source, which takes
the next entry of the top-level ``images`` list. String content may hold ``<image>`` placeholders that also take
entries of ``images`` in order. ``from``/``value`` keys are accepted as aliases of ``role``/``content``. ``None``
fields (as Arrow fills them in HF datasets rows) are ignored.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vlm.data.readers.base import Reader, SampleError, as_list, message, split_placeholders
from vlm.data.readers.registry import register
from vlm.data.sample import ImageRef, Part, Sample

SOURCE_KEYS = ("image", "path", "url", "image_url")


@register("messages")
class MessagesReader(Reader):
    name = "messages"

    @classmethod
    def detect(cls, record: Mapping[str, Any]) -> bool:
        return isinstance(record.get("messages"), list)

    def parse(self, record: Mapping[str, Any]) -> Sample:
        msgs = record["messages"]
        if not msgs:
            raise SampleError("empty conversation", reason="empty")
        listed = as_list(record.get("images", record.get("image")))
        images: list[Any] = []  # sources in order of appearance
        n_listed = 0  # how many of ``listed`` were consumed

        def take_listed() -> ImageRef:
            nonlocal n_listed
            if n_listed >= len(listed):
                raise SampleError(f"more image placeholders than the {len(listed)} entries of 'images'",
                                reason="image_count")
            images.append(listed[n_listed])
            n_listed += 1
            return ImageRef(len(images) - 1)

        messages = []
        for m in msgs:
            role = m.get("role", m.get("from"))
            content = m.get("content", m.get("value"))
            parts: list[Part] = []
            if isinstance(content, str):
                pieces, _ = split_placeholders(content, self.image_token, 0)
                parts = [take_listed() if isinstance(p, ImageRef) else p for p in pieces]
            elif isinstance(content, list):
                for part in content:
                    parts.extend(self._part(part, images, take_listed))
            elif content is not None:
                raise SampleError(f"message content must be a string or a list of parts, got "
                                f"{type(content).__name__}", reason="format")
            messages.append(message(role, parts))
        if n_listed != len(listed):
            raise SampleError(f"{n_listed} image placeholder(s) but {len(listed)} image(s) in 'images'",
                            reason="image_count")
        return Sample(messages=messages, images=[self.image(s) for s in images], id=record.get("id"))

    @staticmethod
    def _part(part: Any, images: list[Any], take_listed: Any) -> list[Part]:
        if isinstance(part, str):
            return [part]
        if not isinstance(part, Mapping):
            raise SampleError(f"content part must be a mapping, got {type(part).__name__}", reason="format")
        kind = part.get("type")
        if kind == "text":
            return [part["text"]] if part.get("text") else []
        if kind in ("image", "image_url"):
            src = next((part[k] for k in SOURCE_KEYS if part.get(k) is not None), None)
            if isinstance(src, Mapping) and "url" in src and "bytes" not in src:  # OpenAI {"image_url": {"url"}}
                src = src["url"]
            if src is None:
                return [take_listed()]
            images.append(src)
            return [ImageRef(len(images) - 1)]
        raise SampleError(f"unknown content part type {kind!r}; expected 'text', 'image' or 'image_url'",
                        reason="format")
