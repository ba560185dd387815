"""The canonical sample every reader produces and the processor consumes.

A ``Sample`` is a conversation: an ordered list of ``Message`` (role ``system`` | ``user`` | ``assistant``), each an
ordered list of parts. A part is text (``str``), an ``ImageRef`` pointing at ``sample.images[index]`` or a
``VideoRef`` pointing at ``sample.videos[index]``. Images are sources, not pixels: a path (resolved against the
reader's image root), a ``PIL.Image.Image``, or a URL (refused unless the user enabled fetching). A video is a
``Video``: a file path or a list of frame sources (each an image source), with per-video sampling options; it is
decoded and sampled by ``vlm.data.video.VideoProcessor``. Grounding boxes live in the text (Qwen-VL
``<ref>..</ref><box>..</box>`` or JSON ``{"bbox_2d": [...]}``); structured copies for evaluation may be kept in
``meta``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Union

from PIL import Image

from vlm.data.errors import DataError

ROLES = ("system", "user", "assistant")
ImageSource = Union[str, Image.Image]


@dataclass(frozen=True)
class ImageRef:
    """A placeholder for ``sample.images[index]`` inside a message."""

    index: int


@dataclass(frozen=True)
class VideoRef:
    """A placeholder for ``sample.videos[index]`` inside a message."""

    index: int


@dataclass
class Video:
    """One video of a sample. ``source``: a file path (``str``, resolved like image paths; decoded with PyAV), its
    bytes (``bytes`` or an HF ``{"bytes", "path"}`` dict) or the frames in order (a list of image sources: paths,
    ``PIL`` images, ...). ``options``: per-video overrides of the
    ``VideoProcessor``'s sampling and budget (``fps``, ``num_frames``, ``min_frames``, ``max_frames``,
    ``min_pixels``, ``max_pixels``, ``total_pixels``, ``frame_rate``), checked when it is processed."""

    source: str | bytes | dict | Sequence[ImageSource]
    options: dict[str, Any] = field(default_factory=dict)


Part = Union[str, ImageRef, VideoRef]


@dataclass
class Message:
    role: str
    parts: list[Part]

    def text(self) -> str:
        """The message's text with images shown as ``<image>`` and videos as ``<video>`` (for display and
        debugging)."""
        return "".join(p if isinstance(p, str) else "<video>" if isinstance(p, VideoRef) else "<image>"
                       for p in self.parts)


@dataclass
class Sample:
    messages: list[Message]
    images: list[ImageSource] = field(default_factory=list)
    id: str | int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    videos: list[Video] = field(default_factory=list)

    def image_refs(self) -> list[ImageRef]:
        return [p for m in self.messages for p in m.parts if isinstance(p, ImageRef)]

    def video_refs(self) -> list[VideoRef]:
        return [p for m in self.messages for p in m.parts if isinstance(p, VideoRef)]

    def validate(self) -> "Sample":
        """Check roles, ordering and image references; raise ``DataError`` (a ``ValueError``) naming the sample and
        the problem (its ``reason`` attribute says which check failed)."""
        def fail(problem: str, reason: str) -> DataError:
            return DataError(problem, sample_id=self.id, reason=reason)  # counted by cause when samples are skipped

        if not self.messages:
            raise fail("empty conversation", "empty")
        for i, m in enumerate(self.messages):
            if m.role not in ROLES:
                raise fail(f"message {i} has role {m.role!r}; expected one of {ROLES}", "role")
            if m.role == "system" and i != 0:
                raise fail(f"system message at position {i}; it may only come first", "role_order")
        turns = [m.role for m in self.messages if m.role != "system"]
        for i, r in enumerate(turns):
            expected = "user" if i % 2 == 0 else "assistant"
            if r != expected:
                raise fail(f"roles out of order at turn {i}: got {r!r}, expected {expected!r} "
                           f"(turns must alternate user, assistant, ... starting with user)", "role_order")
        refs = self.image_refs()
        used = sorted(r.index for r in refs)
        if used != list(range(len(self.images))):
            raise fail(f"{len(refs)} image placeholder(s) reference indices {used} but {len(self.images)} image(s) "
                       f"were given; each image must be referenced exactly once", "image_count")
        vrefs = self.video_refs()
        used = sorted(r.index for r in vrefs)
        if used != list(range(len(self.videos))):
            raise fail(f"{len(vrefs)} video placeholder(s) reference indices {used} but {len(self.videos)} video(s) "
                       f"were given; each video must be referenced exactly once", "video_count")
        for i, v in enumerate(self.videos):
            if not isinstance(v, Video):
                raise fail(f"video {i} is a {type(v).__name__}; expected a vlm.data.sample.Video", "format")
        return self
