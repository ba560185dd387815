"""LLaVA-NeXT's spatial arrangement (``arrangement: {name: anyres_grid, pinpoints: [[height, width], ...], unpad,
newline, max_tiles}``), for the ``anyres`` image layout (a base view, then the best pinpoint's ``rows x cols`` tiles of
``S x S``, row-major; ``vlm.data.layouts.anyres``).

Per image of original ``H x W`` pixels, with ``(h', w')`` the LLM-token grid of one tile:

1. the base view's ``h' * w'`` tokens first;
2. the tiles' tokens placed on one ``(rows * h') x (cols * w')`` grid (tile ``(r, c)`` at rows ``r*h'..``, columns
   ``c*w'..``);
3. ``unpad``: the rows (or columns) of that grid that fall on the layout's centred padding are dropped: the image
   fills the canvas's width when its aspect ``W / H`` is wider than the grid's, and ``round(H * grid_w / W)`` rows
   centred are kept (else the same over columns), as LLaVA-NeXT's ``unpad_image``;
4. ``max_tiles`` (LLaVA-OneVision's ``anyres_max_N``; ``null``: LLaVA-NeXT, no budget): when the kept grid holds more
   than about ``N`` tiles' tokens (``ratio = sqrt(rows_kept * cols_kept / (N * h'w')) > 1.1``), it is pooled
   bilinearly to ``int(rows_kept // ratio) x int(cols_kept // ratio)``;
5. ``newline``: a learned vector ``image_newline (D,)`` after every row of the grid;

so one image is ``h'w' + rows * (cols + newline)`` tokens, ``rows x cols`` the grid after 3 and 4 (``num_tokens``). An image of one view (no
tiles) is its view's tokens, plus one ``image_newline`` with ``newline``.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlm.arrangements.base import Arrangement, views_per_image
from vlm.arrangements.registry import ARRANGEMENTS
from vlm.data.tiling import best_resolution


def unpadded_grid(height: int, width: int, rows: int, cols: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The kept ``(start, stop)`` of the rows and of the columns of a ``rows x cols`` token grid holding an image of
    ``height x width`` pixels resized into it keeping its aspect ratio and padded centred (LLaVA-NeXT's
    ``unpad_image``, float arithmetic included)."""
    if width / height > cols / rows:
        new = int(round(height * (cols / width), 7))
        pad = (rows - new) // 2
        return (pad, rows - pad), (0, cols)
    new = int(round(width * (rows / height), 7))
    pad = (cols - new) // 2
    return (0, rows), (pad, cols - pad)


@ARRANGEMENTS.register("anyres_grid")
class AnyresGrid(Arrangement):
    """Base view tokens, then the tiles' tokens on their spatial grid, unpadded, a newline after each row."""

    def __init__(self, dim: int, pinpoints: list[list[int]], unpad: bool = True, newline: bool = True,
                 max_tiles: int | None = None) -> None:
        super().__init__()
        if not pinpoints or any(len(p) != 2 or min(int(v) for v in p) < 1 for p in pinpoints):
            raise ValueError(f"{self.registry_name}: pinpoints={pinpoints!r}; expected a non-empty list of [height, "
                             f"width] pairs of positive pixel sizes")
        if max_tiles is not None and int(max_tiles) < 1:
            raise ValueError(f"{self.registry_name}: max_tiles={max_tiles!r}; expected a tile budget >= 1 or null (no "
                             f"pooling)")
        self.dim = int(dim)
        self.options = {"pinpoints": [[int(h), int(w)] for h, w in pinpoints], "unpad": bool(unpad),
                        "newline": bool(newline), "max_tiles": None if max_tiles is None else int(max_tiles)}
        # LLaVA-NeXT's initialization: N(0, 1/sqrt(D))
        self.image_newline = nn.Parameter(torch.randn(self.dim) / math.sqrt(self.dim)) if newline else None
        self.tile_size: int | None = None
        self.tile_grid: tuple[int, int] | None = None

    # ---------------------------------------------------------------------------------------- composition
    def attach(self, encoder: Any, connector: Any) -> None:
        s = encoder.image_size
        s = int(s[0] if isinstance(s, (tuple, list)) else s)
        bad = [p for p in self.options["pinpoints"] if p[0] % s or p[1] % s]
        if bad:
            shown = str(bad) if len(bad) <= 4 else str(bad[:4])[:-1] + f", ...] ({len(bad)} of " \
                f"{len(self.options['pinpoints'])})"
            raise ValueError(f"{self.registry_name}: pinpoints {shown} are not multiples of the encoder's image (tile) "
                             f"size {s}: every pinpoint [height, width] must be a whole number of {s} x {s} tiles "
                             f"(e.g. {[[s, 2 * s], [2 * s, s], [2 * s, 2 * s]]})")
        grid = connector.output_grid(encoder.grid((s, s))) \
            if not getattr(connector, "fuses_by_cross_attention", False) else None
        if grid is None:
            raise ValueError(f"{self.registry_name} arranges the tokens of a tile on its grid, but the "
                             f"{getattr(connector, 'registry_name', type(connector).__name__)!r} connector's tokens have "
                             f"no grid (a resampler's queries or cross-attention); use a token-wise or grid-keeping "
                             f"connector (mlp, linear, pixel_shuffle_mlp, patch_merger)")
        tokens = connector.num_tokens(encoder.num_tokens((s, s)), encoder.grid((s, s)))
        if tokens != grid[0] * grid[1]:
            raise ValueError(f"{self.registry_name} arranges a tile's {grid[0]}x{grid[1]} token grid, but a tile gives "
                             f"{tokens} "
                             f"tokens (the encoder keeps tokens off its patch grid, e.g. CLS: use select='patch')")
        self.tile_size, self.tile_grid = s, (int(grid[0]), int(grid[1]))

    @classmethod
    def expected_layout(cls, options: dict[str, Any]) -> dict[str, Any]:
        return {"kind": "anyres", "pinpoints": [[int(h), int(w)] for h, w in options["pinpoints"]]}

    # ------------------------------------------------------------------------------------------- geometry
    def tiles(self, height: int, width: int) -> tuple[int, int]:
        """``(rows, cols)`` of tiles of an image of ``height x width`` pixels (its best pinpoint / ``S``)."""
        if height < 1 or width < 1:
            raise ValueError(f"{self.registry_name}: image size (height, width) = {(height, width)}; expected positive "
                             f"sizes")
        bh, bw = best_resolution(height, width, self.options["pinpoints"])
        return bh // self.tile_size, bw // self.tile_size

    def num_views(self, height: int, width: int) -> int:
        rows, cols = self.tiles(height, width)
        return 1 + rows * cols

    def kept(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """The kept ``(start, stop)`` rows and columns of the image's token grid (all of them without ``unpad``)."""
        rows, cols = self.tiles(height, width)
        (gh, gw) = self.tile_grid
        if not self.options["unpad"]:
            return (0, rows * gh), (0, cols * gw)
        (r0, r1), (c0, c1) = unpadded_grid(height, width, rows * gh, cols * gw)
        # an image so thin that it covers less than one token row (column) keeps none, as LLaVA-NeXT: then only
        # the newlines of its kept rows follow the base view's tokens
        return (r0, max(r0, r1)), (c0, max(c0, c1))

    def pooled(self, rows: int, cols: int) -> tuple[int, int] | None:
        """The grid a kept ``rows x cols`` grid is pooled to past the ``max_tiles`` budget (OneVision's
        ``anyres_max``), or ``None`` when it is kept as is."""
        budget = self.options["max_tiles"]
        if budget is None:
            return None
        gh, gw = self.tile_grid
        ratio = math.sqrt(rows * cols / (budget * gh * gw))
        return (int(rows // ratio), int(cols // ratio)) if ratio > 1.1 else None

    def num_tokens(self, height: int, width: int) -> int:
        (r0, r1), (c0, c1) = self.kept(height, width)
        gh, gw = self.tile_grid
        rows, cols = self.pooled(r1 - r0, c1 - c0) or (r1 - r0, c1 - c0)
        return gh * gw + rows * (cols + int(self.options["newline"]))

    # -------------------------------------------------------------------------------------------- forward
    def forward(self, features: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        gh, gw = self.tile_grid
        counts = views_per_image(self, image_sizes)
        if sum(counts) != features.shape[0] or features.shape[1] != gh * gw:
            raise ValueError(f"{self.registry_name}: features of shape {tuple(features.shape)} for images of sizes "
                             f"{image_sizes.tolist()} (height, width), which need {counts} views of {gh * gw} tokens")
        out = []
        for feats, (h, w) in zip(features.split(counts), image_sizes.tolist()):
            d = feats.shape[-1]
            rows, cols = self.tiles(int(h), int(w))
            # (rows * cols, gh * gw, D) -> (rows * gh, cols * gw, D): tile (r, c) at its place
            grid = feats[1:].reshape(rows, cols, gh, gw, d).permute(0, 2, 1, 3, 4).reshape(rows * gh, cols * gw, d)
            (r0, r1), (c0, c1) = self.kept(int(h), int(w))
            grid = grid[r0:r1, c0:c1]
            pooled = self.pooled(*grid.shape[:2])
            if pooled is not None:  # (h, w, D) -> (D, h, w), bilinear, back
                grid = F.interpolate(grid.permute(2, 0, 1)[None], list(pooled), mode="bilinear")[0].permute(1, 2, 0)
            if self.image_newline is not None:
                nl = self.image_newline.to(grid.dtype).expand(grid.shape[0], 1, d)
                grid = torch.cat([grid, nl], dim=1)
            out += [feats[0], grid.reshape(-1, d)]
        return torch.cat(out)
