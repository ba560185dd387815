"""Native-resolution images (tiling kind ``native``) and flat patches against transformers' Qwen2-VL image processors
(``Qwen2VLImageProcessorPil``: PIL bicubic, ``Qwen2VLImageProcessor``: torchvision), fp32, max abs diff <= 1e-4."""
import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.qwen2_vl import image_processing_qwen2_vl as hf_image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

from vlm.data import boxes
from vlm.data.images import ImageProcessor, check_tiling
from vlm.data.layouts import LAYOUTS
from vlm.data.patches import concat_patches, from_patches, smart_resize, to_patches

BUDGET = {"min_pixels": 28 * 28 * 2, "max_pixels": 28 * 28 * 12}
# odd sizes (width, height): under min_pixels (scaled up), inside, over max_pixels (scaled down), thin, a multiple
#: the same budget as transformers' processors take it (their min_pixels / max_pixels keywords are kept for backward
#: compatibility only)
HF_SIZE = {"size": {"shortest_edge": BUDGET["min_pixels"], "longest_edge": BUDGET["max_pixels"]}}
SIZES = [(13, 17), (37, 53), (100, 29), (250, 120), (64, 200), (11, 300), (56, 84), (640, 480)]


def rand_image(size, seed=0):
    w, h = size
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def native(**options):
    return ImageProcessor(28, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, tiling={"kind": "native", **BUDGET, **options})


@pytest.mark.parametrize("budget", [{}, BUDGET, {"min_pixels": 100, "max_pixels": 5000}])
def test_smart_resize_is_the_reference(budget):
    kw = {"min_pixels": budget.get("min_pixels", 56 * 56), "max_pixels": budget.get("max_pixels", 28 * 28 * 1280)}
    for h in (1, 3, 13, 28, 29, 55, 100, 333, 1000, 4000):
        for w in (1, 7, 28, 42, 99, 500, 3001):
            if max(h, w) / min(h, w) > 200:
                continue
            assert smart_resize(h, w, factor=28, **kw) == hf_image.smart_resize(h, w, factor=28, **kw), (h, w)


@pytest.mark.parametrize(("resample", "reference"), [("pil", Qwen2VLImageProcessorPil),
                                                     ("torchvision", Qwen2VLImageProcessor)])
def test_pixels_and_grid_equal_transformers(resample, reference):
    imgs = [rand_image(s, seed=i) for i, s in enumerate(SIZES)]
    proc = native(resample=resample)
    views = []
    for img in imgs:
        pixels, info = proc(img)
        assert pixels.shape[0] == 1 and info.mode == "native"
        views.append(pixels[0])
    ours, grid = concat_patches(views)
    ref = reference(**HF_SIZE)(imgs, return_tensors="pt")
    assert torch.equal(grid, ref["image_grid_thw"])
    assert ours.shape == ref["pixel_values"].shape
    assert (ours - ref["pixel_values"]).abs().max().item() <= 1e-4


def test_layout_states_sizes_and_grid_before_decoding():
    lay = LAYOUTS.get("native")(28, check_tiling({"kind": "native", **BUDGET}))
    ref = Qwen2VLImageProcessorPil(**HF_SIZE)
    for w, h in SIZES:
        (vh, vw), = lay.view_sizes(w, h)
        assert vh % 28 == 0 and vw % 28 == 0 and BUDGET["min_pixels"] <= vh * vw <= BUDGET["max_pixels"]
        assert lay.grid_thw(w, h) == (1, vh // 14, vw // 14)
        assert vh // 14 * vw // 14 == ref.get_number_of_image_patches(h, w)
        views = lay.layout(Image.new("RGB", (w, h)))
        assert [(v.height, v.width) for v in views.images] == [(vh, vw)] and views.frame_size == (vw, vh)


def test_over_max_pixels_is_resized_down_and_boxes_follow():
    img = rand_image((640, 480))
    _, info = native()(img)
    rw, rh = info.extra["resized"]
    assert info.extra["downscaled"] and rw * rh <= BUDGET["max_pixels"] < 640 * 480
    assert info.frame_size == (rw, rh) and info.extra["grid_thw"] == (1, rh // 14, rw // 14)
    box = (64, 48, 320, 480)
    got = info.transform_box(box)
    assert got == pytest.approx((64 * rw / 640, 48 * rh / 480, 320 * rw / 640, rh))  # clipped to the view, not S
    assert info.inverse_box(got) == pytest.approx(box)
    text = boxes.rewrite_json_boxes('{"bbox_2d": [64, 48, 320, 480]}', lambda b: info.transform_box(b, as_int=True))
    assert text == '{"bbox_2d": [' + ", ".join(str(round(v)) for v in got) + "]}"
    # normalized [0, 1000) boxes keep their meaning: the view is the whole image
    assert not info.changes_normalized_frame and info.transform_norm_box((10, 20, 500, 999)) == (10, 20, 500, 999)


def test_a_view_already_at_its_size_is_kept():
    img = rand_image((56, 84))
    pixels, info = native()(img)
    assert info.extra["resized"] == (56, 84) and not info.extra["downscaled"]
    expected = (np.asarray(img, np.float32) / 255 - np.asarray(OPENAI_CLIP_MEAN, np.float32)) / np.asarray(
        OPENAI_CLIP_STD, np.float32)
    assert np.abs(pixels[0].permute(1, 2, 0).numpy() - expected).max() <= 1e-5


@pytest.mark.parametrize("size", [(1000, 4), (3, 700)])
def test_aspect_ratio_over_200_names_the_size_and_the_rule(size):
    lay = LAYOUTS.get("native")(28, check_tiling({"kind": "native"}))
    with pytest.raises(ValueError, match=rf"image of {size[0]}x{size[1]} pixels .*aspect ratio of .*at most 200"):
        lay.view_sizes(*size)
    with pytest.raises(ValueError, match=rf"image of {size[0]}x{size[1]} pixels"):
        native()(Image.new("RGB", size))
    with pytest.raises(ValueError):  # the reference refuses it too
        hf_image.smart_resize(size[1], size[0])


@pytest.mark.parametrize(("options", "error", "match"), [
    ({"min_pixel": 5}, TypeError, r"unknown tiling key\(s\) \['min_pixel'\]"),
    ({"min_pixels": 5000, "max_pixels": 4000}, ValueError, "min_pixels <= max_pixels"),
    ({"min_pixels": 100, "max_pixels": 500}, ValueError, "under one merged patch"),
    ({"merge_size": 0}, ValueError, "merge_size"),
    ({"resample": "lanczos"}, ValueError, r"resample='lanczos'; expected one of \['pil', 'torchvision'\]"),
])
def test_bad_options_are_named(options, error, match):
    with pytest.raises(error, match=match):
        check_tiling({"kind": "native", **options})


def test_defaults_are_qwen2_vl_processor_defaults():
    t = check_tiling({"kind": "native"})
    ref = Qwen2VLImageProcessorPil()
    assert (t["min_pixels"], t["max_pixels"]) == (ref.size["shortest_edge"], ref.size["longest_edge"])
    assert (t["patch_size"], t["merge_size"], t["temporal_patch_size"]) == (
        ref.patch_size, ref.merge_size, ref.temporal_patch_size)


@pytest.mark.parametrize(("frames", "t"), [(None, 1), (2, 1), (3, 2), (4, 2), (5, 3)])
def test_patches_round_trip(frames, t):
    g = torch.Generator().manual_seed(0)
    x = torch.randn((3, 56, 84) if frames is None else (frames, 3, 56, 84), generator=g)
    patches, grid = to_patches(x)
    assert grid == (t, 4, 6) and patches.shape == (t * 4 * 6, 3 * 2 * 14 * 14)
    back = from_patches(patches, grid)
    assert back.shape == (2 * t, 3, 56, 84)
    if frames is None:  # an image is 2 identical frames
        assert torch.equal(back[0], x) and torch.equal(back[1], x)
    else:  # a video of odd length repeats its last frame
        assert torch.equal(back[:frames], x) and all(torch.equal(f, x[-1]) for f in back[frames:])


def test_merge_blocks_are_contiguous():
    """Row k of an image's patches is patch (y, x) with the merge x merge blocks in order (transformers' layout)."""
    h, w = 4, 6
    x = torch.zeros(3, h * 14, w * 14)
    for y in range(h):
        for xx in range(w):
            x[:, y * 14:(y + 1) * 14, xx * 14:(xx + 1) * 14] = y * w + xx
    patches, _ = to_patches(x)
    order = [int(v) for v in patches[:, 0]]
    expected = [(by * 2 + my) * w + bx * 2 + mx for by in range(h // 2) for bx in range(w // 2)
                for my in range(2) for mx in range(2)]
    assert order == expected


def test_bad_pixels_are_named():
    with pytest.raises(ValueError, match=r"multiples of patch_size \* merge_size = 14 \* 2 = 28"):
        to_patches(torch.zeros(3, 56, 70))
    with pytest.raises(ValueError, match="no frames"):
        to_patches(torch.zeros(0, 3, 56, 56))
    with pytest.raises(ValueError, match=r"do not match grid_thw \(1, 4, 4\)"):
        from_patches(torch.zeros(15, 1176), (1, 4, 4))


def test_processor_counts_tokens_per_native_view_and_rewrites_boxes():
    from vlm.data.processor import Processor
    from vlm.data.sample import ImageRef, Message, Sample
    from vlm.data.tokenizer import byte_tokenizer

    seen = []

    def merged_tokens(hw):  # what qwen2_vl_vit + patch_merger give a view of H x W
        seen.append(hw)
        return hw[0] // 14 * hw[1] // 14 // 4

    img = rand_image((640, 480))
    sample = Sample([Message("user", [ImageRef(0), "Where?"]),
                     Message("assistant", ['{"bbox_2d": [64, 48, 320, 480]}'])], images=[img], id="n0")
    tok = byte_tokenizer()
    item = Processor(tok, "chatml", native(), merged_tokens)(sample)
    (h, w), = seen
    assert (h, w) == LAYOUTS.get("native")(28, check_tiling({"kind": "native", **BUDGET})).view_sizes(640, 480)[0]
    # the view goes to the encoder as flat patches with its grid (the layout's patch_options)
    assert item["pixel_values"].shape == (h // 14 * w // 14, 3 * 2 * 14 * 14)
    assert item["image_grid_thw"].tolist() == [[1, h // 14, w // 14]]
    assert int((item["input_ids"] == tok.convert_tokens_to_ids("<image>")).sum()) == h * w // (28 * 28)
    box = [round(v) for v in (64 * w / 640, 48 * h / 480, 320 * w / 640, h)]
    assert f'"bbox_2d": {box}' in tok.decode(item["input_ids"][item["labels"] != -100])


def test_native_options_are_checked_when_a_recipe_is_composed():
    from vlm.train import compose
    from vlm.train.config_check import ConfigError

    with pytest.raises(ConfigError, match=r"stage.sft.tiling: native tiling: max_pixels=500 is under one merged patch"):
        compose("micro", ["+stage.sft.tiling={kind: native, min_pixels: 100, max_pixels: 500}"])


def test_check_patches_names_the_disagreement():
    from vlm.data.patches import check_patches

    pixels, grid = concat_patches([torch.zeros(3, 56, 84), torch.zeros(3, 28, 28)])
    assert check_patches(pixels, grid) == [(1, 4, 6), (1, 2, 2)]
    with pytest.raises(ValueError, match=r"image_grid_thw \[\(1, 4, 6\), \(1, 2, 4\)\] asks for sum\(t\*h\*w\) = 32 "
                                         r"patches but pixel_values has 28 rows"):
        check_patches(pixels, [[1, 4, 6], [1, 2, 4]])
    with pytest.raises(ValueError, match=r"video_grid_thw\[1\] = \(1, 3, 2\): .*multiples of merge_size=2"):
        check_patches(pixels, [[1, 4, 6], [1, 3, 2]], names=("pixel_values_videos", "video_grid_thw"))
    with pytest.raises(ValueError, match=r"image_grid_thw must be \(num_items, 3\)"):
        check_patches(pixels, [1, 4, 6])
    with pytest.raises(ValueError, match=r"pixel_values must be \(patches, 3 \* 2 \* 14\*\*2 = 1176\)"):
        check_patches(pixels[:, :100], grid)
