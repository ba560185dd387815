"""Errors raised by the data pipeline.

``DataError`` is a ``ValueError`` so callers that already guard against bad values catch it; its message always names
what is known of the sample id, the file and the problem, e.g.
``sample 'coco/42': image 'train/42.jpg': cannot identify image file``.

Each error carries its ``reason`` (the key skipped samples are counted by): ``DataError`` subclasses state it for
their kind of failure (``MissingImage``, ``CorruptImage``, ...), raised where the failure is detected; a plain
``DataError`` takes ``reason=`` (default ``invalid``).
"""
from __future__ import annotations

import os
from typing import Any


class DataError(ValueError):
    """A record, image or box that cannot be used.

    Attributes: ``problem`` (str), ``sample_id`` (or ``None``), ``file`` (path/URL string, or ``None``), ``reason``
    (the cause key: the class's own, or ``reason=``), ``media`` (what ``file`` is, named in the message: ``image``
    or ``video``).
    """

    reason: str = "invalid"
    media: str = "image"

    def __init__(self, problem: str, *, sample_id: Any = None, file: str | os.PathLike | None = None,
                 reason: str | None = None, media: str | None = None) -> None:
        if reason is not None:
            self.reason = reason
        if media is not None:
            self.media = media
        self.problem = problem
        self.sample_id = sample_id
        self.file = None if file is None else str(file)
        where = []
        if sample_id is not None:
            where.append(f"sample {sample_id!r}")
        if self.file is not None:
            where.append(f"{self.media} {self.file!r}")
        super().__init__(": ".join(where + [problem]))

    def __reduce__(self):  # keep picklable across DataLoader workers (keyword-only args)
        return (_rebuild, (type(self), self.problem, self.sample_id, self.file, self.reason, self.media))


def _rebuild(cls: type[DataError], problem: str, sample_id: Any, file: str | None, reason: str,
             media: str = "image") -> DataError:
    return cls(problem, sample_id=sample_id, file=file, reason=reason, media=media)


class MissingImage(DataError):
    """An image file that does not exist (or is a directory)."""

    reason = "missing_image"


class CorruptImage(DataError):
    """An image that exists but cannot be decoded (truncated, not an image, a bad data URI, ...)."""

    reason = "corrupt_image"


class UnreadableImage(DataError):
    """An image file the process may not read (permissions)."""

    reason = "unreadable_image"


class TinyImage(DataError):
    """An image with a side shorter than the minimum (zero-size, 1x1, ...)."""

    reason = "tiny_image"


class URLRefused(DataError):
    """An ``http(s)`` image while fetching URLs is disabled."""

    reason = "url"


class MissingVideo(DataError):
    """A video file (or a frame of a video given as frames) that does not exist."""

    reason = "missing_video"
    media = "video"


class CorruptVideo(DataError):
    """A video that exists but cannot be decoded (not a video, truncated, no video stream, ...)."""

    reason = "corrupt_video"
    media = "video"


class EmptyVideo(DataError):
    """A video with no frames (an empty frame list, a file whose stream decodes to nothing)."""

    reason = "empty_video"
    media = "video"


#: what opening an image raised -> the error it becomes (first ``isinstance`` match; anything else is corrupt)
OPEN_ERRORS: tuple[tuple[type[BaseException], type[DataError]], ...] = (
    (FileNotFoundError, MissingImage), (IsADirectoryError, MissingImage), (NotADirectoryError, MissingImage),
    (PermissionError, UnreadableImage),
)


def open_error(err: BaseException) -> type[DataError]:
    """The ``DataError`` class for an exception raised while opening or decoding an image (by type)."""
    return next((cls for exc, cls in OPEN_ERRORS if isinstance(err, exc)), CorruptImage)
