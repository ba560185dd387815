"""ShareGPT / OpenAI-style messages.

``{"messages": [{"role": ..., "content": str | [parts]}], "images": [...]?}`` where a part is
``{"type": "text", "text": ...}``, ``{"type": "image", "image" | "path" | "url": src}``,
``{"type": "image_url", "image_url": {"url": src}}`` (OpenAI), or ``{"type": "image"}`` with no source, which takes
the next entry of the top-level ``images`` list. A video is ``{"type": "video", "video" | "path" | "url": src,
...options}`` (``src`` a file or a list of frames; options: ``vlm.data.video.PER_VIDEO``, e.g. ``fps``,
``max_pixels``) or ``{"type": "video"}`` taking the next entry of the top-level ``videos`` list. String content may
hold ``<image>`` placeholders that also take entries of ``images`` in order (and, when the record has ``videos``,
``<video>`` placeholders taking its entries). ``from``/``value`` keys are accepted as
aliases of ``role``/``content``. ``None`` fields (as Arrow fills them in HF datasets rows) are ignored.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vlm.data.readers.base import Reader, SampleError, as_list, message, split_placeholders, split_videos
from vlm.data.readers.registry import register
from vlm.data.sample import ImageRef, Part, Sample, VideoRef
from vlm.data.video import PER_VIDEO as VIDEO_OPTIONS

SOURCE_KEYS = ("image", "path", "url", "image_url")
VIDEO_SOURCE_KEYS = ("video", "path", "url")


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

        listed_videos = as_list(record.get("videos"))
        videos: list[Any] = []  # Video objects in order of appearance
        n_videos = 0

        def add_video(part: Mapping[str, Any]) -> VideoRef:
            nonlocal n_videos
            src = next((part[k] for k in VIDEO_SOURCE_KEYS if part.get(k) is not None), None)
            bad = set(part) - {"type", *VIDEO_SOURCE_KEYS, *VIDEO_OPTIONS}
            if bad:
                raise SampleError(f"video part has unknown key(s) {sorted(bad)}; accepted: a source "
                                  f"{list(VIDEO_SOURCE_KEYS)} and options {list(VIDEO_OPTIONS)}", reason="format")
            if src is None:
                if n_videos >= len(listed_videos):
                    raise SampleError(f"more video placeholders than the {len(listed_videos)} entries of 'videos'",
                                      reason="video_count")
                src = listed_videos[n_videos]
                n_videos += 1
            options = {k: part[k] for k in VIDEO_OPTIONS if part.get(k) is not None}
            videos.append(self.video(src, options))
            return VideoRef(len(videos) - 1)

        messages = []
        for m in msgs:
            role = m.get("role", m.get("from"))
            content = m.get("content", m.get("value"))
            parts: list[Part] = []
            if isinstance(content, str):
                pieces, _ = split_placeholders(content, self.image_token, 0)
                parts = [take_listed() if isinstance(p, ImageRef) else p for p in pieces]
                if "videos" in record:  # ms-swift style: <video> placeholders take entries of `videos`
                    pieces, _ = split_videos(parts, self.video_token, 0)
                    parts = [add_video({"type": "video"}) if isinstance(p, VideoRef) else p for p in pieces]
            elif isinstance(content, list):
                for part in content:
                    if isinstance(part, Mapping) and part.get("type") == "video":
                        parts.append(add_video(part))
                    else:
                        parts.extend(self._part(part, images, take_listed))
            elif content is not None:
                raise SampleError(f"message content must be a string or a list of parts, got "
                                f"{type(content).__name__}", reason="format")
            messages.append(message(role, parts))
        if n_listed != len(listed):
            raise SampleError(f"{n_listed} image placeholder(s) but {len(listed)} image(s) in 'images'",
                            reason="image_count")
        if n_videos != len(listed_videos):
            raise SampleError(f"{n_videos} video placeholder(s) but {len(listed_videos)} video(s) in 'videos'",
                              reason="video_count")
        return Sample(messages=messages, images=[self.image(s) for s in images], id=record.get("id"), videos=videos)

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
        raise SampleError(f"unknown content part type {kind!r}; expected 'text', 'image', 'image_url' or 'video'",
                        reason="format")
