"""Reader base class and the helpers every format shares.

A reader converts one *record* (a ``dict`` as stored in a JSON/JSONL/parquet file or an HF ``datasets`` row) into
the canonical :class:`~vlm.data.sample.Sample`. Readers do no image decoding: image sources are kept as paths
(resolved against ``image_folder``), ``PIL`` images (HF ``Image`` columns, ``data:`` URIs, inline bytes) or URLs
(refused unless ``allow_urls=True``; the processor fetches them). Every problem is a
:class:`SampleError` (a ``vlm.data.errors.DataError``) naming the sample (index and id), the file and the problem.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from PIL import Image

from vlm.data.errors import DataError
from vlm.data.sample import ImageRef, ImageSource, Message, Part, Sample, Video, VideoRef

#: Role spellings found in the wild, mapped to the canonical ``system`` | ``user`` | ``assistant``.
ROLE_ALIASES: dict[str, str] = {
    "system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
    "model": "assistant", "bot": "assistant", "chatgpt": "assistant",
}
URL_RE = re.compile(r"^https?://", re.IGNORECASE)


class SampleError(DataError):
    """A ``DataError`` that also knows *where* (data file ``source``, record ``index``) and *why* (``reason``).

    ``reason`` is a short key used to count skipped samples by cause: ``missing_image``, ``corrupt_image``,
    ``unreadable_image``, ``tiny_image``, ``url``, ``outside_root``, ``image_count``, ``role``, ``role_order``, ``empty``, ``format``, ``too_long``,
    ``no_labels``, ... The message reads ``<source>: sample #<index> (id <id>): image '<file>': <problem>``.
    """

    def __init__(self, problem: str, *, reason: str | None = None, index: int | None = None, sample_id: Any = None,
                 file: str | os.PathLike | None = None, source: str | None = None, media: str | None = None) -> None:
        super().__init__(problem, sample_id=sample_id, file=file, reason=reason, media=media)
        self.index, self.source = index, source
        where = [] if source is None else [str(source)]
        who = [] if index is None else [f"sample #{index}"]
        if sample_id is not None and sample_id != index:
            who.append(f"(id {sample_id!r})" if who else f"sample {sample_id!r}")
        where += [" ".join(who)] if who else []
        where += [] if self.file is None else [f"{self.media} {self.file!r}"]
        self.args = (": ".join(where + [problem]),)

    def __reduce__(self):  # picklable across DataLoader workers
        return (_rebuild, (type(self), self.problem, self.reason, self.index, self.sample_id, self.file, self.source,
                           self.media))


def _rebuild(cls: type, problem: str, reason: str, index: Any, sample_id: Any, file: Any, source: Any,
             media: str = "image") -> SampleError:
    return cls(problem, reason=reason, index=index, sample_id=sample_id, file=file, source=source, media=media)


class SampleDropped(SampleError):
    """A sample the processor drops by policy (e.g. too long to truncate without cutting an image).

    Datasets always skip and count these, whatever their ``skip_bad`` setting."""


def reason_of(err: BaseException) -> str:
    """The cause key of an error: a ``DataError``'s ``reason`` (stated by its class or given), else ``invalid``."""
    return getattr(err, "reason", None) or "invalid"


def locate(err: DataError, *, index: int | None = None, sample_id: Any = None,
           source: str | None = None) -> SampleError:
    """``err`` as a ``SampleError`` (or its own ``SampleError`` subclass) with missing location fields filled in
    (keeps problem, file and reason)."""
    def pick(name: str, value: Any) -> Any:
        own = getattr(err, name, None)
        return own if own is not None else value

    cls = type(err) if isinstance(err, SampleError) else SampleError
    return cls(getattr(err, "problem", str(err)), reason=reason_of(err), index=pick("index", index),
                       sample_id=pick("sample_id", sample_id), file=getattr(err, "file", None),
                       source=pick("source", source), media=getattr(err, "media", None))


def canonical_role(role: Any) -> str:
    """``role`` as ``system`` | ``user`` | ``assistant`` (``ROLE_ALIASES``, case-insensitive). Raises ``SampleError``
    (reason ``role``) naming the role and the accepted ones (the reader adds the file and the sample)."""
    if not isinstance(role, str) or role.lower() not in ROLE_ALIASES:
        canonical = sorted(set(ROLE_ALIASES.values()))
        aliases = sorted(k for k in ROLE_ALIASES if k not in canonical)
        what = "no role" if role is None else f"unknown role {role!r}"
        raise SampleError(f"{what} in a message; expected one of {', '.join(canonical)} (or an alias: "
                          f"{', '.join(aliases)})", reason="role")
    return ROLE_ALIASES[role.lower()]


def split_placeholders(text: str, token: str, first_index: int) -> tuple[list[Part], int]:
    """Split ``text`` on ``token`` into text parts and ``ImageRef``s numbered from ``first_index``.

    Returns ``(parts, next_index)``; empty text pieces are dropped.
    """
    return split_refs([text], token, ImageRef, first_index)


def split_videos(parts: list[Part], token: str, first_index: int) -> tuple[list[Part], int]:
    """Split the text parts of ``parts`` on ``token`` (``<video>``) into text and ``VideoRef``s numbered from
    ``first_index``; other parts are kept. Returns ``(parts, next_index)``; empty text pieces are dropped."""
    return split_refs(parts, token, VideoRef, first_index)


def split_refs(parts: list[Part], token: str, ref: Any, first_index: int) -> tuple[list[Part], int]:
    """Split the text parts of ``parts`` on ``token`` into text and ``ref(index)`` parts numbered from
    ``first_index`` (other parts kept, empty text pieces dropped); returns ``(parts, next_index)``."""
    out: list[Part] = []
    index = first_index
    for part in parts:
        if not isinstance(part, str):
            out.append(part)
            continue
        for i, piece in enumerate(part.split(token)):
            if i > 0:
                out.append(ref(index))
                index += 1
            if piece:
                out.append(piece)
    return out, index


def as_list(value: Any) -> list[Any]:
    """``None``/``""`` -> ``[]``, a scalar -> ``[value]``, a list/tuple -> a list (``None``/``""`` entries dropped)."""
    if value is None or (isinstance(value, str) and not value):
        return []
    if isinstance(value, (list, tuple)):
        return [v for v in value if v is not None and not (isinstance(v, str) and not v)]
    return [value]


class Reader:
    """Base class: subclasses implement :meth:`detect` and :meth:`parse`.

    Args:
        image_folder: root that relative image paths are resolved against.
        allow_urls: keep ``http(s)://`` image sources (fetched later by the processor, with a timeout); when
            ``False`` (default) a sample with a URL raises a ``DataError`` naming it.
        check_files: ``stat`` local image paths at conversion time so a missing file is reported by the reader
            (corrupt or tiny images are detected when the processor decodes them).
        allow_outside_root: read local image paths that lead outside ``image_folder`` (``../x.png``, an absolute
            path elsewhere, a symlink pointing out of it); when ``False`` (default) such a sample raises a
            ``DataError`` (reason ``outside_root``) naming it. Without an ``image_folder`` nothing is checked.
        image_token: the placeholder string that marks an image inside message text (LLaVA-style formats).
        source: a name for the data file, used in error messages.
    """

    name: str = "base"
    #: the record key holding the sample id (named in errors; the index is used when absent)
    id_key: str = "id"
    #: the placeholder marking a video inside message text (formats with a top-level ``videos`` list)
    video_token: str = "<video>"

    def __init__(self, image_folder: str | os.PathLike | None = None, allow_urls: bool = False,
                 check_files: bool = True, image_token: str = "<image>", source: str | None = None,
                 allow_outside_root: bool = False) -> None:
        self.image_folder = None if image_folder is None else os.fspath(image_folder)
        self.allow_urls = allow_urls
        self.allow_outside_root = allow_outside_root
        self.check_files = check_files
        self.image_token = image_token
        self.source = source

    # --- to implement -------------------------------------------------------------------------------------
    @classmethod
    def detect(cls, record: Mapping[str, Any]) -> bool:
        """Whether ``record`` looks like this format (used by auto-detection on the first record)."""
        raise NotImplementedError

    def parse(self, record: Mapping[str, Any]) -> Sample:
        """Convert one record; raise ``DataError`` (location is filled in by :meth:`convert`)."""
        raise NotImplementedError

    # --- shared -------------------------------------------------------------------------------------------
    def convert(self, record: Mapping[str, Any], index: int | None = None) -> Sample:
        """``record`` -> validated ``Sample``; any problem raises ``DataError`` naming index, id and file."""
        sample_id = record.get(self.id_key, index) if isinstance(record, Mapping) else index
        try:
            if not isinstance(record, Mapping):
                raise SampleError(f"record is a {type(record).__name__}, expected a mapping", reason="format")
            sample = self.parse(record)
            if sample.id is None:
                sample.id = sample_id
            sample.meta.setdefault("index", index)
            if self.source is not None:
                sample.meta.setdefault("source", self.source)
            return sample.validate()
        except DataError as e:
            raise locate(e, index=index, sample_id=sample_id, source=self.source) from None
        except (KeyError, TypeError, AttributeError) as e:
            raise SampleError(f"malformed {self.name!r} record: {type(e).__name__}: {e}", reason="format",
                            index=index, sample_id=sample_id, source=self.source) from e

    def image(self, src: Any) -> ImageSource:
        """Resolve one image source: path (against ``image_folder``), URL, ``data:`` URI (kept as a string and
        decoded by the processor), PIL image, raw bytes or an HF ``{"bytes", "path"}`` dict (decoded here)."""
        if isinstance(src, Image.Image):
            return src
        if isinstance(src, Mapping):  # HF datasets ``Image`` feature, undecoded: {"bytes": ..., "path": ...}
            if src.get("bytes") is not None:
                return self._from_bytes(src)
            if src.get("path") is not None:
                return self.image(src["path"])
            if src.get("url") is not None:
                return self.image(src["url"])
            raise SampleError(f"image entry {dict(src)!r} has neither 'bytes', 'path' nor 'url'", reason="format")
        if isinstance(src, (bytes, bytearray)):
            return self._from_bytes(bytes(src))
        return self._path(src, "image")

    def _path(self, src: Any, media: str) -> str:
        """A path or URL source of ``media`` (``image`` | ``video``): URLs refused unless ``allow_urls``, relative paths
        resolved against ``image_folder``, paths outside it refused unless ``allow_outside_root``, missing files
        reported when ``check_files``."""
        if isinstance(src, os.PathLike):
            src = os.fspath(src)
        if not isinstance(src, str) or not src:
            expected = ("a file path (str or os.PathLike), an http(s):// URL, a data: URI, a PIL image, raw bytes or "
                        "a {'bytes', 'path'} dict") if media == "image" else \
                ("a file path (str or os.PathLike), an http(s):// URL, raw bytes, a {'bytes', 'path'} dict or a list "
                 "of frames (image sources)")
            raise SampleError(f"bad {media} source {src!r} (a {type(src).__name__}); expected {expected}",
                              reason="format")
        if URL_RE.match(src):
            if not self.allow_urls:
                raise SampleError(f"{media} URL {src!r} refused: fetching is off; pass allow_urls=True to enable it",
                                reason="url", file=src, media=media)
            return src
        if src.startswith("data:"):
            return src
        src = src.removeprefix("file://")
        path = src if self.image_folder is None or os.path.isabs(src) else os.path.join(self.image_folder, src)
        if self.image_folder is not None and not self.allow_outside_root and not inside(path, self.image_folder):
            raise SampleError(f"{media} path {src!r} leads outside the image folder {self.image_folder!r} (to "
                              f"{os.path.realpath(path)!r}); refused: pass allow_outside_root=True "
                              f"(data.allow_outside_root=true) to read it", reason="outside_root", file=path,
                              media=media)
        if self.check_files and not os.path.isfile(path):
            what = f"{media} path is a directory, not a file" if os.path.isdir(path) else f"{media} file not found"
            raise SampleError(what, reason=f"missing_{media}", file=path, media=media)
        return path

    def video(self, src: Any, options: Mapping[str, Any] | None = None) -> Video:
        """Resolve one video: a file path (``image``'s rules: ``image_folder``, URLs, outside the folder), an
        undecoded ``{"bytes", "path"}`` dict, raw bytes, or a list of frames (each resolved as an image).
        ``options``: its per-video sampling / budget options (``vlm.data.video.PER_VIDEO``), checked when it is
        processed. An empty frame list raises ``SampleError`` (reason ``empty_video``)."""
        if isinstance(src, Video):
            return src
        opts = dict(options or {})
        if isinstance(src, (list, tuple)):
            if not src:
                raise SampleError("the video has no frames (an empty frame list)", reason="empty_video", media="video")
            return Video([self.image(f) for f in src], opts)
        if isinstance(src, (bytes, bytearray)) or (isinstance(src, Mapping) and src.get("bytes") is not None):
            return Video(src, opts)
        if isinstance(src, Mapping) and src.get("path") is not None:
            return Video(self._path(src["path"], "video"), opts)
        return Video(self._path(src, "video"), opts)

    @staticmethod
    def _from_bytes(data: Any) -> Image.Image:
        from vlm.data.images import load_image  # decoded + RGB-converted + size-checked like every other image

        return load_image(data, min_side=1)

    def check_count(self, refs: int, images: list[Any], what: str = "") -> None:
        if refs != len(images):
            raise SampleError(f"{refs} {what or self.image_token} placeholder(s) in the text but {len(images)} "
                            f"image(s) given", reason="image_count")


def inside(path: str, folder: str) -> bool:
    """Whether ``path`` is in ``folder`` once both are resolved (``..`` collapsed, symlinks followed)."""
    real, root = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([real, root]) == root


def message(role: Any, parts: list[Part]) -> Message:
    return Message(canonical_role(role), parts)
