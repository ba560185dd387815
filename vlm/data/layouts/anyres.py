"""LLaVA-NeXT's anyres (``tiling: {kind: anyres, pinpoints: [[height, width], ...], pad_color}``): a base view (the
whole image squashed to ``S x S``) first, then the image resized keeping its aspect ratio into the best pinpoint,
padded centred and cut into ``S x S`` tiles row-major (``vlm.data.tiling.anyres_layout``). Boxes are written in the
base view's frame."""
from __future__ import annotations

from typing import Any, Mapping

from PIL import Image

from vlm.data.geometry import Affine
from vlm.data.layouts.base import Layout, Views
from vlm.data.layouts.registry import LAYOUTS
from vlm.data.tiling import anyres_layout, anyres_tiles


@LAYOUTS.register("anyres")
class Anyres(Layout):
    mode = "anyres"

    @classmethod
    def check(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        cls.check_keys(options, {"pinpoints", "pad_color"})
        if not options.get("pinpoints"):
            raise ValueError("anyres tiling needs pinpoints=[[height, width], ...]")
        return {"kind": "anyres", "pinpoints": [[int(h), int(w)] for h, w in options["pinpoints"]],
                "pad_color": tuple(int(c) for c in options.get("pad_color", (0, 0, 0)))}

    def pinpoints(self, max_tiles: int | None) -> list[list[int]]:
        """The configured pinpoints, or with a per-call budget those with at most ``max_tiles`` tiles (else the
        smallest)."""
        pins, s = self.options["pinpoints"], self.image_size
        if max_tiles is None:
            return pins
        fit = [p for p in pins if (p[0] // s) * (p[1] // s) <= max_tiles]
        return fit or [min(pins, key=lambda p: (p[0] // s) * (p[1] // s))]

    def num_views(self, width: int, height: int, *, max_tiles: int | None = None) -> int:
        cols, rows = anyres_layout(width, height, self.pinpoints(max_tiles), self.image_size).grid
        return 1 + cols * rows

    def layout(self, img: Image.Image, *, max_tiles: int | None = None) -> Views:
        (w, h), s = img.size, self.image_size
        pins = self.pinpoints(max_tiles)
        lay = anyres_layout(w, h, pins, s)
        views = anyres_tiles(img, pins, s, pad_color=self.options["pad_color"])
        (rw, rh), (px, py), (cols, rows) = lay.resized, lay.paste, lay.grid
        squash = Affine(s / w, s / h)
        transforms = [squash] + [Affine(rw / w, rh / h, px - c * s, py - r * s)
                                 for r in range(rows) for c in range(cols)]
        kinds = ["base"] + ["tile"] * (cols * rows)
        return Views(views, transforms, kinds, squash, grid=(cols, rows), best_resolution=lay.best,
                     extra={"resized": lay.resized, "paste": lay.paste})
