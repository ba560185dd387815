"""Native resolution (``tiling: {kind: native, min_pixels, max_pixels, patch_size, merge_size,
temporal_patch_size, resample}``), Qwen2-VL's image geometry: one view per image at its own size, resized (``resample:
pil``: PIL bicubic, as transformers' ``Qwen2VLImageProcessorPil``; ``torchvision``: as ``Qwen2VLImageProcessor``) to
``vlm.data.patches.smart_resize``: both sides multiples of ``factor = patch_size * merge_size``, area inside
``[min_pixels, max_pixels]``. An image over ``max_pixels`` is scaled down (one under ``min_pixels`` up), and the size
it got is recorded (``Views.extra["resized"]``, ``ImageInfo.extra``), so boxes follow: the box frame is the resized
view, in its own pixels (``Views.frame_size``). An aspect ratio over 200 is refused, naming the size and the rule.
The encoder sees the view as flat patches (``vlm.data.patches.to_patches``); its grid is ``(1, H / patch_size,
W / patch_size)``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlm.data.geometry import Affine
from vlm.data.layouts.base import Layout, Views
from vlm.data.layouts.registry import LAYOUTS
from vlm.data.patches import MAX_PIXELS, MIN_PIXELS, resize_uint8, smart_resize
from vlm.data.tiling import BICUBIC

DEFAULTS = {"min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS, "patch_size": 14, "merge_size": 2,
            "temporal_patch_size": 2}
#: how a view is resized: PIL's bicubic (``Qwen2VLImageProcessorPil``, vlm's other layouts) or torchvision's
#: antialiased bicubic on uint8 (``Qwen2VLImageProcessor``, what ``AutoImageProcessor`` picks when torchvision exists)
RESAMPLE = ("pil", "torchvision")


@LAYOUTS.register("native")
class Native(Layout):
    """One view per image at its ``smart_resize`` size; ``image_size`` (the encoder's nominal ``S``) is not used."""

    mode = "native"

    @classmethod
    def check(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        cls.check_keys(options, set(DEFAULTS) | {"resample"})
        t = {"kind": "native", **{k: int(options.get(k, v)) for k, v in DEFAULTS.items()},
             "resample": options.get("resample", "pil")}
        if t["resample"] not in RESAMPLE:
            raise ValueError(f"native tiling: resample={t['resample']!r}; expected one of {list(RESAMPLE)}")
        if min(t["patch_size"], t["merge_size"], t["temporal_patch_size"]) < 1:
            raise ValueError(f"native tiling needs patch_size, merge_size and temporal_patch_size >= 1; got {t}")
        if not 1 <= t["min_pixels"] <= t["max_pixels"]:
            raise ValueError(f"native tiling needs 1 <= min_pixels <= max_pixels; got min_pixels={t['min_pixels']}, "
                             f"max_pixels={t['max_pixels']}")
        factor = t["patch_size"] * t["merge_size"]
        if t["max_pixels"] < factor * factor:
            raise ValueError(f"native tiling: max_pixels={t['max_pixels']} is under one merged patch "
                             f"(patch_size * merge_size)**2 = {factor * factor} pixels")
        return t

    @property
    def patch_options(self) -> dict[str, int]:
        """The views go to the encoder as flat patches (Qwen2-VL's convention, ``vlm.data.patches``)."""
        return {k: self.options[k] for k in ("patch_size", "temporal_patch_size", "merge_size")}

    @property
    def factor(self) -> int:
        """Both sides of a view are multiples of this many pixels (``patch_size * merge_size``)."""
        return self.options["patch_size"] * self.options["merge_size"]

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """``(H, W)`` an image of ``width x height`` is resized to (``ValueError`` naming the size and the rule for
        an aspect ratio over 200)."""
        o = self.options
        return smart_resize(height, width, factor=self.factor, min_pixels=o["min_pixels"], max_pixels=o["max_pixels"])

    def num_views(self, width: int, height: int, *, max_tiles: int | None = None) -> int:
        self.resized_size(width, height)  # refuses an image it could not lay out, as layout() would
        return 1

    def view_sizes(self, width: int, height: int, *, max_tiles: int | None = None) -> list[tuple[int, int]]:
        return [self.resized_size(width, height)]

    def grid_thw(self, width: int, height: int) -> tuple[int, int, int]:
        """The patch grid ``(1, H / patch_size, W / patch_size)`` of an image of ``width x height``."""
        h, w = self.resized_size(width, height)
        p = self.options["patch_size"]
        return 1, h // p, w // p

    def layout(self, img: Image.Image, *, max_tiles: int | None = None) -> Views:
        (w, h) = img.size
        rh, rw = self.resized_size(w, h)
        if (rw, rh) == (w, h):
            view = img
        elif self.options["resample"] == "pil":
            view = img.resize((rw, rh), BICUBIC)
        else:
            arr = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)
            view = Image.fromarray(resize_uint8(arr, (rh, rw)).permute(1, 2, 0).numpy(), "RGB")
        frame = Affine(rw / w, rh / h)
        p = self.options["patch_size"]
        extra = {"resized": (rw, rh), "grid_thw": (1, rh // p, rw // p),
                 "downscaled": rw * rh < w * h, "max_pixels": self.options["max_pixels"]}
        return Views([view], [frame], ["image"], frame, extra=extra, frame_size=(rw, rh))
