"""Image layouts as registered strategies: what a layout states before decoding equals what it produces."""
import pytest
from PIL import Image

from vlm.data.images import ImageProcessor, check_tiling
from vlm.data.layouts import LAYOUTS, Layout

OPTIONS = {"dynamic": {"kind": "dynamic", "min_tiles": 1, "max_tiles": 6},
           "anyres": {"kind": "anyres", "pinpoints": [[64, 64], [64, 128], [128, 64], [128, 128]]},
           "native": {"kind": "native", "min_pixels": 28 * 28, "max_pixels": 28 * 28 * 16},
           "idefics3": {"kind": "idefics3", "longest_edge": 96}}
SIZES = [(32, 32), (100, 37), (37, 100), (250, 120), (64, 200)]


def test_every_registered_layout_is_covered_here():
    assert set(LAYOUTS.names()) == set(OPTIONS)


@pytest.mark.parametrize("kind", sorted(OPTIONS))
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("max_tiles", [None, 2])
def test_stated_views_equal_produced_views(kind, size, max_tiles):
    options = LAYOUTS.get(kind).check(OPTIONS[kind])
    layout: Layout = LAYOUTS.get(kind)(32, options)
    img = Image.new("RGB", size, (10, 200, 30))
    views = layout.layout(img, max_tiles=max_tiles)
    stated = layout.view_sizes(*size, max_tiles=max_tiles)
    assert len(stated) == layout.num_views(*size, max_tiles=max_tiles) == len(views.images)
    assert stated == [(v.height, v.width) for v in views.images]
    assert len(views.transforms) == len(views.kinds) == len(views.images)
    # the processor asks the layout: same count, same pixels' shapes
    proc = ImageProcessor(32, (0.5,) * 3, (0.5,) * 3, tiling=OPTIONS[kind])
    pixels, info = proc(img, max_tiles=max_tiles)
    assert pixels.shape[0] == proc.num_images(*size, max_tiles=max_tiles) == len(stated)
    assert info.mode == layout.mode and info.kinds == views.kinds


def test_unknown_kind_lists_registered_layouts():
    with pytest.raises(ValueError,
                       match=r"tiling kind 'tiles' unknown; expected one of \['anyres', 'dynamic', 'idefics3', 'native'\]"):
        check_tiling({"kind": "tiles"})


@pytest.mark.parametrize("kind", sorted(OPTIONS))
def test_unknown_option_named(kind):
    with pytest.raises(TypeError, match=r"unknown tiling key\(s\) \['max_tile'\]"):
        check_tiling({**OPTIONS[kind], "max_tile": 3})
