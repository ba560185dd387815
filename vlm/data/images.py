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
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vlm.data.errors import CorruptImage, DataError, MissingImage, TinyImage, URLRefused, open_error
from vlm.data.geometry import Affine, ImageInfo  # noqa: F401  (ImageInfo: part of this module's API)
from vlm.data.layouts import LAYOUTS, Layout
from vlm.data.tiling import BICUBIC

RGB = tuple[int, int, int]
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


# ---------------------------------------------------------------------------------------------------------- processor
def check_tiling(tiling: Mapping | None) -> dict | None:
    """``tiling`` (``{kind: <layout>, ...options}``) with the layout's defaults filled in, or ``None``; ``ValueError``
    / ``TypeError`` naming a bad kind, key or value (e.g. ``1 <= min_tiles <= max_tiles``). Kinds are the registered
    layouts (``vlm.data.layouts.LAYOUTS``)."""
    if tiling is None:
        return None
    t = dict(tiling)
    kind = t.get("kind")
    if not isinstance(kind, str) or kind not in LAYOUTS:
        raise ValueError(f"tiling kind {kind!r} unknown; expected one of {sorted(LAYOUTS.names())} (or tiling=None)")
    return LAYOUTS.get(kind).check(t)


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
        self.layout: Layout | None = None if self.tiling is None else \
            LAYOUTS.get(self.tiling["kind"])(self.image_size, self.tiling)
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
    def num_images(self, width: int, height: int, *, max_tiles: int | None = None) -> int:
        """How many ``S x S`` outputs an image of ``width x height`` becomes (without decoding any pixels)."""
        return 1 if self.layout is None else self.layout.num_views(width, height, max_tiles=max_tiles)

    # ----------------------------------------------------------------------------------------------- processing
    def __call__(self, img: Any, *, max_tiles: int | None = None, sample_id: Any = None
                 ) -> tuple[torch.Tensor, ImageInfo]:
        """Process one image (a ``PIL.Image`` or any ``load_image`` source).

        ``max_tiles`` overrides the tile budget for this call (dynamic: ``max_tiles``, ``min_tiles`` lowered to fit;
        anyres: only pinpoints with at most that many tiles, else the smallest); ignored without tiling.
        Returns ``pixel_values (n, 3, S, S)`` float32 and ``ImageInfo``.
        """
        img = load_image(img, sample_id=sample_id, background=self.background)
        if self.layout is None:
            views, info = self._single(img)
            return self.to_tensor(views), info
        lay = self.layout.layout(img, max_tiles=max_tiles)
        info = ImageInfo(img.size, self.image_size, self.layout.mode, lay.transforms, lay.kinds, lay.frame,
                         grid=lay.grid, best_resolution=lay.best_resolution, extra=lay.extra,
                         frame_size=lay.frame_size)
        return self.to_tensor(lay.images), info

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
