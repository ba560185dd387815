"""query/response JSONL (ms-swift style, used for Qwen2.5-VL grounding SFT).

``{"image" | "images": path | [paths], "query": str, "response": str | JSON, "history": [[q, r], ...], "system"}``.
If the texts contain no ``<image>`` placeholder, all images are placed before the first user turn (the query when
there is no history); otherwise the placeholders must match the images in number. A non-string ``response`` (e.g.
``[{"bbox_2d": [x1, y1, x2, y2], "label": "cat"}]``) is serialized with ``json.dumps``.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from vlm.data.readers.base import Reader, SampleError, as_list, message, split_placeholders
from vlm.data.readers.registry import register
from vlm.data.sample import ImageRef, Sample


def _text(value: Any, key: str) -> str:
    if value is None:
        raise SampleError(f"missing {key!r}", reason="format")
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


@register("query_response")
class QueryResponseReader(Reader):
    name = "query_response"

    @classmethod
    def detect(cls, record: Mapping[str, Any]) -> bool:
        return "query" in record and "response" in record and "messages" not in record \
            and "conversations" not in record

    def parse(self, record: Mapping[str, Any]) -> Sample:
        pairs = [(_text(q, "history query"), _text(r, "history response")) for q, r in as_list(record.get("history"))]
        pairs.append((_text(record.get("query"), "query"), _text(record.get("response"), "response")))
        sources = as_list(record.get("images", record.get("image")))
        messages, n = [], 0
        if record.get("system"):
            messages.append(message("system", [str(record["system"])]))
        for q, r in pairs:
            parts, n = split_placeholders(q, self.image_token, n)
            messages.append(message("user", parts))
            parts, n = split_placeholders(r, self.image_token, n)
            messages.append(message("assistant", parts))
        if n == 0 and sources:  # no placeholders: images go before the first user text
            first_user = next(m for m in messages if m.role == "user")
            first_user.parts[:0] = [ImageRef(i) for i in range(len(sources))]
        else:
            self.check_count(n, sources)
        return Sample(messages=messages, images=[self.image(s) for s in sources], id=record.get("id"))
