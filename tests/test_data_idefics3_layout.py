"""The ``idefics3`` image layout against transformers' ``Idefics3ImageProcessorPil`` (the oracle): the same crop grid
(rows x cols) and pixels for many sizes (a 2000x2 strip included: its short side is kept at one pixel, then one crop
row), the count stated before decoding, the text around each image, the single-view cases (no splitting; a longest
edge of one crop), and the errors for bad options."""
import numpy as np
import pytest
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

from tests.conftest import picture
from vlm.data.images import ImageProcessor, check_tiling
from vlm.data.layouts import LAYOUTS
from vlm.data.layouts.idefics3 import FAKE_TOKEN, GLOBAL_TOKEN

S = 32
# (width, height): wide, tall, square, tiny, odd, a near-square just over one crop, long strips
SIZES = [(150, 40), (30, 90), (64, 64), (5, 7), (61, 57), (33, 31), (300, 20), (17, 250), (96, 96), (97, 40),
         (2000, 2)]


def theirs(edge, split=True):
    return Idefics3ImageProcessorPil(size={"longest_edge": edge}, max_image_size={"longest_edge": S},
                                     do_image_splitting=split)


@pytest.mark.parametrize("edge", [96, 128, 32])
@pytest.mark.parametrize("split", [True, False])
def test_views_and_pixels_equal_transformers(edge, split):
    ip = ImageProcessor(S, (0.5,) * 3, (0.5,) * 3, tiling={"kind": "idefics3", "longest_edge": edge, "split": split})
    ref = theirs(edge, split)
    for k, (w, h) in enumerate(SIZES):
        img = picture(k, (w, h))
        out = ref(images=[[img]], return_tensors="np", return_row_col_info=True)
        rows, cols = out["rows"][0][0], out["cols"][0][0]
        pixels, info = ip(img)
        assert pixels.shape[0] == (rows * cols + 1 if rows else 1) == ip.num_images(w, h), (w, h)
        assert (info.grid == (cols, rows)) if rows else info.kinds == ["image"]
        # transformers' own count, stated before decoding, agrees with the pixels it produced
        assert ref.get_number_of_image_patches(h, w)[1:] == ((rows, cols) if split else (0, 0))
        assert np.abs(pixels.numpy() - out["pixel_values"][0]).max() <= 1e-5, (w, h)


def test_image_text_is_the_family_prompt():
    lay = LAYOUTS.get("idefics3")(S, check_tiling({"kind": "idefics3", "longest_edge": 64}))
    ip = ImageProcessor(S, (0.5,) * 3, (0.5,) * 3, tiling={"kind": "idefics3", "longest_edge": 64})
    _, info = ip(picture(0, (80, 40)))  # -> 64x32: one row of two crops + the global image
    t = "<image>"
    assert lay.image_text(info, t, [2, 2, 2]) == (f"{FAKE_TOKEN}<row_1_col_1>{t * 2}{FAKE_TOKEN}<row_1_col_2>{t * 2}"
                                                  f"\n\n{FAKE_TOKEN}{GLOBAL_TOKEN}{t * 2}{FAKE_TOKEN}")
    _, one = ip(picture(0, (64, 64)))  # 64x64: 2x2 crops
    assert one.grid == (2, 2)
    single = ImageProcessor(S, (0.5,) * 3, (0.5,) * 3, tiling={"kind": "idefics3", "longest_edge": 32})
    _, info1 = single(picture(0, (80, 40)))
    assert lay.image_text(info1, t, [3]) == f"{FAKE_TOKEN}{GLOBAL_TOKEN}{t * 3}{FAKE_TOKEN}"


def test_bad_options_are_named():
    with pytest.raises(ValueError, match=r"longest_edge=0; expected a positive number of pixels"):
        check_tiling({"kind": "idefics3", "longest_edge": 0})
    with pytest.raises(TypeError, match=r"unknown tiling key\(s\) \['max_image_size'\]"):
        check_tiling({"kind": "idefics3", "max_image_size": 32})
    lay = LAYOUTS.get("idefics3")(S, check_tiling({"kind": "idefics3", "longest_edge": 96}))
    with pytest.raises(ValueError, match=r"image size 0x5 \(width x height\); expected positive sizes"):
        lay.num_views(0, 5)
