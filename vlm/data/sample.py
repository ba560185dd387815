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

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A bad sample: names the sample (index and/or id), the file involved and the problem.

    ``reason`` is a short machine-readable key (``missing_image``, ``corrupt_image``, ``tiny_image``,
    ``image_count``, ``role_order``, ``empty``, ``too_long``, ``format``, ``url``, ...) used to count skipped
    samples by cause. Subclasses ``ValueError`` so callers catching ``ValueError`` keep working.
    """

    def __init__(self, problem: str, *, reason: str = "invalid", index: int | None = None,
                 sample_id: Any = None, file: str | None = None, source: str | None = None) -> None:
        self.problem, self.reason, self.index, self.sample_id = problem, reason, index, sample_id
        self.file, self.source = file, source
        where = []
        if source is not None:
            where.append(str(source))
        if index is not None:
            where.append(f"sample #{index}")
        if sample_id is not None:
            where.append(f"id={sample_id!r}")
        head = " ".join(where) or "sample"
        tail = f" (file: {file})" if file is not None else ""
        super().__init__(f"{head}: {problem}{tail}")

    def located(self, *, index: int | None = None, sample_id: Any = None, source: str | None = None) -> "DataError":
        """A copy with missing location fields filled in (used as the error travels up to the dataset)."""
        return DataError(self.problem, reason=self.reason,
                         index=self.index if self.index is not None else index,
                         sample_id=self.sample_id if self.sample_id is not None else sample_id,
                         file=self.file, source=self.source if self.source is not None else source)
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
        """Check roles, ordering and image references; raise ``ValueError`` naming the sample and the problem."""
        def fail(problem: str, reason: str) -> DataError:
            return DataError(problem, reason=reason, sample_id=self.id)

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
