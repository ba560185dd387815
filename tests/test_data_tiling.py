"""Tiling: InternVL dynamic preprocess and LLaVA-NeXT anyres against reference vectors and transformers."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlm.data.tiling import (anyres_layout, anyres_tiles, best_resolution, candidate_grids, dynamic_tiles,
                             pinpoints_from_grids, tile_grid)

# reference vectors from InternVL's and LLaVA-NeXT's own code, in the shared/ folder beside the checkout
REF = Path(__file__).resolve().parents[2] / "shared" / "reference" / "tiling.json"
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def _ref():
    if not REF.exists():
        pytest.skip(f"{REF} not available")
    return json.loads(REF.read_text())


def _img(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_tile_grid_reference_vectors():
    ref = _ref()
    assert ref["tile_grid"]
    for v in ref["tile_grid"]:
        got = tile_grid(v["width"], v["height"], min_tiles=v["min_tiles"], max_tiles=v["max_tiles"],
                        tile_size=v["tile_size"])
        assert list(got) == v["grid"], v


def test_best_resolution_reference_vectors():
    ref = _ref()
    assert ref["best_resolution"]
    for v in ref["best_resolution"]:
        assert list(best_resolution(v["height"], v["width"], v["pinpoints"])) == v["best"], v


def test_best_resolution_matches_transformers():
    from transformers.image_processing_utils import select_best_resolution

    rng = random.Random(0)
    pins = PINPOINTS + [[448, 448], [896, 448], [448, 1344]]
    for _ in range(500):
        h, w = rng.randint(1, 3000), rng.randint(1, 3000)
        assert best_resolution(h, w, pins) == tuple(select_best_resolution((h, w), pins)), (h, w)


def test_candidate_order_is_internvl():
    # built the way InternVL builds it: a set sorted by tile count
    want = sorted(set((i, j) for n in range(2, 7) for i in range(1, n + 1) for j in range(1, n + 1)
                      if 2 <= i * j <= 6), key=lambda x: x[0] * x[1])
    assert candidate_grids(2, 6) == want
    assert all(2 <= i * j <= 6 for i, j in want)
    with pytest.raises(ValueError):
        candidate_grids(3, 2)


def test_tie_rule_prefers_larger_grid_only_for_large_images():
    # aspect 1.5 is exactly between (1, 1) and (2, 1) when max_tiles=2: the larger grid wins iff area > 0.5*S*S*2
    assert tile_grid(672, 448, max_tiles=2, tile_size=448) == (2, 1)   # area = 1.5 S^2 > S^2
    assert tile_grid(150, 100, max_tiles=2, tile_size=448) == (1, 1)   # tiny image keeps one tile
    assert tile_grid(448, 672, max_tiles=2, tile_size=448) == (1, 2)


def test_extreme_aspect_and_min_tiles():
    assert tile_grid(5000, 10, max_tiles=12) == (12, 1)
    assert tile_grid(10, 5000, max_tiles=6) == (1, 6)
    # a square image with min_tiles=2 must use at least two tiles
    c, r = tile_grid(500, 500, min_tiles=2, max_tiles=4)
    assert 2 <= c * r <= 4 and c == r == 2
    c, r = tile_grid(500, 500, min_tiles=2, max_tiles=3)
    assert c * r in (2, 3)
    assert tile_grid(1, 1, max_tiles=12) == (1, 1)
    with pytest.raises(ValueError):
        tile_grid(0, 10)


@pytest.mark.parametrize("size", [(640, 480), (300, 1200), (20, 30)])
def test_dynamic_tiles_reassemble(size):
    img = _img(*size)
    s = 32
    cols, rows = tile_grid(*size, max_tiles=12, tile_size=s)
    tiles = dynamic_tiles(img, max_tiles=12, tile_size=s, thumbnail=True)
    n = cols * rows
    assert len(tiles) == n + (1 if n > 1 else 0)
    assert all(t.size == (s, s) for t in tiles)
    canvas = Image.new("RGB", (cols * s, rows * s))
    for k in range(n):
        canvas.paste(tiles[k], ((k % cols) * s, (k // cols) * s))
    ref = img.resize((cols * s, rows * s), Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(canvas), np.asarray(ref))
    if n > 1:
        assert np.array_equal(np.asarray(tiles[-1]), np.asarray(img.resize((s, s), Image.Resampling.BICUBIC)))
    assert len(dynamic_tiles(img, max_tiles=12, tile_size=s, thumbnail=False)) == n


def test_anyres_layout_and_tiles():
    lay = anyres_layout(640, 480, PINPOINTS, 336)
    assert lay.best == (672, 672) and lay.grid == (2, 2)
    assert lay.resized == (672, 504) and lay.paste == (0, 84)
    tiles = anyres_tiles(_img(640, 480), PINPOINTS, 336)
    assert len(tiles) == 5 and all(t.size == (336, 336) for t in tiles)
    # padding is black above the pasted image
    assert np.asarray(tiles[1])[:84].max() == 0
    with pytest.raises(ValueError, match="multiple"):
        anyres_layout(100, 100, [[300, 336]], 336)


@pytest.mark.parametrize("size", [(640, 480), (300, 900), (1000, 200), (50, 60)])
def test_anyres_matches_transformers_llava_next(size):
    torch = pytest.importorskip("torch")
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from vlm.data.images import ImageProcessor

    ref = LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    img = _img(*size, seed=1)
    want = ref(img, return_tensors="pt")["pixel_values"][0]
    ours, info = ImageProcessor(336, ref.image_mean, ref.image_std,
                                tiling={"kind": "anyres", "pinpoints": ref.image_grid_pinpoints})(img)
    assert ours.shape == want.shape
    assert torch.allclose(ours, want, atol=1e-5)
    assert info.kinds[0] == "base" and info.best_resolution == best_resolution(size[1], size[0], PINPOINTS)


def test_pinpoints_from_grids():
    assert pinpoints_from_grids([[1, 2], [2, 1]], 336) == [[336, 672], [672, 336]]
    pins = pinpoints_from_grids("(1x1),...,(2x3)", 384)
    assert len(pins) == 6 and [384, 384] in pins and [768, 1152] in pins


# ------------------------------------------------------------------- transformers' InternVL tiling as the oracle
# transformers' InternVL processor tiles with the GotOcr2 image processor (``crop_to_patches``): the same rule as
# InternVL's ``dynamic_preprocess`` (closest grid aspect, ties to the larger grid while the image area exceeds half
# the tiles' area, thumbnail last). Those dependency functions are the oracle; ../shared/reference/tiling.json
# (above) holds vectors produced by InternVL's own code.


def test_tile_grid_matches_transformers_on_many_sizes_and_ties():
    """The grid choice equals transformers' ``get_optimal_tiled_canvas`` on a lattice of aspect ratios that hits the
    exact-tie rule many times, at small and large areas, and on random sizes."""
    from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

    sizes = [(w * k, h * k) for w in range(1, 13) for h in range(1, 13) for k in (7, 50, 224, 448, 1000)]
    rng = random.Random(0)
    sizes += [(rng.randint(1, 4000), rng.randint(1, 4000)) for _ in range(500)]
    ties = 0
    for w, h in sizes:
        for lo, hi, s in ((1, 12, 448), (1, 6, 448), (2, 9, 336), (1, 4, 32)):
            diffs = sorted(abs(w / h - i / j) for i, j in candidate_grids(lo, hi))
            ties += diffs[0] == diffs[1]
            want = get_optimal_tiled_canvas((h, w), (s, s), lo, hi)  # (height, width) in, (cols, rows) out
            assert tile_grid(w, h, min_tiles=lo, max_tiles=hi, tile_size=s) == tuple(want), (w, h, lo, hi, s)
    assert ties > 100  # the tie rule was exercised


@pytest.mark.parametrize("size,max_tiles", [((90, 40), 6), ((33, 100), 12), ((64, 64), 4), ((200, 30), 8),
                                            ((48, 32), 2), ((640, 480), 12)])
def test_dynamic_tiles_pixel_equal_to_transformers(size, max_tiles):
    from transformers.image_utils import SizeDict
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    img = _img(*size, seed=3)
    ref = GotOcr2ImageProcessorPil()
    want = ref.crop_image_to_patches(np.asarray(img), min_patches=1, max_patches=max_tiles, use_thumbnail=True,
                                     patch_size=SizeDict(height=16, width=16), resample=ref.resample)  # (S, S, 3) each
    got = dynamic_tiles(img, min_tiles=1, max_tiles=max_tiles, tile_size=16, thumbnail=True)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert np.array_equal(np.asarray(a), np.asarray(b))
