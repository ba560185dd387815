"""High-resolution tiling: InternVL's dynamic preprocess and LLaVA-NeXT's anyres, replicated exactly.

Conventions (they differ between the two references, so mind them):

- ``tile_grid`` returns ``(cols, rows)`` (InternVL's ``(i, j)`` = tiles along width, tiles along height).
- ``best_resolution`` takes ``(height, width)`` and returns ``(height, width)``; pinpoints are ``[height, width]``
  pairs, as in ``transformers.image_processing_utils.select_best_resolution`` (LLaVA-NeXT's original code reads the
  same lists as ``(width, height)``; the default pinpoint lists are symmetric, so the choice rarely matters).
- All resizes are PIL bicubic (``Image.BICUBIC``), which is what InternVL (``Image.resize`` default and
  ``T.Resize(..., BICUBIC)``) and transformers' PIL backend for LLaVA-NeXT use.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

from PIL import Image

BICUBIC = Image.Resampling.BICUBIC


def candidate_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """InternVL's ``target_ratios``: every ``(i, j)`` with ``min_tiles <= i*j <= max_tiles``, sorted by ``i*j``.

    Built exactly as InternVL builds it (a ``set`` then a stable sort on the product), so the order among grids with
    the same product — which decides ties — is the reference's.
    """
    if min_tiles < 1 or max_tiles < min_tiles:
        raise ValueError(f"need 1 <= min_tiles <= max_tiles; got min_tiles={min_tiles}, max_tiles={max_tiles}")
    ratios = set(
        (i, j) for n in range(min_tiles, max_tiles + 1) for i in range(1, n + 1) for j in range(1, n + 1)
        if i * j <= max_tiles and i * j >= min_tiles)
    return sorted(ratios, key=lambda x: x[0] * x[1])


def _closest_aspect_ratio(aspect_ratio: float, target_ratios: Sequence[tuple[int, int]], width: int, height: int,
                          image_size: int) -> tuple[int, int]:
    """InternVL's ``find_closest_aspect_ratio``, line for line (ties: a later, larger grid wins only when the image
    area exceeds half the grid's pixel area)."""
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def tile_grid(width: int, height: int, *, min_tiles: int = 1, max_tiles: int = 12,
              tile_size: int = 448) -> tuple[int, int]:
    """The ``(cols, rows)`` grid InternVL's ``dynamic_preprocess`` picks for a ``width x height`` image."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive; got {width}x{height}")
    ratios = candidate_grids(min_tiles, max_tiles)
    return _closest_aspect_ratio(width / height, ratios, width, height, tile_size)


def dynamic_tiles(img: Image.Image, *, min_tiles: int = 1, max_tiles: int = 12, tile_size: int = 448,
                  thumbnail: bool = True) -> list[Image.Image]:
    """InternVL's ``dynamic_preprocess``: resize to ``(cols*S, rows*S)``, cut ``cols*rows`` tiles row-major, then
    append a thumbnail (the whole image resized to ``S x S``) when ``thumbnail`` and there is more than one tile.

    Returns ``cols*rows`` (+1) RGB images of ``tile_size x tile_size``.
    """
    cols, rows = tile_grid(img.width, img.height, min_tiles=min_tiles, max_tiles=max_tiles, tile_size=tile_size)
    resized = img.resize((cols * tile_size, rows * tile_size), BICUBIC)
    tiles = [resized.crop((c * tile_size, r * tile_size, (c + 1) * tile_size, (r + 1) * tile_size))
             for r in range(rows) for c in range(cols)]
    if thumbnail and len(tiles) != 1:
        tiles.append(img.resize((tile_size, tile_size), BICUBIC))
    return tiles


def best_resolution(height: int, width: int, pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """LLaVA-NeXT's ``select_best_resolution``: the pinpoint ``(height, width)`` that maximizes the effective
    (downscaled, never upscaled-beyond-original) resolution, then minimizes the wasted area. Earlier pinpoints win
    exact ties. Arguments and result are ``(height, width)``."""
    if not pinpoints:
        raise ValueError("pinpoints is empty")
    best_fit = None
    max_effective = 0
    min_wasted = float("inf")
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        down_w, down_h = int(width * scale), int(height * scale)
        effective = min(down_w * down_h, width * height)
        wasted = (w * h) - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            max_effective = effective
            min_wasted = wasted
            best_fit = (int(h), int(w))
    assert best_fit is not None
    return best_fit


@dataclass(frozen=True)
class AnyresLayout:
    """Geometry of one anyres split (all in pixels).

    ``best``: chosen pinpoint ``(height, width)``; ``resized``: the aspect-preserving resize ``(width, height)``;
    ``paste``: top-left ``(x, y)`` of the resized image inside the padded ``best`` canvas; ``grid``: ``(cols, rows)``.
    """

    best: tuple[int, int]
    resized: tuple[int, int]
    paste: tuple[int, int]
    grid: tuple[int, int]


def anyres_layout(width: int, height: int, pinpoints: Sequence[Sequence[int]], tile_size: int) -> AnyresLayout:
    """Where the image lands in the padded best-resolution canvas (transformers' ``get_patch_output_size`` and
    ``_get_padding_size``; the same arithmetic as LLaVA-NeXT's ``resize_and_pad_image``)."""
    for h, w in pinpoints:
        if h % tile_size or w % tile_size:
            raise ValueError(f"pinpoint {[h, w]} is not a multiple of tile_size={tile_size}")
    bh, bw = best_resolution(height, width, pinpoints)
    scale_w, scale_h = bw / width, bh / height
    if scale_w < scale_h:
        new_w, new_h = bw, min(math.ceil(height * scale_w), bh)
    else:
        new_h, new_w = bh, min(math.ceil(width * scale_h), bw)
    return AnyresLayout(best=(bh, bw), resized=(new_w, new_h), paste=((bw - new_w) // 2, (bh - new_h) // 2),
                        grid=(bw // tile_size, bh // tile_size))


def anyres_tiles(img: Image.Image, pinpoints: Sequence[Sequence[int]], tile_size: int, *,
                 pad_color: tuple[int, int, int] = (0, 0, 0)) -> list[Image.Image]:
    """LLaVA-NeXT anyres: ``[base] + tiles``. ``base`` is the whole image resized (squashed) to ``S x S``; the tiles
    cut the image resized keeping its aspect ratio and padded centred (black, as the references do) to the best
    pinpoint, row-major. Returns ``1 + cols*rows`` RGB images of ``tile_size x tile_size``."""
    lay = anyres_layout(img.width, img.height, pinpoints, tile_size)
    bh, bw = lay.best
    canvas = Image.new("RGB", (bw, bh), tuple(pad_color))
    canvas.paste(img.resize(lay.resized, BICUBIC), lay.paste)
    cols, rows = lay.grid
    tiles = [canvas.crop((c * tile_size, r * tile_size, (c + 1) * tile_size, (r + 1) * tile_size))
             for r in range(rows) for c in range(cols)]
    return [img.resize((tile_size, tile_size), BICUBIC)] + tiles


def pinpoints_from_grids(grids: Sequence[Sequence[int]] | str, tile_size: int) -> list[list[int]]:
    """Pinpoints ``[[rows*S, cols*S], ...]`` from grid shapes ``[[rows, cols], ...]`` or LLaVA-OneVision's string
    form ``"(1x1),...,(3x3)"`` (every ``(r, c)`` between the two corners)."""
    if isinstance(grids, str):
        corners = [(int(a), int(b)) for a, b in re.findall(r"\((\d+)x(\d+)\)", grids)]
        if len(corners) != 2:
            raise ValueError(f"expected a range like '(1x1),...,(3x3)'; got {grids!r}")
        (r0, c0), (r1, c1) = corners
        grids = [(r, c) for r in range(r0, r1 + 1) for c in range(c0, c1 + 1)]
    return [[int(r) * tile_size, int(c) * tile_size] for r, c in grids]
