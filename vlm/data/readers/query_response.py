"""query/response JSONL (ms-swift style, used for Qwen2.5-VL grounding SFT).

``{"image" | "images": path | [paths], "videos": [video, ...], "query": str, "response": str | JSON, "history": [[q,
r], ...], "system"}``. If the texts contain no ``<image>`` placeholder, all images are placed before the first user
turn (the query when there is no history); otherwise the placeholders must match the images in number. Videos (a file
or a list of frames each) follow the same rule with ``<video>`` placeholders, after the images. A non-string ``response`` (e.g.
``[{"bbox_2d": [x1, y1, x2, y2], "label": "cat"}]``) is serialized with ``json.dumps``.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from vlm.data.readers.base import Reader, SampleError, as_list, message, split_placeholders, split_videos
from vlm.data.readers.registry import register
from vlm.data.sample import ImageRef, Sample, VideoRef


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
        videos = as_list(record.get("videos"))
        messages, n, nv = [], 0, 0
        if record.get("system"):
            messages.append(message("system", [str(record["system"])]))
        for q, r in pairs:
            for role, text in (("user", q), ("assistant", r)):
                parts, n = split_placeholders(text, self.image_token, n)
                if videos:
                    parts, nv = split_videos(parts, self.video_token, nv)
                messages.append(message(role, parts))
        first_user = next(m for m in messages if m.role == "user")
        if nv == 0 and videos:  # no placeholders: videos go before the first user text
            first_user.parts[:0] = [VideoRef(i) for i in range(len(videos))]
        elif nv != len(videos):
            raise SampleError(f"{nv} {self.video_token} placeholder(s) in the text but {len(videos)} video(s) given",
                              reason="video_count")
        if n == 0 and sources:  # no placeholders: images go before the first user text (and its videos)
            first_user.parts[:0] = [ImageRef(i) for i in range(len(sources))]
        else:
            self.check_count(n, sources)
        return Sample(messages=messages, images=[self.image(s) for s in sources], id=record.get("id"),
                      videos=[self.video(v) for v in videos])
