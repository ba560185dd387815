"""Processor: placeholder expansion, tiling, pixel order, tile budget, truncation, generation, for_model."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from data_fixtures import image_processor, mean_color, processor, trained_text
from PIL import Image

from vlm.data.dataset import ProcessedDataset, SampleDataset
from vlm.data.processor import Processor, SampleDropped
from vlm.data.readers import SampleError
from vlm.data.sample import ImageRef, Message, Sample
from vlm.data.tokenizer import byte_tokenizer

RED, GREEN = Image.new("RGB", (20, 20), (255, 0, 0)), Image.new("RGB", (30, 10), (0, 255, 0))
WIDE = Image.new("RGB", (200, 90), (0, 0, 255))
TINY_LM = {"encoder": {"name": "clip", "image_size": 32, "patch_size": 8, "hidden_size": 32, "num_layers": 2,
                       "num_heads": 4, "intermediate_size": 64},
           "connector": {"name": "mlp", "depth": 2},
           "llm": {"name": "hf_causal_lm", "config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                                      "num_hidden_layers": 2, "num_attention_heads": 4,
                                                      "num_key_value_heads": 2, "vocab_size": 300}}}


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def two_images(first: int = 0, images=(RED, GREEN), answer: str = "Both.") -> Sample:
    second = 1 - first
    return Sample([Message("user", [ImageRef(first), " and ", ImageRef(second), "?"]),
                   Message("assistant", [answer])], list(images), id="s")


def runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """(start, length) of each run of True."""
    m = mask.int().tolist()
    out, i = [], 0
    while i < len(m):
        if m[i]:
            j = i
            while j < len(m) and m[j]:
                j += 1
            out.append((i, j - i))
            i = j
        else:
            i += 1
    return out


def test_expansion_asks_num_image_tokens_with_tile_size(tok):
    seen = []

    def count(hw):
        seen.append(hw)
        return (hw[0] // 8) * (hw[1] // 8)

    p = Processor(tok, "chatml", image_processor(32), count)
    item = p(two_images())
    img = item["input_ids"] == p.image_token_id
    assert seen == [(32, 32), (32, 32)] and runs(img) == [(runs(img)[0][0], 16), (runs(img)[1][0], 16)]
    assert item["pixel_values"].shape == (2, 3, 32, 32) and item["meta"]["tiles"] == [1, 1]
    assert item["meta"]["image_sizes"] == [(20, 20), (30, 10)] and item["meta"]["num_images"] == 2


def test_pixel_values_follow_token_order(tok):
    item = processor(tok)(two_images(first=1))  # the green image (index 1) is referenced first
    assert mean_color(item["pixel_values"][0]) == (0, 255, 0) and mean_color(item["pixel_values"][1]) == (255, 0, 0)


def test_dynamic_tiling_tiles_contiguous_per_image(tok):
    ip = image_processor(16, tiling={"kind": "dynamic", "min_tiles": 1, "max_tiles": 6, "thumbnail": True})
    p = processor(tok, image_processor=ip, k=3, template={"name": "chatml", "image_start": "<img>",
                                                          "image_end": "</img>"})
    item = p(two_images(images=(WIDE, RED)))
    n_wide = ip.num_images(200, 90)
    assert n_wide > 2 and item["meta"]["tiles"] == [n_wide, 1]
    assert item["pixel_values"].shape[0] == n_wide + 1
    img_runs = runs(item["input_ids"] == p.image_token_id)
    assert [n for _, n in img_runs] == [3 * n_wide, 3]  # all tiles (thumbnail included) of an image are contiguous
    ids = item["input_ids"].tolist()
    start, end = tok.convert_tokens_to_ids("<img>"), tok.convert_tokens_to_ids("</img>")
    for s, n in img_runs:
        assert ids[s - 1] == start and ids[s + n] == end
    assert mean_color(item["pixel_values"][-1]) == (255, 0, 0)  # the red image's single tile comes last


def test_tile_budget_per_sample(tok):
    tiling = {"kind": "dynamic", "min_tiles": 1, "max_tiles": 12, "thumbnail": True}
    s = two_images(images=(WIDE, WIDE))
    free = processor(tok, image_processor=image_processor(16, tiling=tiling))(s)
    capped = processor(tok, image_processor=image_processor(16, tiling=tiling), max_tiles_per_sample=6)(s)
    assert sum(free["meta"]["tiles"]) > 6 >= sum(capped["meta"]["tiles"]) >= 2
    assert capped["pixel_values"].shape[0] == sum(capped["meta"]["tiles"])
    p = processor(tok, image_processor=image_processor(16, tiling=tiling), max_tiles_per_sample=1)
    with pytest.raises(SampleDropped, match="tile budget of 1") as ei:
        p(s)
    assert ei.value.reason == "tile_budget" and p.dropped["tile_budget"] == 1


def test_truncation_cuts_text_but_never_images(tok):
    s = two_images(answer="x" * 50)
    full = processor(tok)(s)
    n = full["input_ids"].numel()
    cut = processor(tok, max_length=n - 10)(s)
    assert cut["input_ids"].tolist() == full["input_ids"][: n - 10].tolist() and cut["meta"]["truncated"]
    assert cut["labels"].tolist() == full["labels"][: n - 10].tolist()
    first_img = int((full["input_ids"] == 265).nonzero()[0])
    p = processor(tok, max_length=first_img + 2)
    with pytest.raises(SampleDropped, match="truncating would cut an image") as ei:
        p(s)
    assert ei.value.reason == "too_long" and p.dropped["too_long"] == 1 and ei.value.sample_id == "s"
    with pytest.raises(SampleError) as ei:
        processor(tok, max_length=first_img + 2, truncation="error")(s)
    assert not isinstance(ei.value, SampleDropped) and ei.value.reason == "too_long"
    # only the prompt fits: nothing left to learn -> dropped too
    last_img = int((full["input_ids"] == 265).nonzero()[-1])
    with pytest.raises(SampleDropped, match="no trainable"):
        processor(tok, max_length=last_img + 3)(s)


def test_dataset_always_skips_dropped_samples(tok):
    recs = [{"id": str(i), "image": RED, "query": "q" * (200 if i == 1 else 1) + "<image>", "response": "r"}
            for i in range(3)] + [{"id": "3", "query": "q" * 200, "response": "r"}]
    ds = ProcessedDataset(SampleDataset(recs), processor(tok, max_length=100))  # skip_bad=False: still skipped
    assert ds[1]["meta"]["id"] == "2" and dict(ds.bad.counts) == {"too_long": 1}
    assert ds[1]["meta"]["skipped"][0]["reason"] == "too_long"
    assert ds[3]["meta"]["id"] == "0" and ds.bad.counts["no_labels"] == 1  # text cut, no answer left


def test_no_labels_and_generation(tok):
    s = Sample([Message("user", [ImageRef(0), "Describe."])], [RED], id="u")
    with pytest.raises(SampleError, match="no trainable") as ei:
        processor(tok)(s)
    assert ei.value.reason == "no_labels"
    item = processor(tok)(s, add_generation_prompt=True)
    assert tok.decode(item["input_ids"]).endswith("Describe.<|im_end|>\n<|im_start|>assistant\n")
    assert "target" not in item["meta"] and item["pixel_values"].shape[0] == 1


def test_errors_name_the_sample(tok):
    p = Processor(tok, "chatml", None, 4)
    with pytest.raises(SampleError, match="sample 's': sample has images but the processor has no image_processor"):
        p(two_images())
    assert p(Sample([Message("user", ["hi"]), Message("assistant", ["yo"])]))["pixel_values"] is None
    bad = Sample([Message("user", [ImageRef(0)]), Message("assistant", ["a"])], [RED, GREEN], id="b")
    with pytest.raises(SampleError, match="sample 'b': 1 image placeholder") as ei:
        p(bad)
    assert ei.value.reason == "image_count"


def test_for_model_duck_typed(tok):
    model = SimpleNamespace(image_size=32, image_mean=(0.5, 0.5, 0.5), image_std=(0.25, 0.25, 0.25),
                            num_image_tokens=lambda hw: hw[0] // 16 * hw[1] // 16,
                            config=SimpleNamespace(image_token="<image>", image_token_id=265))
    p = Processor.for_model(model, tok, "llama3", resize_mode="pad", max_length=512)
    item = p(two_images())
    assert item["pixel_values"].shape == (2, 3, 32, 32) and int((item["input_ids"] == 265).sum()) == 8
    assert p.image_processor.resize_mode == "pad" and p.image_processor.std == (0.25, 0.25, 0.25)
    assert p.max_length == 512 and p.template.name == "llama3"
    model.config.image_token_id = 7
    with pytest.raises(ValueError, match="image_token_id is 7 but the tokenizer maps '<image>' to 265"):
        Processor.for_model(model, tok)


def test_for_model_real_tiny_vlm_forward(tok):
    vlm = pytest.importorskip("vlm")
    torch.manual_seed(0)
    model = vlm.build(TINY_LM, tokenizer=tok).eval()
    p = Processor.for_model(model, tok, "chatml")
    item = p(two_images())
    assert int((item["input_ids"] == model.config.image_token_id).sum()) == 2 * model.num_image_tokens((32, 32))
    with torch.no_grad():
        out = model(item["input_ids"][None], pixel_values=item["pixel_values"], labels=item["labels"][None])
    assert out.logits.shape == (1, item["input_ids"].numel(), model.llm.vocab_size) and torch.isfinite(out.loss)


def test_literal_image_token_in_text_is_refused(tok):
    s = Sample([Message("user", ["Picture 1: <img>a.png</img> and a stray <image>"]), Message("assistant", ["ok"])],
               id="lit")
    with pytest.raises(SampleError, match="contains the image token '<image>' itself") as ei:
        processor(tok)(s)
    assert ei.value.reason == "image_token_in_text"


def test_for_model_token_count_pickles_without_the_model(tok):
    import pickle

    calls = []
    model = SimpleNamespace(image_size=32, image_mean=(0.5,) * 3, image_std=(0.5,) * 3,
                            num_image_tokens=lambda hw: calls.append(hw) or 9,
                            config=SimpleNamespace(image_token="<image>", image_token_id=265))
    p = Processor.for_model(model, tok)
    assert calls == [(32, 32)]
    count = pickle.loads(pickle.dumps(p.num_image_tokens))  # a lambda-holding model would not pickle
    assert count((32, 32)) == 9 and count.fn is None
    with pytest.raises(ValueError, match=r"tile size \(16, 16\) unknown"):
        count((16, 16))
    assert int((p(two_images())["input_ids"] == 265).sum()) == 18 and calls == [(32, 32)]


def test_boxes_in_text_follow_resize_and_pad():
    """Absolute JSON boxes are rescaled with the image (Qwen2.5-VL grounding SFT); Qwen [0,1000) boxes change only
    when padding changes the normalized frame; each box follows the image rendered before it."""
    from PIL import Image

    from vlm.data.images import ImageProcessor
    from vlm.data.sample import ImageRef, Message, Sample
    from vlm.data.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    wide, square = Image.new("RGB", (200, 100)), Image.new("RGB", (50, 50))
    sample = Sample([Message("user", [ImageRef(0), "Where is it?"]),
                     Message("assistant", ['{"bbox_2d": [20, 10, 100, 50]} <box>(100,100),(500,500)</box>']),
                     Message("user", [ImageRef(1), "And here?"]),
                     Message("assistant", ['{"bbox_2d": [5, 5, 25, 25]}'])], images=[wide, square], id="b0")

    def answers(mode):
        proc = Processor(tok, "chatml", ImageProcessor(100, (0.5,) * 3, (0.5,) * 3, resize_mode=mode),
                         num_image_tokens=1)
        out = proc(sample)
        text = tok.decode(out["input_ids"][out["labels"] != -100])
        return text.split("<|im_end|>")[:2]

    first, second = answers("resize")   # 200x100 -> 100x100: x halves, y stays; 50x50 -> 100x100: doubles
    assert '"bbox_2d": [10, 10, 50, 50]' in first and "<box>(100,100),(500,500)</box>" in first
    assert '"bbox_2d": [10, 10, 50, 50]' in second
    first, _ = answers("pad")           # 200x100 letterboxed into 100x100: scale 0.5, 25 px top offset
    assert '"bbox_2d": [10, 30, 50, 50]' in first
    assert "<box>(100," in first and "<box>(100,100)" not in first  # y moved into the padded frame
    proc = Processor(tok, "chatml", ImageProcessor(100, (0.5,) * 3, (0.5,) * 3), num_image_tokens=1,
                     rewrite_boxes=False)
    out = proc(sample)
    assert '"bbox_2d": [20, 10, 100, 50]' in tok.decode(out["input_ids"])


def test_tile_budget_is_the_largest_common_cap_and_applies_to_anyres(tok):
    tiling = {"kind": "dynamic", "min_tiles": 1, "max_tiles": 12, "thumbnail": True}
    ip = image_processor(16, tiling=tiling)
    s = two_images(images=(WIDE, WIDE))
    item = processor(tok, image_processor=ip, max_tiles_per_sample=6)(s)
    assert item["meta"]["tiles"] == [ip.num_images(200, 90, max_tiles=3)] * 2 == [3, 3]  # (2, 1) + thumbnail
    assert int((item["input_ids"] == 265).sum()) == 4 * 6  # K tokens per tile, thumbnails included
    long = Sample([Message("user", [ImageRef(0)]), Message("assistant", ["a"])], [Image.new("RGB", (1000, 100))])
    assert ip.num_images(1000, 100) == 11 and ip.num_images(1000, 100, max_tiles=9) == 10  # (10|9, 1) + thumbnail
    item = processor(tok, image_processor=ip, max_tiles_per_sample=9)(long)
    assert item["meta"]["tiles"] == [9] and item["pixel_values"].shape[0] == 9  # the largest cap that fits: 8
    pins = [[16, 32], [32, 16], [32, 32]]
    ip = image_processor(16, tiling={"kind": "anyres", "pinpoints": pins})
    free = processor(tok, image_processor=ip)(s)
    capped = processor(tok, image_processor=ip, max_tiles_per_sample=6)(s)
    assert free["meta"]["tiles"] == [3, 3] and sum(capped["meta"]["tiles"]) <= 6  # base + 2 tiles each
    item = processor(tok, image_processor=ip, max_tiles_per_sample=4)(Sample(
        [Message("user", [ImageRef(0)]), Message("assistant", ["a"])], [Image.new("RGB", (100, 90))], id="sq"))
    assert item["meta"]["tiles"] == [3]  # 1 + 4 tiles over budget: the pinpoints of <= 3 tiles only
    assert item["meta"]["image_info"][0].best_resolution in ((16, 32), (32, 16))


def test_truncation_boundary_is_the_end_of_the_last_image(tok):
    s = Sample([Message("user", [ImageRef(0), "?"]), Message("assistant", ["first answer"]),
                Message("user", [ImageRef(1)]), Message("assistant", ["second answer"])], [RED, GREEN], id="t")
    full = processor(tok, template={"name": "chatml", "image_start": "<img>", "image_end": "</img>"})(s)
    ids = full["input_ids"].tolist()
    image_end = len(ids) - ids[::-1].index(tok.convert_tokens_to_ids("</img>"))  # just after the last </img>
    kw = {"template": {"name": "chatml", "image_start": "<img>", "image_end": "</img>"}}
    cut = processor(tok, max_length=image_end, **kw)(s)  # the cut falls right after the image block: kept
    assert cut["meta"]["truncated"] and cut["input_ids"].tolist() == ids[:image_end]
    assert trained_text(tok, cut) == "first answer<|im_end|>"
    p = processor(tok, max_length=image_end - 1, **kw)  # one token less would cut the end marker: dropped
    with pytest.raises(SampleDropped, match="truncating would cut an image"):
        p(s)
    assert p.dropped == {"too_long": 1}


@pytest.mark.parametrize("mode,tiling,json_box,qwen_box", [
    # 200x100 -> crop to the central 100x100 (x - 50): JSON [60,10,100,50] -> [10,10,50,50];
    # Qwen (500,100),(999,500) = pixels (100,10),(199.8,50) -> (50,10),(100,50) clipped -> (500,100),(999,500)
    ("crop", None, "[10, 10, 50, 50]", "<box>(500,100),(999,500)</box>"),
    # tiled: the frame is the global view (thumbnail / anyres base): squash 200x100 -> 100x100, x halves
    ("resize", {"kind": "dynamic", "max_tiles": 6}, "[30, 10, 50, 50]", "<box>(500,100),(999,500)</box>"),
    ("resize", {"kind": "anyres", "pinpoints": [[100, 200], [200, 100], [200, 200]]}, "[30, 10, 50, 50]",
     "<box>(500,100),(999,500)</box>"),
])
def test_boxes_in_text_follow_crop_and_tiling(tok, mode, tiling, json_box, qwen_box):
    from vlm.data.images import ImageProcessor

    wide = Image.new("RGB", (200, 100))
    s = Sample([Message("user", [ImageRef(0), "Where?"]),
                Message("assistant", ['{"bbox_2d": [60, 10, 100, 50]} <box>(500,100),(999,500)</box>'])],
               [wide], id="c")
    ip = ImageProcessor(100, (0.5,) * 3, (0.5,) * 3, resize_mode=mode, tiling=tiling)
    out = Processor(tok, "chatml", ip, num_image_tokens=1)(s)
    text = trained_text(tok, out)
    assert f'"bbox_2d": {json_box}' in text and qwen_box in text
    if tiling:
        assert out["meta"]["tiles"][0] > 1 and out["meta"]["image_info"][0].kinds[0] in ("tile", "base")


def test_qwen2_style_boxes_follow_padding(tok):
    from vlm.data.images import ImageProcessor

    s = Sample([Message("user", [ImageRef(0)]),
                Message("assistant", ["<|box_start|>(0,0),(999,999)<|box_end|>"])], [Image.new("RGB", (200, 100))])
    out = Processor(tok, "chatml", ImageProcessor(100, (0.5,) * 3, (0.5,) * 3, resize_mode="pad"), 1)(s)
    assert "<|box_start|>(0,250),(999,750)<|box_end|>" in trained_text(tok, out)  # letterboxed: y in 250..750


def test_for_model_token_count_of_a_vlm_counts_new_sizes_after_pickling(tok):
    """A real model's count pickles as configs (``vlm.image_tokens.ImageTokens``), not weights: a DataLoader worker
    counts sizes the main process never asked (native-resolution images), equal to the model's own count."""
    import pickle

    import vlm
    from conftest import tiny_cfg

    cfg = tiny_cfg("siglip", connector={"name": "pixel_shuffle_mlp", "scale": 0.5})
    cfg["encoder"]["name"] = "siglip2"  # patchified by reshaping: any multiple of the patch size
    model = vlm.build(cfg, tokenizer=tok)
    p = Processor.for_model(model, tok)
    blob = pickle.dumps(p.num_image_tokens)
    assert len(blob) < 20_000  # configs, not the model's tensors
    count = pickle.loads(blob)
    for size in [(32, 32), (16, 48), (64, 32)]:
        assert count(size) == model.num_image_tokens(size)
    with pytest.raises(ValueError, match="pixel"):
        count((24, 40))  # 3 x 5 patches: a 2x pixel shuffle cannot take an odd grid, as the model says
