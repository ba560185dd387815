"""Where an image's pixels go: ``Affine`` maps original-image pixel coordinates into one processed view, and
``ImageInfo`` records what the image processor did to one image (its views, their roles, the box frame), so
grounding boxes follow the image. Shared by ``vlm.data.images`` and the image layouts (``vlm.data.layouts``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

Box = tuple[float, float, float, float]


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
    - ``frame_size``: ``(width, height)`` of the box frame in pixels when it is not ``S x S`` (``native``: the image
      at its resized size), else ``None``.
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
    frame_size: tuple[int, int] | None = None

    @property
    def frame_wh(self) -> tuple[int, int]:
        """``(width, height)`` of the box frame in pixels (``frame_size``, or ``S x S``)."""
        return self.frame_size or (self.image_size, self.image_size)

    @property
    def num_images(self) -> int:
        return len(self.transforms)

    @property
    def changes_normalized_frame(self) -> bool:
        """True when coordinates normalized to the image (Qwen-VL ``[0, 1000)``) change meaning (pad, crop)."""
        f, (w, h), (fw, fh) = self.frame, self.original_size, self.frame_wh
        return not (abs(f.sx * w - fw) < 1e-9 and abs(f.sy * h - fh) < 1e-9 and f.ox == 0 and f.oy == 0)

    def transform_box(self, box: Sequence[float], *, clip: bool = True, as_int: bool = False):
        """Map an absolute pixel box ``(x1, y1, x2, y2)`` of the original image into ``frame`` pixels.

        With ``clip`` the result is clipped to the frame (``[0, S]``, or ``frame_size``); a box left with no area
        inside the frame (cropped away) returns ``None``. ``as_int`` rounds to ints (for rewriting JSON boxes in
        text)."""
        x1, y1, x2, y2 = self.frame.box(box)
        if clip:
            fw, fh = (float(v) for v in self.frame_wh)
            had_area = x2 > x1 and y2 > y1
            x1, x2 = (min(max(v, 0.0), fw) for v in (x1, x2))
            y1, y2 = (min(max(v, 0.0), fh) for v in (y1, y2))
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
        fw, fh = self.frame_wh
        return tuple(min(max(int(round(v / s * 1000)), 0), 999) for v, s in zip(px, (fw, fh, fw, fh)))
