"""Videos: decoding, frame sampling and the per-video pixel budget (Qwen2-VL's video processing).

A video is a file (decoded with PyAV, the optional extra ``video``: ``pip install -e '.[video]'``) or a list of frames
(image sources, loaded with ``vlm.data.images.load_image``). ``VideoProcessor`` turns one into normalized frames
``(T, 3, H, W)`` float32 plus a ``VideoInfo`` (which source frames were kept, the frame rate, timestamps, the patch
grid and ``second_per_grid_t`` for Qwen2.5-VL's temporal positions); ``vlm.data.patches.to_patches`` makes them the
flat patches the native-resolution encoder takes (``pixel_values_videos``, ``video_grid_thw``).

Semantics follow transformers' ``Qwen2VLVideoProcessor``:

- **Sampling** (files only; a frame list is used whole): ``num_frames`` frames (rounded to a multiple of
  ``temporal_patch_size``) or ``fps`` frames per second of video (clamped to ``[min_frames, max_frames]`` and the
  video's length, floored to a multiple of ``temporal_patch_size``), spread uniformly over the video
  (``sample_indices``). With neither, every frame up to ``max_frames`` (more are spread uniformly to
  ``max_frames``: a bound transformers does not apply).
- **Size**: every frame is resized to one ``smart_resize`` size (sides multiples of ``patch_size * merge_size``, area
  in ``[min_pixels, max_pixels]``), with torchvision's antialiased bicubic on ``uint8`` (what the reference's only
  backend does). ``total_pixels`` bounds the whole video: each frame gets at most ``total_pixels *
  temporal_patch_size // T`` pixels, never under ``1.05 * min_pixels`` (``cap_pixels_per_frame=True`` in
  transformers, with ``total_pixels = int(max_video_tokens * factor**2 * 0.9)``; qwen-vl-utils' rule).
- **Time**: ``VideoInfo.sampled_fps`` is ``len(kept) / total_frames * frame_rate`` (24 when the frame rate is unknown,
  as transformers' ``VideoMetadata``), ``second_per_grid_t = temporal_patch_size / sampled_fps`` (what
  ``Qwen2_5_VLProcessor`` passes as ``second_per_grid_ts``).

Paths follow ``load_image``'s rules: relative to ``root``, ``http(s)`` refused unless ``allow_urls`` (readers also
refuse paths outside their data folder, see ``Reader.video``). Errors are ``DataError`` subclasses naming the sample
and the video: ``MissingVideo``, ``CorruptVideo`` (unreadable, no video stream), ``EmptyVideo`` (no frames).
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlm.data.errors import CorruptVideo, DataError, EmptyVideo, MissingVideo, URLRefused
from vlm.data.patches import resize_uint8, smart_resize
from vlm.data.sample import Video

#: transformers' Qwen2VLVideoProcessor defaults (pixels per frame) and qwen-vl-utils' total budget per video
MIN_PIXELS = 128 * 28 * 28
MAX_PIXELS = 768 * 28 * 28
TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)
#: the frame rate transformers assumes when a video's is unknown (``VideoMetadata.sampled_fps``)
UNKNOWN_FPS = 24.0

DEFAULTS: dict[str, Any] = {
    "fps": None, "num_frames": None, "min_frames": 4, "max_frames": 768, "min_pixels": MIN_PIXELS,
    "max_pixels": MAX_PIXELS, "total_pixels": TOTAL_PIXELS, "patch_size": 14, "temporal_patch_size": 2,
    "merge_size": 2, "frame_rate": None, "size": None,
}
#: options a single ``Video`` may override (the patch geometry belongs to the model)
PER_VIDEO = ("fps", "num_frames", "min_frames", "max_frames", "min_pixels", "max_pixels", "total_pixels", "frame_rate")


def check_video_options(options: Mapping[str, Any], *, accepted: Sequence[str] = tuple(DEFAULTS)) -> dict[str, Any]:
    """``options`` with defaults filled in (``DEFAULTS``). ``TypeError`` for an unknown key, ``ValueError`` for a bad
    value (``fps`` with ``num_frames``, non-positive sizes, ``min > max``), each naming it."""
    bad = set(options) - set(accepted)
    if bad:
        raise TypeError(f"unknown video option(s) {sorted(bad)}; accepted: {sorted(accepted)}")
    o = {**DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    try:  # YAML / JSON values: numbers as their type (fps and frame_rate real, the rest whole)
        o = {k: v if v is None else float(v) if k in ("fps", "frame_rate") else int(v) for k, v in o.items()}
    except (TypeError, ValueError) as e:
        raise ValueError(f"video options must be numbers (or null); got {dict(options)}: {e}") from None
    if o["fps"] is not None and o["num_frames"] is not None:
        raise ValueError(f"video options fps={o['fps']} and num_frames={o['num_frames']} exclude each other; "
                         f"give one")
    for k in ("fps", "frame_rate"):
        if o[k] is not None and not float(o[k]) > 0:
            raise ValueError(f"video option {k}={o[k]!r} must be > 0")
    for k in ("num_frames", "min_frames", "max_frames", "min_pixels", "max_pixels", "patch_size",
              "temporal_patch_size", "merge_size", "size"):
        if o[k] is not None and int(o[k]) < 1:
            raise ValueError(f"video option {k}={o[k]!r} must be a positive integer")
    if o["total_pixels"] is not None and int(o["total_pixels"]) < 1:
        raise ValueError(f"video option total_pixels={o['total_pixels']!r} must be positive (or null: no bound)")
    if o["min_frames"] > o["max_frames"] or o["min_pixels"] > o["max_pixels"]:
        raise ValueError(f"video options need min_frames <= max_frames and min_pixels <= max_pixels; got "
                         f"min_frames={o['min_frames']}, max_frames={o['max_frames']}, "
                         f"min_pixels={o['min_pixels']}, max_pixels={o['max_pixels']}")
    return o


# -------------------------------------------------------------------------------------------------------- sampling
def sample_indices(total_frames: int, *, frame_rate: float | None = None, fps: float | None = None,
                   num_frames: int | None = None, min_frames: int = 4, max_frames: int = 768,
                   temporal_patch_size: int = 2) -> list[int]:
    """Indices of the frames kept from a video of ``total_frames`` frames at ``frame_rate`` frames per second.

    ``num_frames``: that many, rounded to a multiple of ``temporal_patch_size``; ``fps``: ``total_frames /
    frame_rate * fps`` clamped to ``[min_frames, min(max_frames, total_frames)]`` then floored to a multiple; both
    spread uniformly (``floor(k * total / n)``), as transformers' ``Qwen2VLVideoProcessor.sample_frames``. A count
    that rounds to 0 (a 1-frame video) keeps every frame. Neither: all frames, spread to ``max_frames`` when more.
    ``ValueError`` for ``fps`` without a ``frame_rate``, both ``fps`` and ``num_frames``, or more frames asked than
    the video has."""
    if total_frames < 1:
        raise ValueError("a video with no frames has nothing to sample")
    if fps is not None and num_frames is not None:
        raise ValueError("fps and num_frames exclude each other; give one")
    tp = temporal_patch_size
    if num_frames is not None:
        n = round(num_frames / tp) * tp
    elif fps is not None:
        if not frame_rate:
            raise ValueError(f"sampling at fps={fps} needs the video's frame rate, which is unknown; give num_frames "
                             f"or the frame rate")
        cap = math.floor(min(max_frames, total_frames) / tp) * tp
        n = min(max(total_frames / frame_rate * fps, min_frames), cap, total_frames)
        n = math.floor(n / tp) * tp
    elif total_frames > max_frames:
        n = max(tp, math.floor(max_frames / tp) * tp)
    else:
        return list(range(total_frames))
    if n > total_frames:
        raise ValueError(f"cannot sample {n} frames from a video of {total_frames} frame(s); lower num_frames or fps")
    if n < 1:
        return list(range(total_frames))
    # the reference's float32 arange, truncated (exactly its indices)
    return torch.arange(0, total_frames, total_frames / n).int().tolist()


def frame_size(height: int, width: int, num_frames: int, *, min_pixels: int = MIN_PIXELS,
               max_pixels: int = MAX_PIXELS, total_pixels: int | None = TOTAL_PIXELS, patch_size: int = 14,
               merge_size: int = 2, temporal_patch_size: int = 2) -> tuple[int, int]:
    """``(H, W)`` every frame of a ``num_frames``-frame video of ``height x width`` is resized to: ``smart_resize``
    under the per-frame cap ``max_pixels``, lowered to ``total_pixels * temporal_patch_size // num_frames`` (never
    under ``1.05 * min_pixels``) when ``total_pixels`` is set. ``ValueError`` as ``smart_resize``."""
    cap = max_pixels
    if total_pixels is not None:
        cap = max(min(max_pixels, total_pixels * temporal_patch_size // num_frames), int(min_pixels * 1.05))
    return smart_resize(height, width, factor=patch_size * merge_size, min_pixels=min_pixels, max_pixels=cap)


# -------------------------------------------------------------------------------------------------------- decoding
def _av():
    try:
        import av
    except ImportError as e:
        raise ImportError("decoding a video file needs PyAV: pip install -e '.[video]' from a vlm checkout (or pip "
                          "install av); a video given as a list of frames needs nothing more") from e
    return av


def _open_target(source: Any, *, root: str | os.PathLike | None, allow_urls: bool, sample_id: Any,
                 timeout: float) -> tuple[Any, str]:
    """What PyAV opens (a path or a bytes buffer) and the file's name for errors."""
    if isinstance(source, (bytes, bytearray)):
        return io.BytesIO(bytes(source)), "<bytes>"
    if isinstance(source, Mapping):
        if source.get("bytes"):
            return io.BytesIO(source["bytes"]), str(source.get("path") or "<bytes>")
        if source.get("path"):
            return _open_target(source["path"], root=root, allow_urls=allow_urls, sample_id=sample_id,
                                timeout=timeout)
        raise DataError(f"video dict has neither 'bytes' nor 'path' (keys: {sorted(source)})", sample_id=sample_id,
                        media="video")
    if not isinstance(source, (str, os.PathLike)):
        raise DataError(f"unsupported video source of type {type(source).__name__}; expected a path, bytes or a list "
                        f"of frames", sample_id=sample_id, media="video")
    s = os.fspath(source)
    if s.startswith(("http://", "https://")):
        if not allow_urls:
            raise URLRefused("video URLs are disabled; enable fetching (allow_urls=True) or download the video and "
                             "point the reader's folder at it", sample_id=sample_id, file=s, media="video")
        try:
            with urllib.request.urlopen(s, timeout=timeout) as r:
                return io.BytesIO(r.read()), s
        except OSError as e:
            raise MissingVideo(f"cannot fetch video: {type(e).__name__}: {e}", sample_id=sample_id, file=s) from e
    path = Path(s.removeprefix("file://")).expanduser()
    if root is not None and not path.is_absolute():
        path = Path(root).expanduser() / path
    if not path.is_file():
        raise MissingVideo("is a directory, not a file" if path.is_dir() else "no such file", sample_id=sample_id,
                           file=str(path))
    return str(path), str(path)


def decode_video(source: Any, *, root: str | os.PathLike | None = None, allow_urls: bool = False,
                 sample_id: Any = None, select: Callable[[int, float | None], list[int]] | None = None,
                 timeout: float = 10.0) -> tuple[torch.Tensor, list[int], int, float | None, str]:
    """Decode a video file (path, ``bytes``, ``{"bytes", "path"}`` or an allowed URL) with PyAV.

    ``select(total_frames, frame_rate) -> indices`` picks the frames to keep (default: all). Returns ``(frames uint8
    (N, 3, H, W), indices, total_frames, frame_rate or None, file)``. Only the kept frames are converted to RGB (a
    container that does not state its frame count is decoded twice: once to count, once to keep). Raises
    ``MissingVideo``, ``CorruptVideo`` (not a video, no video stream, a decode error) or ``EmptyVideo`` (no frames),
    each naming ``sample_id`` and the file; ``ImportError`` naming the ``video`` extra without PyAV."""
    av = _av()
    target, file = _open_target(source, root=root, allow_urls=allow_urls, sample_id=sample_id, timeout=timeout)

    @contextlib.contextmanager
    def stream(what: str) -> Iterator[Any]:
        """``(container, its first video stream)``, opened from the start; PyAV's errors become ``CorruptVideo``
        ("cannot <what> video: ...")."""
        if isinstance(target, io.BytesIO):
            target.seek(0)
        try:
            with av.open(target) as container:
                if not container.streams.video:
                    raise CorruptVideo("the file has no video stream", sample_id=sample_id, file=file)
                yield container, container.streams.video[0]
        except DataError:
            raise
        except (av.FFmpegError, OSError, ValueError, EOFError) as e:
            raise CorruptVideo(f"cannot {what} video: {type(e).__name__}: {e}", sample_id=sample_id,
                               file=file) from e

    def rate_of(video: Any) -> float | None:
        return float(video.average_rate) if video.average_rate else None

    def read(keep: set[int]) -> tuple[dict[int, np.ndarray], int, float | None]:
        """Decode the whole stream: ``({index: RGB frame} for the indices in keep, frames decoded, rate)``."""
        with stream("decode") as (container, video):
            kept, count = {}, 0
            for count, frame in enumerate(container.decode(video), start=1):
                if count - 1 in keep:
                    kept[count - 1] = frame.to_ndarray(format="rgb24")
            return kept, count, rate_of(video)

    def probe() -> tuple[int, float | None]:
        """The stream's stated frame count and rate (0 when the container does not say)."""
        with stream("open") as (_, video):
            return int(video.frames or 0), rate_of(video)

    stated, rate = probe()
    if stated <= 0:  # the container does not say: count by decoding, keeping nothing
        _, stated, rate = read(set())
    if stated == 0:
        raise EmptyVideo("the video stream has no frames", sample_id=sample_id, file=file)
    pick = select or (lambda n, _r: list(range(n)))
    indices = pick(stated, rate)
    kept, total, rate = read(set(indices))
    if total != stated:  # the container's count was wrong: sample again from the decoded count
        if total == 0:
            raise EmptyVideo("the video stream has no frames", sample_id=sample_id, file=file)
        indices = pick(total, rate)
        kept, total, rate = read(set(indices))
    missing = [i for i in indices if i not in kept]
    if missing:
        raise CorruptVideo(f"frames {missing[:5]} of {total} could not be decoded", sample_id=sample_id, file=file)
    frames = np.stack([kept[i] for i in indices])
    return torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous(), indices, total, rate, file


def load_frames(frames: Sequence[Any], *, root: str | os.PathLike | None = None, allow_urls: bool = False,
                sample_id: Any = None) -> torch.Tensor:
    """A video given as frames (image sources, ``load_image``'s rules) -> ``uint8 (N, 3, H, W)``. ``EmptyVideo``
    for no frames, ``DataError`` naming the frame when the sizes differ (or as ``load_image``)."""
    from vlm.data.images import load_image

    if len(frames) == 0:
        raise EmptyVideo("the video has no frames (an empty frame list)", sample_id=sample_id)
    pils = [load_image(f, root=root, allow_urls=allow_urls, sample_id=sample_id, min_side=1) for f in frames]
    sizes = {p.size for p in pils}
    if len(sizes) > 1:
        first = pils[0].size
        k = next(i for i, p in enumerate(pils) if p.size != first)
        raise DataError(f"the frames of a video must share one size; frame 0 is {first[0]}x{first[1]} but frame {k} is "
                        f"{pils[k].width}x{pils[k].height}", sample_id=sample_id, media="video")
    return torch.from_numpy(np.stack([np.array(p, dtype=np.uint8) for p in pils])).permute(0, 3, 1, 2).contiguous()


# ------------------------------------------------------------------------------------------------------- processor
@dataclass
class VideoInfo:
    """What ``VideoProcessor`` did to one video.

    ``original_size`` / ``resized``: ``(width, height)`` of the source frames and of the output frames;
    ``total_frames``: frames in the source; ``indices``: the source frames kept, in order (``T = len(indices)``);
    ``frame_rate``: the source's frames per second (``None``: unknown); ``grid_thw``: the patch grid ``(ceil(T / tp),
    H / patch_size, W / patch_size)``; ``file``: the file decoded (``None`` for frames)."""

    original_size: tuple[int, int]
    resized: tuple[int, int]
    total_frames: int
    indices: list[int]
    frame_rate: float | None
    temporal_patch_size: int
    grid_thw: tuple[int, int, int]
    file: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return len(self.indices)

    @property
    def sampled_fps(self) -> float:
        """Frames per second of the kept frames (``UNKNOWN_FPS`` = 24 when the frame rate is unknown)."""
        if not self.frame_rate:
            return UNKNOWN_FPS
        return len(self.indices) / self.total_frames * self.frame_rate

    @property
    def timestamps(self) -> list[float] | None:
        """Seconds of each kept frame from the start (``None`` when the frame rate is unknown)."""
        return None if not self.frame_rate else [i / self.frame_rate for i in self.indices]

    @property
    def second_per_grid_t(self) -> float:
        """Seconds one temporal patch spans: ``temporal_patch_size / sampled_fps`` (Qwen2.5-VL's
        ``second_per_grid_ts`` entry)."""
        return self.temporal_patch_size / self.sampled_fps


class VideoProcessor:
    """A video (``Video``, a path, or a list of frames) -> ``(frames (T, 3, H, W) float32 normalized, VideoInfo)``.

    ``mean``/``std``: per-channel normalization (the encoder's). Options (``DEFAULTS``; a ``Video``'s own ``options``
    override the sampling and budget ones, ``PER_VIDEO``): ``fps`` | ``num_frames``, ``min_frames``, ``max_frames``
    (sampling, files only), ``min_pixels``, ``max_pixels``, ``total_pixels`` (size per frame and per video),
    ``patch_size``, ``temporal_patch_size``, ``merge_size`` (the encoder's patch geometry), ``frame_rate`` (frames
    per second of a frame list, for timestamps; a file states its own), ``size`` (fixed-size frames: every frame
    resized to ``size x size``, aspect ratio not kept, the pixel bounds unused: LLaVA-OneVision's video processor;
    ``None``: ``smart_resize``). ``root`` / ``allow_urls``: as ``load_image``. Frames of ``T`` not a multiple of
    ``temporal_patch_size`` are returned as they are; ``to_patches`` repeats the last one."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], *, root: str | os.PathLike | None = None,
                 allow_urls: bool = False, **options: Any) -> None:
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values each; got mean={mean}, std={std}")
        self.options = check_video_options(options)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.root, self.allow_urls = root, allow_urls

    def __repr__(self) -> str:
        return f"VideoProcessor(mean={self.mean}, std={self.std}, {self.options})"

    def __call__(self, video: Video | str | Sequence[Any], *, sample_id: Any = None,
                 root: str | os.PathLike | None = None, allow_urls: bool | None = None
                 ) -> tuple[torch.Tensor, VideoInfo]:
        """Decode, sample, resize and normalize one video. Raises ``DataError`` subclasses naming ``sample_id`` and
        the file (see the module docstring); ``TypeError`` / ``ValueError`` for bad per-video options."""
        if not isinstance(video, Video):
            video = Video(video)
        bad = set(video.options) - set(PER_VIDEO)
        if bad:
            raise TypeError(f"video option(s) {sorted(bad)} cannot be set per video; per-video options: "
                            f"{list(PER_VIDEO)}")
        base = dict(self.options)
        if {"fps", "num_frames"} & {k for k, v in video.options.items() if v is not None}:
            base["fps"] = base["num_frames"] = None  # a video's own sampling replaces the configured one
        o = check_video_options({**base, **video.options})
        root = self.root if root is None else root
        allow_urls = self.allow_urls if allow_urls is None else allow_urls
        tp = int(o["temporal_patch_size"])
        if isinstance(video.source, (list, tuple)):
            raw = load_frames(video.source, root=root, allow_urls=allow_urls, sample_id=sample_id)
            indices, total, rate, file = list(range(raw.shape[0])), raw.shape[0], o["frame_rate"], None
        else:
            def select(n: int, rate: float | None) -> list[int]:
                try:
                    return sample_indices(n, frame_rate=rate, fps=o["fps"], num_frames=o["num_frames"],
                                          min_frames=o["min_frames"], max_frames=o["max_frames"],
                                          temporal_patch_size=tp)
                except ValueError as e:
                    raise DataError(str(e), sample_id=sample_id, file=file_name, media="video") from None

            file_name = os.fspath(video.source) if isinstance(video.source, (str, os.PathLike)) else None
            raw, indices, total, rate, file = decode_video(video.source, root=root, allow_urls=allow_urls,
                                                           sample_id=sample_id, select=select)
        h, w = raw.shape[-2:]
        try:
            rh, rw = (o["size"], o["size"]) if o["size"] is not None else frame_size(
                h, w, raw.shape[0], min_pixels=o["min_pixels"], max_pixels=o["max_pixels"],
                total_pixels=o["total_pixels"], patch_size=o["patch_size"], merge_size=o["merge_size"],
                temporal_patch_size=tp)
        except ValueError as e:
            raise DataError(str(e), sample_id=sample_id, file=file, media="video") from None
        frames = self.normalize(resize_uint8(raw, (rh, rw)))
        p = int(o["patch_size"])
        info = VideoInfo((int(w), int(h)), (rw, rh), int(total), list(indices), rate, tp,
                         (-(-len(indices) // tp), rh // p, rw // p), file)
        return frames, info

    def normalize(self, frames: torch.Tensor) -> torch.Tensor:
        """``uint8 (T, 3, H, W)`` -> float32 ``(x / 255 - mean) / std``."""
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
        return (frames.to(torch.float32) * (1 / 255) - mean) / std

