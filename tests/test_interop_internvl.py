"""Exact interop with transformers InternVL: ``from_hf`` / ``to_hf`` (logits identical both ways, 1 and several
tiles per image), ``save_pretrained`` / ``vlm.load``, ``python -m vlm.convert``, and the exported
``InternVLProcessor`` producing vlm's ``input_ids`` and ``pixel_values``."""
import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoImageProcessor, AutoProcessor, InternVLConfig, InternVLForConditionalGeneration

import vlm
from tests.conftest import TINY_TEXT, TINY_VISION
from tests.test_interop import tiny_tokenizer
from vlm import convert
from vlm.interop import from_hf, to_hf

IMAGE_TOKEN_ID = 100
TOKENS_PER_TILE = 4  # 32 px tiles, 8 px patches: a 4x4 grid, pixel-shuffled to 2x2


def save_internvl(path, text="qwen2", norm_type="layer_norm", qk_norm=False, feature_layer=-1, seed=0):
    """A tiny random ``InternVLForConditionalGeneration`` with every tensor randomized, saved to ``path``."""
    vision = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, image_size=32,
                  patch_size=8, norm_type=norm_type, use_qk_norm=qk_norm, attention_bias=True)
    cfg = InternVLConfig(vision_config=vision, text_config=copy.deepcopy(TINY_TEXT[text]),
                         image_token_id=IMAGE_TOKEN_ID, image_seq_length=TOKENS_PER_TILE,
                         vision_feature_layer=feature_layer, tie_word_embeddings=text == "qwen2")
    torch.manual_seed(seed)
    hf = InternVLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    hf.save_pretrained(str(path))
    return hf


def tiled_batch(tiles_per_image, seed=0):
    """``input_ids`` with each image's ``tiles x image_seq_length`` tokens expanded, and all tiles stacked."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for images in tiles_per_image:
        row = torch.randint(0, 90, (60,), generator=g)
        pos = 3
        for tiles in images:
            row[pos:pos + tiles * TOKENS_PER_TILE] = IMAGE_TOKEN_ID
            pos += tiles * TOKENS_PER_TILE + 2
        rows.append(row)
    n = sum(sum(images) for images in tiles_per_image)
    return torch.stack(rows), torch.randn(n, 3, 32, 32, generator=g)


def same_logits(a, b, ids, pixels):
    with torch.no_grad():
        la = a(input_ids=ids, pixel_values=pixels).logits
        lb = b(input_ids=ids, pixel_values=pixels).logits
    assert la.shape == lb.shape
    assert (la - lb).abs().max().item() <= 1e-4


# 1 tile; several tiles (a 2x2 grid + thumbnail = 5, and 3); several images per sample with different tile counts
BATCHES = [[[1], [1]], [[5], [3]], [[5, 1], [2, 3]]]


@pytest.mark.parametrize("text", ["qwen2", "llama"])
@pytest.mark.parametrize("norm_type,qk_norm", [("layer_norm", False), ("rms_norm", True), ("layer_norm", True)])
@pytest.mark.parametrize("feature_layer", [-1, -2])
def test_import_export_identical_logits(tmp_path, text, norm_type, qk_norm, feature_layer):
    hf = save_internvl(tmp_path / "hf", text, norm_type, qk_norm, feature_layer)
    model = from_hf(tmp_path / "hf")
    assert model.encoder.component_name == "internvit" and model.connector.registry_name == "pixel_shuffle_mlp"
    assert model.encoder.feature_layer == feature_layer and model.num_image_tokens() == TOKENS_PER_TILE
    assert model.encoder.dims["norm_type"] == norm_type and model.encoder.dims["qk_norm"] == qk_norm
    with pytest.warns(UserWarning, match="no InternVLProcessor written.*model.tokenizer is not set"):
        to_hf(model, tmp_path / "out")
    back = InternVLForConditionalGeneration.from_pretrained(str(tmp_path / "out")).eval()
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["model_type"] == "internvl" and written["tie_word_embeddings"] == (text == "qwen2")
    for tiles in BATCHES:
        ids, pixels = tiled_batch(tiles)
        same_logits(hf, model, ids, pixels)
        same_logits(hf, back, ids, pixels)
    # every tensor came back unchanged (the state dicts name the same tensors)
    theirs, ours = hf.state_dict(), back.state_dict()
    assert set(theirs) == set(ours) and all(torch.equal(theirs[k], ours[k]) for k in theirs)


def test_save_load_and_convert_cli(tmp_path):
    hf = save_internvl(tmp_path / "hf", "llama", "rms_norm", True)
    assert convert.main([str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0  # import
    model = vlm.load(tmp_path / "ours")
    ids, pixels = tiled_batch([[5, 1], [2, 3]])
    same_logits(hf, model.eval(), ids, pixels)
    with pytest.warns(UserWarning, match="no InternVLProcessor"):
        assert convert.main([str(tmp_path / "ours"), str(tmp_path / "back")]) == 0  # export (detected: internvl)
    same_logits(hf, InternVLForConditionalGeneration.from_pretrained(str(tmp_path / "back")).eval(), ids, pixels)
    model.save_pretrained(tmp_path / "again")
    same_logits(hf, vlm.load(tmp_path / "again").eval(), ids, pixels)


def test_a_model_built_from_parts_exports_and_a_llava_model_does_not(tmp_path):
    torch.manual_seed(0)
    cfg = {"encoder": {**TINY_VISION["internvit"], "norm_type": "rms_norm", "qk_norm": True},
           "connector": {"name": "pixel_shuffle_mlp", "scale": 0.5},
           "llm": {"name": "hf_causal_lm", "config": copy.deepcopy(TINY_TEXT["llama"])}, "image_token_id": 100}
    model = vlm.build(cfg).eval()
    with pytest.warns(UserWarning):
        to_hf(model, tmp_path / "a")
    hf = InternVLForConditionalGeneration.from_pretrained(str(tmp_path / "a")).eval()
    ids, pixels = tiled_batch([[5], [1]])
    same_logits(hf, model, ids, pixels)
    llava_style = vlm.build({**cfg, "encoder": TINY_VISION["clip"], "connector": {"name": "mlp", "depth": 2}})
    with pytest.raises(ValueError, match="cannot be exported as InternVLForConditionalGeneration: the encoder is 'clip'.*"
                                         "connector is 'mlp'"):
        to_hf(llava_style, tmp_path / "b", format="internvl")
    with pytest.raises(ValueError, match="select='all' keeps the CLS token"):
        to_hf(vlm.build({**cfg, "encoder": {**TINY_VISION["internvit"], "select": "all"},
                         "connector": {"name": "mlp", "depth": 2}}), tmp_path / "c", format="internvl")


def test_weights_that_do_not_match_are_listed(tmp_path):
    save_internvl(tmp_path, "llama")
    state = load_file(str(tmp_path / "model.safetensors"))
    dropped = [k for k in state if "multi_modal_projector.linear_2" in k]
    save_file({k: v for k, v in state.items() if k not in dropped}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"do not match its config.json: missing \[.*multi_modal_projector"
                                         r"\.linear_2\.bias"):
        from_hf(tmp_path)


def internvl_tokenizer():
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<img>", "</img>", "<IMG_CONTEXT>", "<|im_start|>",
                                                          "<|im_end|>"]}, replace_extra_special_tokens=False)
    tok.add_tokens(["user", "assistant"])
    return tok


def test_exported_processor_gives_vlm_ids_pixels_and_reply(tmp_path):
    """AutoProcessor of the exported directory (PIL backend) = vlm's Processor: same ids and pixels for an image and
    a question (4 tiles + thumbnail), and the same greedy reply from transformers' model."""
    from PIL import Image

    from vlm.data.processor import Processor
    from vlm.data.sample import ImageRef, Message, Sample

    tok = internvl_tokenizer()
    template = {"name": "chatml", "image_start": "<img>", "image_end": "</img>"}
    torch.manual_seed(0)
    model = vlm.build({"encoder": TINY_VISION["internvit"], "connector": {"name": "pixel_shuffle_mlp"},
                       "llm": {"name": "hf_causal_lm", "config": copy.deepcopy(TINY_TEXT["qwen2"])},
                       "image_token": "<IMG_CONTEXT>"}, tokenizer=tok).eval()
    model.set_template(template)
    model.image_preprocessing = {"resize_mode": "resize",
                                 "tiling": {"kind": "dynamic", "min_tiles": 1, "max_tiles": 6, "thumbnail": True}}
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the full processor is written
        to_hf(model, tmp_path)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    sample = Sample([Message("user", [ImageRef(0), "what is in this picture"])], images=[image])
    ours = Processor.for_model(model, model.tokenizer, template)(sample, add_generation_prompt=True)
    assert ours["meta"]["tiles"] == [7]  # a 3x2 grid (aspect 1.4, no tie) + thumbnail

    processor = AutoProcessor.from_pretrained(str(tmp_path))
    assert type(processor).__name__ == "InternVLProcessor"
    # transformers' default torchvision backend rounds bicubic resizes differently; its PIL backend is exact
    processor.image_processor = AutoImageProcessor.from_pretrained(str(tmp_path), backend="pil")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is in this picture"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    theirs = processor(images=[image], text=prompt, return_tensors="pt")
    assert theirs["input_ids"][0].tolist() == ours["input_ids"].tolist()
    assert theirs["pixel_values"].shape == ours["pixel_values"].shape
    assert (theirs["pixel_values"] - ours["pixel_values"]).abs().max().item() <= 1e-5
    hf = InternVLForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    ids = ours["input_ids"][None]
    with torch.no_grad():
        mine = model.generate(ids, ours["pixel_values"], max_new_tokens=8)
        ref = hf.generate(**theirs, max_new_tokens=8, do_sample=False)[:, ids.shape[1]:]
    assert mine.tolist() == ref.tolist()
    back = from_hf(tmp_path)
    assert back.image_preprocessing == model.image_preprocessing and back.image_token == "<IMG_CONTEXT>"


def save_original(path, model, tok, **overrides):
    """``model`` written as an original OpenGVLab InternVL directory (``model_type: internvl_chat``: remote-code
    config keys, ``vision_model.*`` with fused qkv, ``mlp1.*``, ``language_model.*``)."""
    from vlm.encoders.internvit_keys import ours_to_original

    d = model.encoder.dims
    vision = {"architectures": ["InternVisionModel"], "hidden_size": d["hidden_size"],
              "num_hidden_layers": d["num_layers"], "num_attention_heads": d["num_heads"],
              "intermediate_size": d["intermediate_size"], "image_size": d["image_size"],
              "patch_size": d["patch_size"], "norm_type": d["norm_type"], "layer_norm_eps": d["norm_eps"],
              "qkv_bias": d["qkv_bias"], "qk_normalization": d["qk_norm"], "initializer_factor": 0.1}
    text = {**model.llm.text_config.to_dict(), "architectures": ["Qwen2ForCausalLM"]}
    cfg = {"model_type": "internvl_chat", "vision_config": vision, "llm_config": text, "select_layer": -1,
           "downsample_ratio": 0.5, "ps_version": "v2", "force_image_size": d["image_size"],
           "dynamic_image_size": True, "use_thumbnail": True, "min_dynamic_patch": 1, "max_dynamic_patch": 6,
           **overrides}
    state = {f"vision_model.{k}": v for k, v in ours_to_original(model.encoder.model.state_dict()).items()}
    state.update({f"mlp1.{k.removeprefix('layers.')}": v for k, v in model.connector.state_dict().items()})
    state.update({f"language_model.{k}": v for k, v in model.llm.model.state_dict().items()})
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.clone().contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg, default=str))
    tok.save_pretrained(str(path))


def test_original_opengvlab_checkpoint_imports_without_remote_code(tmp_path):
    tok = internvl_tokenizer()
    torch.manual_seed(0)
    model = vlm.build({"encoder": {**TINY_VISION["internvit"], "norm_type": "rms_norm", "qk_norm": True,
                                   "qkv_bias": False},
                       "connector": {"name": "pixel_shuffle_mlp"},
                       "llm": {"name": "hf_causal_lm", "config": copy.deepcopy(TINY_TEXT["qwen2"])},
                       "image_token": "<IMG_CONTEXT>"}, tokenizer=tok).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    save_original(tmp_path / "orig", model, tok)
    assert convert.main([str(tmp_path / "orig"), str(tmp_path / "ours")]) == 0  # detected: import
    back = vlm.load(tmp_path / "ours").eval()
    assert back.image_token == "<IMG_CONTEXT>" and back.image_token_id == model.image_token_id
    assert back.image_preprocessing["tiling"] == {"kind": "dynamic", "min_tiles": 1, "max_tiles": 6,
                                                  "thumbnail": True}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 10, (2, 40), generator=g)  # below the added tokens (the image token among them)
    ids[0, 2:22] = model.image_token_id
    ids[1, 5:9] = model.image_token_id
    pixels = torch.randn(6, 3, 32, 32, generator=g)
    same_logits(model, back, ids, pixels)
    save_original(tmp_path / "v1", model, tok, ps_version="v1")
    with pytest.raises(ValueError, match="ps_version='v1'; pixel_shuffle_mlp is InternVL's 'v2' pixel shuffle"):
        from_hf(tmp_path / "v1")
    save_original(tmp_path / "remote", model, tok, llm_config={"model_type": "remote_lm",
                                                              "architectures": ["RemoteLMForCausalLM"]})
    with pytest.raises(ValueError, match="llm_config.model_type='remote_lm'.*needs remote code.*'internlm2'"):
        from_hf(tmp_path / "remote")  # (InternLM2: tests/test_interop_internlm2.py)


def test_tiled_multi_image_batches_train_and_generate(tmp_path):
    """InternVL's tiling through vlm's own pipeline: a batch whose samples hold 1 and 2 images of different shapes
    (so a different number of tiles per image, within a tile budget) trains, and generating it as a batch gives each
    sample's own reply; transformers' InternVL from the export gives the same logits on the same batch."""
    from PIL import Image

    from vlm.data.collate import PadCollator
    from vlm.data.processor import Processor
    from vlm.data.sample import ImageRef, Message, Sample

    tok = internvl_tokenizer()
    template = {"name": "chatml", "image_start": "<img>", "image_end": "</img>"}
    torch.manual_seed(0)
    model = vlm.build({"encoder": TINY_VISION["internvit"], "connector": {"name": "pixel_shuffle_mlp"},
                       "llm": {"name": "hf_causal_lm", "config": copy.deepcopy(TINY_TEXT["llama"])},
                       "image_token": "<IMG_CONTEXT>"}, tokenizer=tok)
    proc = Processor.for_model(model, tok, template, tiling={"kind": "dynamic", "max_tiles": 4},
                               max_tiles_per_sample=6)
    rng = np.random.default_rng(0)
    img = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((40, 90), (70, 30), (64, 64))]
    two = Sample([Message("user", [ImageRef(0), "a", ImageRef(1), "what is in this picture"]),
                  Message("assistant", ["hello world"])], images=[img[0], img[1]])
    one = Sample([Message("user", [ImageRef(0), "what is in this picture"]), Message("assistant", ["b c"])],
                 images=[img[2]])
    items = [proc(two), proc(one)]
    assert items[0]["meta"]["tiles"] == [3, 3] and items[1]["meta"]["tiles"] == [5]  # the budget of 6 shared
    batch = PadCollator(tok.pad_token_id)(items)
    assert batch["pixel_values"].shape == (11, 3, 32, 32)
    model.train()
    loss = model(batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"],
                 labels=batch["labels"]).loss
    loss.backward()
    assert torch.isfinite(loss) and model.encoder.blocks()[0].attn.q_proj.weight.grad.abs().sum() > 0
    model.eval().set_template(template)
    prompts = [proc(s, add_generation_prompt=True) for s in (two, one)]
    left = PadCollator(tok.pad_token_id, "left")(prompts)
    together = model.generate(left["input_ids"], left["pixel_values"], attention_mask=left["attention_mask"],
                              max_new_tokens=6, min_new_tokens=6)
    for row, p in enumerate(prompts):
        alone = model.generate(p["input_ids"][None], p["pixel_values"], max_new_tokens=6, min_new_tokens=6)
        assert together[row].tolist() == alone[0].tolist()
    to_hf(model, tmp_path)
    hf = InternVLForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        a = hf(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
               attention_mask=batch["attention_mask"]).logits
        b = model(batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"]).logits
    assert (a - b).abs().max().item() <= 1e-4
