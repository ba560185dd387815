"""The canonical sample every reader produces and the processor consumes.

A ``Sample`` is a conversation: an ordered list of ``Message`` (role ``system`` | ``user`` | ``assistant``), each an
ordered list of parts. A part is either text (``str``) or an ``ImageRef`` pointing at ``sample.images[index]``.
Images are sources, not pixels: a path (resolved against the reader's image root), a ``PIL.Image.Image``, or a URL
(refused unless the user enabled fetching). Grounding boxes live in the text (Qwen-VL ``<ref>..</ref><box>..</box>``
or JSON ``{"bbox_2d": [...]}``); structured copies for evaluation may be kept in ``meta``.
"""
from __future__ import annotations

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


Part = Union[str, ImageRef]


@dataclass
class Message:
    role: str
    parts: list[Part]

    def text(self) -> str:
        """The message's text with images shown as ``<image>`` (for display and debugging)."""
        return "".join(p if isinstance(p, str) else "<image>" for p in self.parts)


@dataclass
class Sample:
    messages: list[Message]
    images: list[ImageSource] = field(default_factory=list)
    id: str | int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def image_refs(self) -> list[ImageRef]:
        return [p for m in self.messages for p in m.parts if isinstance(p, ImageRef)]

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
        return self
