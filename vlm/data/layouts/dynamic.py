"""InternVL's dynamic tiles (``tiling: {kind: dynamic, min_tiles, max_tiles, thumbnail}``): the image resized to the
``cols x rows`` grid of ``S x S`` tiles whose aspect ratio is closest to its own (``vlm.data.tiling.tile_grid``, the
reference's tie-breaking), cut row-major, then a thumbnail (the whole image squashed to ``S x S``) when there is more
than one tile. Boxes are written in the thumbnail's frame."""
from __future__ import annotations

from typing import Any, Mapping

from PIL import Image

from vlm.data.geometry import Affine
from vlm.data.layouts.base import Layout, Views
from vlm.data.layouts.registry import LAYOUTS
from vlm.data.tiling import dynamic_tiles, tile_grid


@LAYOUTS.register("dynamic")
class DynamicTiles(Layout):
    mode = "dynamic"

    @classmethod
    def check(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        cls.check_keys(options, {"min_tiles", "max_tiles", "thumbnail"})
        t = {"kind": "dynamic", "min_tiles": int(options.get("min_tiles", 1)),
             "max_tiles": int(options.get("max_tiles", 12)), "thumbnail": bool(options.get("thumbnail", True))}
        if not 1 <= t["min_tiles"] <= t["max_tiles"]:
            raise ValueError(f"dynamic tiling needs 1 <= min_tiles <= max_tiles; got {t}")
        return t

    def budget(self, max_tiles: int | None) -> tuple[int, int]:
        """``(min_tiles, max_tiles)`` for one call: a per-call cap only lowers the configured maximum."""
        t = self.options
        mx = t["max_tiles"] if max_tiles is None else max(1, min(int(max_tiles), t["max_tiles"]))
        return min(t["min_tiles"], mx), mx

    def num_views(self, width: int, height: int, *, max_tiles: int | None = None) -> int:
        lo, hi = self.budget(max_tiles)
        cols, rows = tile_grid(width, height, min_tiles=lo, max_tiles=hi, tile_size=self.image_size)
        return cols * rows + (1 if self.options["thumbnail"] and cols * rows > 1 else 0)

    def layout(self, img: Image.Image, *, max_tiles: int | None = None) -> Views:
        (w, h), s = img.size, self.image_size
        lo, hi = self.budget(max_tiles)
        cols, rows = tile_grid(w, h, min_tiles=lo, max_tiles=hi, tile_size=s)
        views = dynamic_tiles(img, min_tiles=lo, max_tiles=hi, tile_size=s, thumbnail=self.options["thumbnail"])
        tsx, tsy = cols * s / w, rows * s / h
        transforms = [Affine(tsx, tsy, -c * s, -r * s) for r in range(rows) for c in range(cols)]
        kinds = ["tile"] * len(transforms)
        squash = Affine(s / w, s / h)
        if len(views) > len(transforms):
            transforms.append(squash)
            kinds.append("thumbnail")
        return Views(views, transforms, kinds, squash, grid=(cols, rows))
