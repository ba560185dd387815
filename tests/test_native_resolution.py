"""Native-resolution images end to end: each image at its own size (``tiling: {kind: native}``) becomes flat patches
+ ``image_grid_thw`` in the processor, batches of different sizes collate and pack, and the model's answer for a
sample does not depend on what else is in its batch (Qwen2-VL's tower + patch merger on a Llama)."""
import copy

import pytest
import torch
from PIL import Image

import vlm
from tests.conftest import TINY_TEXT
from vlm.data.collate import PackCollator, PadCollator
from vlm.data.processor import Processor
from vlm.data.sample import ImageRef, Message, Sample
from vlm.data.tokenizer import byte_tokenizer

TOWER = {"name": "qwen2_vl_vit", "image_size": 32, "config": {
    "model_type": "qwen2_5_vl_vision", "depth": 2, "hidden_size": 32, "num_heads": 2, "intermediate_size": 48,
    "out_hidden_size": 32, "patch_size": 8, "window_size": 32, "fullatt_block_indexes": [1]}}
QWEN2_VL_TEXT = {"model_type": "qwen2_vl_text", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128,
                 "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}}
LLMS = {"llama": TINY_TEXT["llama"], "qwen2_vl_text": QWEN2_VL_TEXT}  # 1-D positions; mRoPE
NATIVE = {"kind": "native", "patch_size": 8, "merge_size": 2, "min_pixels": 16 * 16, "max_pixels": 64 * 64}


@pytest.fixture(scope="module", params=sorted(LLMS))
def model_and_processor(request):
    torch.manual_seed(0)
    tok = byte_tokenizer()
    model = vlm.build({"encoder": copy.deepcopy(TOWER), "connector": {"name": "patch_merger"},
                       "llm": {"name": "hf_causal_lm", "config": copy.deepcopy(LLMS[request.param])}},
                      tokenizer=tok).eval()
    model.image_preprocessing = {"resize_mode": "resize", "tiling": NATIVE}  # what a run records
    return model, Processor.for_model(model, tok)


def sample(size: tuple[int, int], colour: int, sid: str) -> Sample:
    img = Image.new("RGB", size, (colour, 255 - colour, colour // 2))
    img.paste((255, 0, 0), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    return Sample([Message("user", [ImageRef(0), "what is it?"]), Message("assistant", ["a red square"])],
                  images=[img], id=sid)


def test_each_image_keeps_its_size_and_the_model_counts_its_tokens(model_and_processor):
    model, proc = model_and_processor
    item = proc(sample((48, 24), 10, "wide"))  # smart_resize to multiples of 16: (H, W) = (32, 48)
    assert item["image_grid_thw"].tolist() == [[1, 4, 6]]
    assert item["pixel_values"].shape == (24, 3 * 2 * 8 * 8)
    assert int((item["input_ids"] == model.image_token_id).sum()) == model.num_image_tokens((32, 48)) == 6


def test_a_sample_answers_the_same_alone_padded_and_packed(model_and_processor):
    model, proc = model_and_processor
    items = [proc(sample(size, c, f"s{c}")) for size, c in [((40, 24), 10), ((30, 60), 90), ((64, 64), 200)]]
    assert len({tuple(it["image_grid_thw"][0].tolist()) for it in items}) == 3
    with torch.no_grad():
        alone = [model(**{k: v for k, v in PadCollator(0)([it]).items() if k not in ("meta", "labels")}).logits[0]
                 for it in items]
        padded = PadCollator(0)(items)
        assert padded["image_grid_thw"].shape == (3, 3)
        logits = model(**{k: v for k, v in padded.items() if k not in ("meta", "labels")}).logits
        for row, (it, ref) in enumerate(zip(items, alone)):
            n = it["input_ids"].numel()
            torch.testing.assert_close(logits[row, :n], ref, atol=1e-5, rtol=1e-5)
        packed = PackCollator(0, max_length=4096)(items)
        assert packed["input_ids"].shape[0] == 1
        logits = model(**{k: v for k, v in packed.items() if k not in ("meta", "labels")}).logits[0]
        start = 0
        for it, ref in zip(items, alone):
            n = it["input_ids"].numel()
            torch.testing.assert_close(logits[start:start + n], ref, atol=1e-5, rtol=1e-5)
            start += n


def test_training_step_and_chat_on_native_images(model_and_processor):
    model, proc = model_and_processor
    model = copy.deepcopy(model).train()
    items = [proc(sample(size, c, f"s{c}")) for size, c in [((40, 24), 10), ((30, 60), 90)]]
    batch = {k: v for k, v in PadCollator(0)(items).items() if k != "meta"}
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and model.encoder.model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    model.eval()
    img = Image.new("RGB", (50, 30), (0, 128, 255))
    one, _ = model.chat(img, "what is it?", max_new_tokens=4)
    two = model.chat_batch([img, Image.new("RGB", (20, 70))], ["what is it?", "and this?"], max_new_tokens=4)
    assert two[0][0] == one


def test_flat_patches_with_a_fixed_size_encoder_are_refused(model_and_processor):
    _, proc = model_and_processor
    tok = byte_tokenizer()
    clip = vlm.build({"encoder": {"name": "clip", "image_size": 32, "patch_size": 8, "hidden_size": 32,
                                  "num_layers": 1, "num_heads": 4, "intermediate_size": 64},
                      "connector": {"name": "mlp"},
                      "llm": {"name": "hf_causal_lm", "config": copy.deepcopy(TINY_TEXT["llama"])}}, tokenizer=tok)
    item = proc(sample((32, 32), 5, "x"))
    with pytest.raises(ValueError, match="takes fixed-size images"):
        clip.image_features(item["pixel_values"], item["image_grid_thw"])


def test_a_prompt_too_long_because_of_its_image_says_so(model_and_processor):
    """A large image at native resolution can fill the context window by itself: the error counts its tokens and
    names what to change."""
    model, _ = model_and_processor
    model = copy.deepcopy(model)
    limit = model.llm.model.config.max_position_embeddings = 512
    big = Image.new("RGB", (8 * 2 * 32, 8 * 2 * 32))  # 1024 merged patches: more than the window holds
    model.image_preprocessing = {"resize_mode": "resize", "tiling": {**NATIVE, "max_pixels": 1024 * 1024}}
    with pytest.raises(ValueError, match=rf"context window of {limit} tokens; \d+ of them are image / video tokens: "
                                         r"use fewer or smaller images .*max_pixels"):
        model.chat(big, "what is it?")
