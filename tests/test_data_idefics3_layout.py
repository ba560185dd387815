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


@pytest.mark.parametrize("encoder", ["clip", "siglip", "internvit", "idefics3_vision"])
@pytest.mark.parametrize("connector", [{"name": "mlp", "depth": 2},
                                       {"name": "pixel_shuffle_mlp", "scale": 0.5, "head": "linear"},
                                       {"name": "resampler", "num_queries": 4, "num_heads": 2}])
def test_the_layout_composes_with_any_encoder_and_connector(encoder, connector):
    """No arrangement: any tower stating a grid and any connector (a resampler too) takes the layout's views; the
    placeholders the processor writes between the family's text are views x the model's tokens per view, and one
    training forward runs on them."""
    import copy

    import torch

    import vlm
    from tests.conftest import TINY_TEXT, TINY_VISION
    from vlm.data.layouts.idefics3 import Idefics3Split
    from vlm.data.processor import Processor
    from vlm.data.sample import ImageRef, Message, Sample
    from vlm.data.tokenizer import byte_tokenizer

    tiling = check_tiling({"kind": "idefics3", "longest_edge": 64})
    tok = byte_tokenizer("chatml", extra_tokens=["<image>", *Idefics3Split.special_tokens(tiling)])
    enc = copy.deepcopy(TINY_VISION.get(encoder, {**TINY_VISION["siglip"], "name": encoder}))
    text = {**copy.deepcopy(TINY_TEXT["llama"]), "vocab_size": len(tok)}
    model = vlm.build({"encoder": enc, "connector": connector, "llm": {"name": "hf_causal_lm", "config": text}}, tok)
    proc = Processor.for_model(model, tok, "chatml", tiling=tiling)
    images = [picture(1, (70, 30)), picture(2, (20, 20))]  # 1 x 2 crops + global; 2 x 2 crops + global
    item = proc(Sample([Message("user", [ImageRef(0), ImageRef(1), "what?"]), Message("assistant", ["a"])],
                       images=images))
    views = item["pixel_values"].shape[0]
    assert views == 3 + 5 and int((item["input_ids"] == model.image_token_id).sum()) == views * model.num_image_tokens()
    assert int((item["input_ids"] == tok.convert_tokens_to_ids("<row_2_col_2>")).sum()) == 1
    out = model(item["input_ids"][None], item["pixel_values"], labels=item["labels"][None])
    assert torch.isfinite(out.loss)
