"""One loader for inference: ``vlm.load`` opens vlm directories and transformers LLaVA / BLIP-2 / InternVL ones, and
every loader (``vlm.load``, ``vlm.interop.from_hf``, ``vlm.inference.load.open_model``) returns eval mode."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import TINY_TEXT, tiny_cfg
from PIL import Image
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    InternVLConfig,
    InternVLForConditionalGeneration,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

import vlm
from vlm.data.tokenizer import byte_tokenizer
from vlm.inference.load import open_model
from vlm.interop import from_hf

IMAGE_TOKEN_ID = 120
TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "image_size": 32, "patch_size": 8}
DROPOUT = {"attention_dropout": 0.5}  # a loader left in train mode answers at random


def llava_dir(path):
    cfg = LlavaConfig(vision_config={"model_type": "clip_vision_model", **TOWER, **DROPOUT},
                      text_config={**TINY_TEXT["llama"], **DROPOUT}, image_token_id=IMAGE_TOKEN_ID)
    LlavaForConditionalGeneration(cfg).save_pretrained(str(path))


def blip2_dir(path):
    cfg = Blip2Config(vision_config={**TOWER, **DROPOUT},
                      qformer_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                                      "intermediate_size": 48, "attention_probs_dropout_prob": 0.5},
                      text_config=dict(TINY_TEXT["qwen2"]), num_query_tokens=8, image_token_index=IMAGE_TOKEN_ID)
    Blip2ForConditionalGeneration(cfg).save_pretrained(str(path))


def internvl_dir(path):
    cfg = InternVLConfig(vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=64, image_size=32, patch_size=8, attention_dropout=0.5),
                         text_config={**copy.deepcopy(TINY_TEXT["qwen2"]), **DROPOUT}, image_token_id=IMAGE_TOKEN_ID,
                         image_seq_length=4, tie_word_embeddings=True)
    InternVLForConditionalGeneration(cfg).save_pretrained(str(path))


def assert_eval(model):
    assert not model.training
    assert not [name for name, m in model.named_modules() if m.training]


@pytest.mark.parametrize("save", [llava_dir, blip2_dir, internvl_dir], ids=["llava", "blip2", "internvl"])
def test_vlm_load_imports_transformers_directories_in_eval_mode(tmp_path, save):
    torch.manual_seed(0)
    save(tmp_path)
    model = vlm.load(tmp_path)
    assert isinstance(model, vlm.VLM)
    assert_eval(model)
    assert_eval(from_hf(tmp_path))
    assert_eval(open_model(tmp_path).model)
    reference = from_hf(tmp_path)
    ids = torch.tensor([[1, 2] + [model.image_token_id] * model.num_image_tokens() + [3, 4]])
    px = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        a, b = model(ids, px).logits, model(ids, px).logits
        assert torch.equal(a, b)  # no dropout
        assert (a - reference(ids, px).logits).abs().max() <= 1e-5


def test_vlm_load_names_an_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match=r"model_type 'bert' is not a format vlm converts.*blip-2.*internvl.*llava"):
        vlm.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden": 1}))
    with pytest.raises(ValueError, match="neither a vlm config.*nor a transformers config"):
        vlm.load(tmp_path)


def picture(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8))


def test_chat_on_a_loaded_model_with_dropout_is_deterministic_and_equals_eval_forward(tmp_path):
    """A model saved in train mode (dropout everywhere it can be) loads in eval mode: chat answers the same twice,
    and its reply is greedy decoding with eval-mode forward passes."""
    torch.manual_seed(0)
    cfg = tiny_cfg("clip", "llama")
    cfg["llm"]["config"].update(DROPOUT)
    model = vlm.build(cfg, tokenizer=byte_tokenizer("chatml"))
    model.set_template("chatml")
    model.train().save_pretrained(tmp_path)
    loaded = vlm.load(tmp_path)
    assert_eval(loaded)
    assert_eval(open_model(tmp_path).model)
    reply, _ = loaded.chat(picture(0), "What?", max_new_tokens=6)
    assert loaded.chat(picture(0), "What?", max_new_tokens=6)[0] == reply
    from vlm.inference.chat import image_placement, processor_for, prompt_item

    item, _ = prompt_item(processor_for(loaded), None, picture(0), "What?", placement=image_placement(loaded))
    ids = item["input_ids"][None]
    with torch.no_grad():
        for _ in range(6):
            nxt = loaded(ids, item["pixel_values"]).logits[:, -1].argmax(-1)
            ids = torch.cat([ids, nxt[:, None]], 1)
    new = ids[0, item["input_ids"].numel():].tolist()
    from vlm.inference.generate import decode

    assert reply == decode(loaded.tokenizer, torch.tensor([new]), loaded.generation["eos_token_id"])[0]


# ------------------------------------------------------------------------ which compositions export (docs/interop.md)
@pytest.mark.parametrize("encoder, connector, fmt", [
    ("clip", {"name": "mlp", "depth": 2}, "llava"),
    ("siglip", {"name": "mlp", "depth": 2}, "llava"),
    ("internvit", {"name": "pixel_shuffle_mlp"}, "internvl"),
    ("clip", {"name": "linear"}, None),
    ("clip", {"name": "mlp", "depth": 3}, None),
    ("clip", {"name": "pixel_shuffle_mlp"}, None),
    ("internvit", {"name": "mlp", "depth": 2}, None),
])
def test_export_formats_follow_the_docs_table(encoder, connector, fmt):
    """The rows of docs/interop.md's table that tiny models can show; a model no format holds gets an error that
    says what serves it instead."""
    from vlm.interop.formats import format_for_model

    model = vlm.build(tiny_cfg(encoder, "qwen2", connector=connector))
    if fmt is not None:
        assert format_for_model(model).model_type.replace("-", "") == fmt
        return
    with pytest.raises(ValueError, match=r"no transformers format can hold this model.*python -m vlm\.chat DIR.*"
                                         r"vlm\.load\(DIR\)\.chat.*vlm\.serve.*docs/interop\.md"):
        format_for_model(model)


def test_the_default_jobs_model_is_served_not_exported():
    from vlm.interop.formats import format_for_model
    from vlm.train import compose
    from vlm.train.build import build_model, build_tokenizer

    cfg = compose("tiny", ["encoder.image_size=48"])
    model = build_model(cfg, build_tokenizer(cfg))
    with pytest.raises(ValueError, match=r"encoder is 'timm'.*python -m vlm\.chat DIR"):
        format_for_model(model)
