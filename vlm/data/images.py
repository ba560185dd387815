"""Loading images and turning them into pixel tensors.

``load_image`` opens any image source a ``Sample`` may hold and returns an RGB ``PIL.Image``; ``ImageProcessor``
turns that into ``(n, 3, S, S)`` normalized float pixels (``n`` = 1 without tiling) plus an ``ImageInfo`` recording
the geometry, so grounding boxes can follow the image (``ImageInfo.transform_box``).

Resizes are PIL bicubic with antialiasing (``Image.BICUBIC``), as CLIP/OpenCLIP, LLaVA and InternVL preprocess
(transformers' PIL image processors and torchvision's ``Resize`` on PIL images call the same routine).
"""
from __future__ import annotations

import base64
import io
import os
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vlm.data.errors import CorruptImage, DataError, MissingImage, TinyImage, URLRefused, open_error
from vlm.data.tiling import BICUBIC, anyres_layout, anyres_tiles, dynamic_tiles, tile_grid

RGB = tuple[int, int, int]
Box = tuple[float, float, float, float]
WHITE: RGB = (255, 255, 255)


# ----------------------------------------------------------------------------------------------------- RGB conversion
def _scale_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """Map a single-channel integer/float array to 0..255 by its nominal range (not min-max, so a dark 16-bit scan
    stays dark): 16-bit modes divide by 257; ``I`` uses 0..255 if it fits, else 0..65535, else min-max; ``F`` uses
    0..1 if it fits, else 0..255, else min-max."""
    a = a.astype(np.float64)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if mode.startswith("I;16"):
        a = a / 257.0
    elif mode == "F" and lo >= 0.0 and hi <= 1.0:
        a = a * 255.0
    elif lo >= 0.0 and hi <= 255.0:
        pass
    elif mode == "I" and lo >= 0.0 and hi <= 65535.0:
        a = a / 257.0
    else:
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image, background: RGB = WHITE) -> Image.Image:
    """Convert any PIL mode to RGB.

    Grayscale (``1``, ``L``, ``I;16*``, ``I``, ``F``) is scaled by its nominal range then replicated (PIL's own
    ``convert`` clips 16-bit values at 255, turning most scans white). Anything with transparency (``RGBA``, ``LA``,
    ``PA``, ``P``/``L``/``RGB`` with a ``transparency`` entry) is alpha-composited over ``background``. ``CMYK``,
    ``YCbCr``, palette and the rest go through PIL's ``convert``.
    """
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in ("I", "F") or mode.startswith("I;16"):
        return Image.fromarray(_scale_to_uint8(np.asarray(img), mode), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


# ------------------------------------------------------------------------------------------------------------ loading
def _is_url(s: str) -> bool:
    return s.startswith(("http://", "https://"))


def load_image(source: Any, *, root: str | os.PathLike | None = None, allow_urls: bool = False,
               sample_id: Any = None, background: RGB = WHITE, min_side: int = 2,
               timeout: float = 10.0) -> Image.Image:
    """Open an image source and return it as an RGB ``PIL.Image`` (fully decoded).

    ``source``: a ``PIL.Image`` (converted, not modified in place); a path (``str``/``PathLike``, relative paths are
    resolved against ``root``); an ``http(s)://`` URL (refused unless ``allow_urls``); a ``data:image/...;base64,``
    URI; raw ``bytes``; or a Hugging Face image dict ``{"bytes": ..., "path": ...}``. Transparent images are
    composited over ``background``. EXIF orientation is *not* applied (the references do not, and boxes are
    annotated in the stored pixel frame).

    Raises ``DataError`` (naming ``sample_id``, the file and the problem) for a missing, unreadable, corrupt or
    truncated file, a refused URL, or an image with a side shorter than ``min_side`` pixels (zero-size, 1x1, ...).
    """
    file: str | None = None
    try:
        if isinstance(source, Image.Image):
            img = source
        elif isinstance(source, Mapping):
            if source.get("bytes"):
                file = source.get("path") or "<bytes>"
                img = Image.open(io.BytesIO(source["bytes"]))
            elif source.get("path"):
                return load_image(source["path"], root=root, allow_urls=allow_urls, sample_id=sample_id,
                                  background=background, min_side=min_side, timeout=timeout)
            else:
                raise DataError(f"image dict has neither 'bytes' nor 'path' (keys: {sorted(source)})",
                                sample_id=sample_id)
        elif isinstance(source, (bytes, bytearray)):
            file = "<bytes>"
            img = Image.open(io.BytesIO(bytes(source)))
        elif isinstance(source, (str, os.PathLike)):
            s = os.fspath(source)
            file = s
            if s.startswith("data:"):
                file = s[:40] + ("..." if len(s) > 40 else "")
                header, _, payload = s.partition(",")
                if ";base64" not in header:
                    raise CorruptImage("only base64 data URIs are supported", sample_id=sample_id, file=file)
                img = Image.open(io.BytesIO(base64.b64decode(payload)))
            elif _is_url(s):
                if not allow_urls:
                    raise URLRefused("image URLs are disabled; enable fetching (allow_urls=True) or download the "
                                    "images and point the reader's image root at them", sample_id=sample_id, file=s)
                with urllib.request.urlopen(s, timeout=timeout) as r:  # noqa: S310 (explicitly enabled)
                    img = Image.open(io.BytesIO(r.read()))
            else:
                path = Path(s).expanduser()
                if root is not None and not path.is_absolute():
                    path = Path(root).expanduser() / path
                file = str(path)
                if not path.is_file():
                    what = "is a directory, not a file" if path.is_dir() else "no such file"
                    raise MissingImage(what, sample_id=sample_id, file=file)
                img = Image.open(path)
        else:
            raise DataError(f"unsupported image source of type {type(source).__name__}", sample_id=sample_id)
        img.load()
        rgb = to_rgb(img, background)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise open_error(e)(f"cannot read image: {type(e).__name__}: {e}", sample_id=sample_id, file=file) from e
    if rgb is source:
        rgb = rgb.copy()
    if rgb.width < min_side or rgb.height < min_side:
        raise TinyImage(f"degenerate image of {rgb.width}x{rgb.height} pixels (each side must be >= {min_side})",
                        sample_id=sample_id, file=file)
    return rgb


# ----------------------------------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class Affine:
    """``x' = x * sx + ox``, ``y' = y * sy + oy``: original pixel coordinates -> one output's pixel coordinates."""

    sx: float
    sy: float
    ox: float = 0.0
    oy: float = 0.0

    def box(self, box: Sequence[float]) -> Box:
        x1, y1, x2, y2 = (float(v) for v in box)
        return (x1 * self.sx + self.ox, y1 * self.sy + self.oy, x2 * self.sx + self.ox, y2 * self.sy + self.oy)

    def inverse_box(self, box: Sequence[float]) -> Box:
        x1, y1, x2, y2 = (float(v) for v in box)
        return ((x1 - self.ox) / self.sx, (y1 - self.oy) / self.sy, (x2 - self.ox) / self.sx, (y2 - self.oy) / self.sy)


@dataclass
class ImageInfo:
    """What ``ImageProcessor`` did to one image.

    - ``original_size``: ``(width, height)`` of the input; ``image_size``: ``S`` of every output.
    - ``mode``: ``resize`` | ``pad`` | ``crop`` | ``dynamic`` | ``anyres``.
    - ``transforms[k]`` / ``kinds[k]``: per output ``k`` (in tensor order), the ``Affine`` from original pixels into
      that output's ``S x S`` frame and its role: ``image`` (no tiling), ``tile``, ``thumbnail`` (dynamic, last),
      ``base`` (anyres, first).
    - ``grid``: ``(cols, rows)`` of tiles (``(1, 1)`` without tiling); ``best_resolution``: anyres ``(height, width)``.
    - ``frame``: the box frame. Without tiling it is the single output. With tiling it is the *global view*: the whole
      image resized to ``S x S`` (dynamic's thumbnail, anyres' base image) — boxes are not split across tiles.
    """

    original_size: tuple[int, int]
    image_size: int
    mode: str
    transforms: list[Affine]
    kinds: list[str]
    frame: Affine
    grid: tuple[int, int] = (1, 1)
    best_resolution: tuple[int, int] | None = None
    extra: dict = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return len(self.transforms)

    @property
    def changes_normalized_frame(self) -> bool:
        """True when coordinates normalized to the image (Qwen-VL ``[0, 1000)``) change meaning (pad, crop)."""
        f, (w, h), s = self.frame, self.original_size, self.image_size
        return not (abs(f.sx * w - s) < 1e-9 and abs(f.sy * h - s) < 1e-9 and f.ox == 0 and f.oy == 0)

    def transform_box(self, box: Sequence[float], *, clip: bool = True, as_int: bool = False):
        """Map an absolute pixel box ``(x1, y1, x2, y2)`` of the original image into ``frame`` pixels.

        With ``clip`` the result is clipped to ``[0, S]``; a box left with no area inside the frame (cropped away)
        returns ``None``. ``as_int`` rounds to ints (for rewriting JSON boxes in text)."""
        x1, y1, x2, y2 = self.frame.box(box)
        if clip:
            s = float(self.image_size)
            had_area = x2 > x1 and y2 > y1
            x1, y1, x2, y2 = (min(max(v, 0.0), s) for v in (x1, y1, x2, y2))
            if x2 < x1 or y2 < y1 or (had_area and (x2 == x1 or y2 == y1)):
                return None
        out = (x1, y1, x2, y2)
        return tuple(int(round(v)) for v in out) if as_int else out

    def inverse_box(self, box: Sequence[float]) -> Box:
        """Map a pixel box in ``frame`` back to original-image pixels (e.g. a model's absolute-coordinate answer)."""
        return self.frame.inverse_box(box)

    def transform_norm_box(self, box: Sequence[int]):
        """Map a Qwen-VL ``[0, 1000)`` box of the original image to a ``[0, 1000)`` box of ``frame`` (identity for
        resize and tiling; changes under pad and crop). Returns ``None`` when cropped away."""
        if not self.changes_normalized_frame:
            return tuple(int(v) for v in box)
        w, h = self.original_size
        x1, y1, x2, y2 = box
        px = self.transform_box((x1 / 1000 * w, y1 / 1000 * h, x2 / 1000 * w, y2 / 1000 * h))
        if px is None:
            return None
        s = self.image_size
        return tuple(min(max(int(round(v / s * 1000)), 0), 999) for v in px)


# ---------------------------------------------------------------------------------------------------------- processor
_TILING_KEYS = {"dynamic": {"kind", "min_tiles", "max_tiles", "thumbnail"},
                "anyres": {"kind", "pinpoints", "pad_color"}}


def check_tiling(tiling: Mapping | None) -> dict | None:
    """``tiling`` with defaults filled in, or ``None``; ``ValueError`` / ``TypeError`` naming a bad kind, key or
    tile count (``1 <= min_tiles <= max_tiles``)."""
    if tiling is None:
        return None
    t = dict(tiling)
    kind = t.get("kind")
    if kind not in _TILING_KEYS:
        raise ValueError(f"tiling kind {kind!r} unknown; expected one of {sorted(_TILING_KEYS)} (or tiling=None)")
    bad = set(t) - _TILING_KEYS[kind]
    if bad:
        raise TypeError(f"unknown tiling key(s) {sorted(bad)} for kind={kind!r}; "
                        f"accepted: {sorted(_TILING_KEYS[kind])}")
    if kind == "dynamic":
        t = {"kind": kind, "min_tiles": int(t.get("min_tiles", 1)), "max_tiles": int(t.get("max_tiles", 12)),
             "thumbnail": bool(t.get("thumbnail", True))}
        if not 1 <= t["min_tiles"] <= t["max_tiles"]:
            raise ValueError(f"dynamic tiling needs 1 <= min_tiles <= max_tiles; got {t}")
    else:
        if not t.get("pinpoints"):
            raise ValueError("anyres tiling needs pinpoints=[[height, width], ...]")
        t["pinpoints"] = [[int(h), int(w)] for h, w in t["pinpoints"]]
        t["pad_color"] = tuple(int(c) for c in t.get("pad_color", (0, 0, 0)))
    return t


class ImageProcessor:
    """RGB image -> ``(n, 3, S, S)`` float32 pixels normalized with ``mean``/``std``, plus ``ImageInfo``.

    ``resize_mode`` (no tiling): ``resize`` squashes to ``S x S`` (SigLIP, InternVL); ``pad`` pads to a square with
    ``pad_color`` centred, then resizes (LLaVA's ``expand2square``; default colour = ``int(255 * mean)``);
    ``crop`` resizes the short side to ``S`` (long side ``int(S * long / short)``) then centre-crops ``S x S``
    (CLIP; offsets floor like transformers' ``center_crop``).

    ``tiling``: ``None``; ``{"kind": "dynamic", "min_tiles": 1, "max_tiles": 12, "thumbnail": True}`` (InternVL:
    ``cols*rows`` tiles then the thumbnail when more than one tile); ``{"kind": "anyres", "pinpoints": [[h, w], ...]}``
    (LLaVA-NeXT: base image first, then the tiles). Tiling uses the references' own geometry, so it requires
    ``resize_mode="resize"``.
    """

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], resize_mode: str = "resize",
                 pad_color: Sequence[int] | None = None, tiling: Mapping | None = None,
                 background: RGB = WHITE) -> None:
        if resize_mode not in ("resize", "pad", "crop"):
            raise ValueError(f"resize_mode must be 'resize', 'pad' or 'crop'; got {resize_mode!r}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values each; got mean={mean}, std={std}")
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.resize_mode = resize_mode
        self.pad_color = tuple(int(c) for c in pad_color) if pad_color is not None else \
            tuple(int(m * 255) for m in self.mean)
        self.tiling = check_tiling(tiling)
        if self.tiling is not None and resize_mode != "resize":
            raise ValueError(f"tiling={self.tiling['kind']!r} uses its reference geometry and cannot be combined with "
                             f"resize_mode={resize_mode!r}; use resize_mode='resize'")
        self.background = tuple(background)
        self._mean = np.asarray(self.mean, np.float32)
        self._std = np.asarray(self.std, np.float32)

    @classmethod
    def from_model(cls, model: Any, **kwargs: Any) -> "ImageProcessor":
        """Build from anything exposing ``image_size``, ``image_mean`` and ``image_std`` (a ``VLM`` or encoder)."""
        size = model.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        return cls(int(size), tuple(model.image_mean), tuple(model.image_std), **kwargs)

    def __repr__(self) -> str:
        return (f"ImageProcessor(image_size={self.image_size}, mean={self.mean}, std={self.std}, "
                f"resize_mode={self.resize_mode!r}, tiling={self.tiling})")

    # ------------------------------------------------------------------------------------------------- planning
    def _dynamic_budget(self, max_tiles: int | None) -> tuple[int, int]:
        t = self.tiling
        # a per-call cap (the sample's tile budget) only ever lowers the configured maximum
        mx = t["max_tiles"] if max_tiles is None else max(1, min(int(max_tiles), t["max_tiles"]))
        return min(t["min_tiles"], mx), mx

    def _pinpoints(self, max_tiles: int | None) -> list[list[int]]:
        pins, s = self.tiling["pinpoints"], self.image_size
        if max_tiles is None:
            return pins
        fit = [p for p in pins if (p[0] // s) * (p[1] // s) <= max_tiles]
        return fit or [min(pins, key=lambda p: (p[0] // s) * (p[1] // s))]

    def num_images(self, width: int, height: int, *, max_tiles: int | None = None) -> int:
        """How many ``S x S`` outputs an image of ``width x height`` becomes (without decoding any pixels)."""
        if self.tiling is None:
            return 1
        if self.tiling["kind"] == "dynamic":
            lo, hi = self._dynamic_budget(max_tiles)
            cols, rows = tile_grid(width, height, min_tiles=lo, max_tiles=hi, tile_size=self.image_size)
            return cols * rows + (1 if self.tiling["thumbnail"] and cols * rows > 1 else 0)
        cols, rows = anyres_layout(width, height, self._pinpoints(max_tiles), self.image_size).grid
        return 1 + cols * rows

    # ----------------------------------------------------------------------------------------------- processing
    def __call__(self, img: Any, *, max_tiles: int | None = None, sample_id: Any = None
                 ) -> tuple[torch.Tensor, ImageInfo]:
        """Process one image (a ``PIL.Image`` or any ``load_image`` source).

        ``max_tiles`` overrides the tile budget for this call (dynamic: ``max_tiles``, ``min_tiles`` lowered to fit;
        anyres: only pinpoints with at most that many tiles, else the smallest); ignored without tiling.
        Returns ``pixel_values (n, 3, S, S)`` float32 and ``ImageInfo``.
        """
        img = load_image(img, sample_id=sample_id, background=self.background)
        w, h = img.size
        s = self.image_size
        squash = Affine(s / w, s / h)
        if self.tiling is None:
            views, info = self._single(img)
        elif self.tiling["kind"] == "dynamic":
            lo, hi = self._dynamic_budget(max_tiles)
            cols, rows = tile_grid(w, h, min_tiles=lo, max_tiles=hi, tile_size=s)
            views = dynamic_tiles(img, min_tiles=lo, max_tiles=hi, tile_size=s, thumbnail=self.tiling["thumbnail"])
            tsx, tsy = cols * s / w, rows * s / h
            transforms = [Affine(tsx, tsy, -c * s, -r * s) for r in range(rows) for c in range(cols)]
            kinds = ["tile"] * len(transforms)
            if len(views) > len(transforms):
                transforms.append(squash)
                kinds.append("thumbnail")
            info = ImageInfo((w, h), s, "dynamic", transforms, kinds, squash, grid=(cols, rows))
        else:
            pins = self._pinpoints(max_tiles)
            lay = anyres_layout(w, h, pins, s)
            views = anyres_tiles(img, pins, s, pad_color=self.tiling["pad_color"])
            rw, rh = lay.resized
            px, py = lay.paste
            cols, rows = lay.grid
            transforms = [squash] + [Affine(rw / w, rh / h, px - c * s, py - r * s)
                                     for r in range(rows) for c in range(cols)]
            kinds = ["base"] + ["tile"] * (cols * rows)
            info = ImageInfo((w, h), s, "anyres", transforms, kinds, squash, grid=(cols, rows),
                             best_resolution=lay.best, extra={"resized": lay.resized, "paste": lay.paste})
        return self.to_tensor(views), info

    def _single(self, img: Image.Image) -> tuple[list[Image.Image], ImageInfo]:
        w, h = img.size
        s = self.image_size
        if self.resize_mode == "resize":
            out, aff = img.resize((s, s), BICUBIC), Affine(s / w, s / h)
        elif self.resize_mode == "pad":
            side = max(w, h)
            x0, y0 = (side - w) // 2, (side - h) // 2
            if w != h:
                canvas = Image.new("RGB", (side, side), self.pad_color)
                canvas.paste(img, (x0, y0))
            else:
                canvas = img
            k = s / side
            out, aff = canvas.resize((s, s), BICUBIC), Affine(k, k, x0 * k, y0 * k)
        else:  # crop
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(s * long / short)
            nw, nh = (s, new_long) if w <= h else (new_long, s)
            left, top = (nw - s) // 2, (nh - s) // 2
            out = img.resize((nw, nh), BICUBIC).crop((left, top, left + s, top + s))
            aff = Affine(nw / w, nh / h, -left, -top)
        return [out], ImageInfo((w, h), s, self.resize_mode, [aff], ["image"], aff)

    def to_tensor(self, views: Sequence[Image.Image]) -> torch.Tensor:
        """Stack RGB ``S x S`` images into normalized ``(n, 3, S, S)`` float32."""
        arr = np.stack([np.asarray(v, dtype=np.float32) for v in views]) * np.float32(1 / 255)
        arr = (arr - self._mean) / self._std
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))
