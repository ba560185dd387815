"""Exact interop with transformers BLIP-2 (``Blip2ForConditionalGeneration``, decoder-only text models):
``vlm.interop.from_hf`` / ``to_hf``, ``save_pretrained`` / ``vlm.load`` and ``python -m vlm.convert``.

Every model is tiny and random (width 32, 2 tower layers, 32 px images, patch 8, 8 queries), every tensor randomized
(transformers initializes BLIP-2's query tokens to zeros and its tower with std 1e-10: a dropped weight would go
unnoticed), saved to ``tmp_path`` and loaded back.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor, Blip2Config, Blip2ForConditionalGeneration

import vlm
from tests.conftest import TINY_TEXT, image_batch_ids
from vlm import convert
from vlm.interop import from_hf, to_hf

ATOL = 1e-4
IMAGE_TOKEN_ID = 120
NUM_QUERIES = 8
TINY_TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "image_size": 32, "patch_size": 8}
TEXT = {
    "opt": {"model_type": "opt", "hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "vocab_size": 128, "word_embed_proj_dim": 32, "max_position_embeddings": 128},  # ties its embeddings
    "qwen2": TINY_TEXT["qwen2"],  # tied
    "llama": TINY_TEXT["llama"],  # untied
}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="to_hf: model.tokenizer is not set")
        yield


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random (norm weights around 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            centre = 1.0 if "norm" in name.lower() and name.endswith("weight") else 0.0
            p.copy_(centre + 0.2 * torch.randn(p.shape, generator=g))


def make_blip2(text: str = "opt", frequency: int = 2, qformer_layers: int = 3,
               **kw) -> Blip2ForConditionalGeneration:
    torch.manual_seed(0)
    cfg = Blip2Config(vision_config=dict(TINY_TOWER),
                      qformer_config={"hidden_size": 32, "num_hidden_layers": qformer_layers, "num_attention_heads": 4,
                                      "intermediate_size": 48, "cross_attention_frequency": frequency},
                      text_config=dict(TEXT[text]), num_query_tokens=NUM_QUERIES, image_token_index=IMAGE_TOKEN_ID,
                      **kw)
    hf = Blip2ForConditionalGeneration(cfg).eval()
    randomize(hf)
    return hf


def save_blip2(path: Path, **kw) -> Blip2ForConditionalGeneration:
    hf = make_blip2(**kw)
    hf.save_pretrained(str(path))
    return hf


def inputs(model: vlm.VLM, rows=(1, 2), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``input_ids`` with ``num_query_tokens`` placeholders per image, a left-padded attention mask, the pixels."""
    ids = image_batch_ids(model, list(rows), length=40, seed=seed)
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # row 0 left-padded (OPT derives its positions from the mask)
    return ids, mask, torch.randn(sum(rows), 3, 32, 32, generator=g)


@torch.no_grad()
def assert_same_logits(ours: vlm.VLM, hf: Blip2ForConditionalGeneration, ids, mask, px) -> None:
    a = ours.eval()(ids, px, attention_mask=mask).logits
    b = hf.eval()(input_ids=ids, pixel_values=px, attention_mask=mask).logits
    assert a.shape == b.shape
    diff = (a - b).abs().max().item()
    assert diff <= ATOL, f"max abs logit diff {diff}"


@torch.no_grad()
def assert_same_vlm(a: vlm.VLM, b: vlm.VLM, ids, mask, px) -> None:
    diff = (a.eval()(ids, px, attention_mask=mask).logits - b.eval()(ids, px, attention_mask=mask).logits).abs().max()
    assert diff.item() <= ATOL, f"max abs logit diff {diff.item()}"


# ------------------------------------------------------------------------------------------------------ import
@pytest.mark.parametrize("frequency", [1, 2])
@pytest.mark.parametrize("text", ["opt", "qwen2", "llama"])
def test_from_hf_identical_logits(tmp_path, text, frequency):
    hf = save_blip2(tmp_path, text=text, frequency=frequency)
    model = from_hf(tmp_path)
    assert model.encoder.registry_name == "blip2" and model.connector.registry_name == "qformer"
    assert model.encoder.select == "all" and model.encoder.feature_layer == -1
    assert model.num_image_tokens() == NUM_QUERIES and model.image_token_id == IMAGE_TOKEN_ID
    crossing = [layer.cross_attn is not None for layer in model.connector.layers]
    assert crossing == [i % frequency == 0 for i in range(3)]
    # what the connector's input_norm holds is the tower's post_layernorm, BLIP-2's LayerNorm on the image tokens
    torch.testing.assert_close(model.connector.input_norm.weight, hf.vision_model.post_layernorm.weight)
    tied = model.llm.model.get_output_embeddings().weight is model.llm.model.get_input_embeddings().weight
    assert tied == (text != "llama")
    assert_same_logits(model, hf, *inputs(model))


def test_the_qformer_sees_the_normalized_last_layer_with_cls():
    """The image features transformers' BLIP-2 computes (``get_image_features``) equal encoder -> connector."""
    hf = make_blip2()
    from vlm.interop.blip2 import qformer_options
    from vlm import connectors, encoders
    from vlm.connectors.qformer import to_hf_name

    enc = encoders.build({"name": "blip2", "config": hf.config.vision_config.to_dict(), "select": "all"})
    enc.model.load_state_dict(hf.vision_model.state_dict())
    conn = connectors.build(qformer_options(hf.config), in_dim=32, out_dim=32)
    theirs = hf.state_dict()
    conn.load_state_dict({k: theirs[to_hf_name(k)] for k in conn.state_dict()})
    px = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = hf.get_image_features(px).pooler_output
        tokens = enc.eval()(px)
        assert tokens.shape == (3, 17, 32)  # CLS + 4 x 4 patches
        torch.testing.assert_close(conn.eval()(tokens, (4, 4)), expected, atol=1e-5, rtol=0)


def test_from_hf_dtype_and_dropout(tmp_path):
    save_blip2(tmp_path)
    model = from_hf(tmp_path)
    assert model.connector.options["dropout"] == 0.1 == model.connector.options["attention_dropout"]  # BLIP-2's
    bf16 = from_hf(tmp_path, dtype="bfloat16")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}


# ------------------------------------------------------------------------------------------------------ export
def tiny_blip2_vlm(text: str = "opt", frequency: int = 2, tokenizer=None, **conn) -> vlm.VLM:
    torch.manual_seed(0)
    cfg = {"encoder": {"name": "blip2", "image_size": 32, "patch_size": 8, "hidden_size": 32, "num_layers": 2,
                       "num_heads": 4, "intermediate_size": 64, "select": "all"},
           "connector": {"name": "qformer", "num_queries": NUM_QUERIES, "hidden_size": 32, "num_layers": 3,
                         "num_heads": 4, "intermediate_size": 48, "cross_attention_frequency": frequency, **conn},
           "llm": {"name": "hf_causal_lm", "config": dict(TEXT[text])}}
    model = vlm.build(cfg, tokenizer=tokenizer)
    randomize(model, seed=1)
    return model.eval()


@pytest.mark.parametrize("frequency", [1, 2])
@pytest.mark.parametrize("text", ["opt", "llama"])
def test_to_hf_identical_logits_and_round_trips(tmp_path, text, frequency):
    model = tiny_blip2_vlm(text, frequency)
    batch = inputs(model)
    out = to_hf(model, tmp_path / "hf")  # the first format that can hold it: BLIP-2
    assert json.loads((out / "config.json").read_text())["model_type"] == "blip-2"
    hf = Blip2ForConditionalGeneration.from_pretrained(str(tmp_path / "hf"))
    assert hf.config.num_query_tokens == NUM_QUERIES and hf.config.image_token_id == model.image_token_id
    assert hf.config.qformer_config.cross_attention_frequency == frequency
    assert_same_logits(model, hf, *batch)
    back = from_hf(tmp_path / "hf")  # vlm -> BLIP-2 -> vlm
    assert back.connector.export_config() == model.connector.export_config()
    assert back.encoder.image_mean == model.encoder.image_mean
    assert_same_vlm(model, back, *batch)
    model.save_pretrained(tmp_path / "ours")  # save_pretrained / vlm.load
    loaded = vlm.load(tmp_path / "ours")
    assert_same_vlm(model, loaded, *batch)
    to_hf(loaded, tmp_path / "again")
    assert_same_logits(model, Blip2ForConditionalGeneration.from_pretrained(str(tmp_path / "again")), *batch)


def test_exported_greedy_generation_equals_ours(tmp_path):
    """transformers' ``Blip2ForConditionalGeneration.generate`` on the export continues exactly as ``VLM.generate``
    (KV cache on both sides)."""
    model = tiny_blip2_vlm("llama")
    to_hf(model, tmp_path)
    hf = Blip2ForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    ids, _, px = inputs(model, rows=(1, 1))
    ours = model.generate(ids, px, max_new_tokens=6, min_new_tokens=6)
    theirs = hf.generate(pixel_values=px, input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                         min_new_tokens=6, do_sample=False)
    assert torch.equal(theirs[:, ids.shape[1]:], ours)


def test_import_save_load_export_keeps_logits(tmp_path):
    """BLIP-2 -> vlm -> vlm.load -> BLIP-2: the same logits at every step."""
    hf = save_blip2(tmp_path / "hf", text="qwen2", frequency=1)
    model = from_hf(tmp_path / "hf")
    model.save_pretrained(tmp_path / "ours")
    loaded = vlm.load(tmp_path / "ours")
    batch = inputs(loaded)
    assert_same_logits(loaded, hf, *batch)
    to_hf(loaded, tmp_path / "back")
    assert_same_logits(loaded, Blip2ForConditionalGeneration.from_pretrained(str(tmp_path / "back")), *batch)


def tiny_tokenizer():
    """A word-level fast tokenizer; ``vlm.build`` adds ``<image>`` as a special token (no network)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "<pad> <s> </s> <unk> a b c hello world what is in this picture".split()
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def test_to_hf_writes_a_blip2_processor(tmp_path):
    """With a tokenizer the export holds a working ``Blip2Processor``: ``num_query_tokens`` image tokens before the
    text, its pixels, and identical logits in transformers and vlm."""
    from PIL import Image

    model = tiny_blip2_vlm("opt", tokenizer=tiny_tokenizer())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "processor skipped" warning
        to_hf(model, tmp_path)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert config == {"processor_class": "Blip2Processor", "num_query_tokens": NUM_QUERIES}
    processor = AutoProcessor.from_pretrained(str(tmp_path))
    assert type(processor).__name__ == "Blip2Processor"
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8))
    batch = processor(images=image, text="what is in this picture", return_tensors="pt")
    ids = batch["input_ids"]
    assert ids[0, :NUM_QUERIES].tolist() == [model.image_token_id] * NUM_QUERIES
    assert int((ids == model.image_token_id).sum()) == NUM_QUERIES
    assert tuple(batch["pixel_values"].shape) == (1, 3, 32, 32)
    hf = Blip2ForConditionalGeneration.from_pretrained(str(tmp_path))
    back = from_hf(tmp_path)
    assert back.tokenizer is not None and back.image_token == "<image>"
    mask = torch.ones_like(ids)
    assert_same_logits(back, hf, ids, mask, batch["pixel_values"])
    assert_same_vlm(model, back, ids, mask, batch["pixel_values"])


# ------------------------------------------------------------------------------------------------------ CLI
def test_cli_both_directions(tmp_path, capsys):
    hf = save_blip2(tmp_path / "blip2", text="llama", frequency=2)
    assert convert.main([str(tmp_path / "blip2"), str(tmp_path / "ours")]) == 0  # detected: import
    assert "transformers Blip2ForConditionalGeneration -> vlm" in capsys.readouterr().out
    ours = vlm.load(tmp_path / "ours")
    batch = inputs(ours)
    assert_same_logits(ours, hf, *batch)
    assert convert.main([str(tmp_path / "ours"), str(tmp_path / "back")]) == 0  # detected: export
    assert "vlm -> transformers Blip2ForConditionalGeneration" in capsys.readouterr().out
    assert_same_logits(ours, Blip2ForConditionalGeneration.from_pretrained(str(tmp_path / "back")), *batch)
    assert convert.main([str(tmp_path / "ours"), str(tmp_path / "llava"), "--format", "llava"]) == 1
    assert "cannot be exported as LlavaForConditionalGeneration" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------ bad input
def test_from_hf_refuses_an_encoder_decoder_text_model(tmp_path):
    cfg = Blip2Config(vision_config=dict(TINY_TOWER), qformer_config={"hidden_size": 32, "num_hidden_layers": 1,
                                                                      "num_attention_heads": 4},
                      text_config={"model_type": "t5", "d_model": 32, "d_ff": 64, "num_layers": 1, "num_heads": 4,
                                   "d_kv": 8, "vocab_size": 128},
                      num_query_tokens=4, image_token_index=100)
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "config.json").write_text(cfg.to_json_string())
    with pytest.raises(ValueError, match=r"text model is 't5', an encoder-decoder.*decoder-only causal LM.*OPT"):
        from_hf(tmp_path)  # refused before any weight is looked for
    assert convert.main([str(tmp_path), str(tmp_path / "out")]) == 1


def test_from_hf_bad_directories(tmp_path):
    hf = save_blip2(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "image_token_index": None}))
    with pytest.raises(ValueError, match="has no image_token_index"):
        from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    weights = tmp_path / "model.safetensors"
    state = {k: v for k, v in load_file(str(weights)).items() if "crossattention" not in k}
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"do not match its config.json: missing .*crossattention"):
        from_hf(tmp_path)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="no weights in"):
        from_hf(tmp_path)
    del hf


@pytest.mark.parametrize("change,match", [
    ({"connector": {"name": "mlp", "depth": 2}}, r"the connector is 'mlp'; BLIP-2's bridge is the Q-Former"),
    ({"encoder": {"select": "patch"}}, r"select='patch'; BLIP-2's Q-Former reads every token"),
    ({"encoder": {"feature_layer": -2}}, r"feature_layer=-2; BLIP-2's Q-Former reads the last layer"),
    ({"connector": {"input_norm": False}}, r"input_norm=False"),
    ({"connector": {"input_norm_eps": 1e-5}}, r"input_norm_eps=1e-05.*layer_norm_eps=1e-06"),
])
def test_to_hf_says_what_blip2_cannot_express(tmp_path, change, match):
    model = tiny_blip2_vlm()
    cfg = model.config.to_dict()
    for part, values in change.items():
        cfg[part] = values if "name" in values else {**cfg[part], **values}
    cfg["connector"].setdefault("in_dim", 32)
    cfg["connector"].setdefault("out_dim", 32)
    from vlm.compose import from_config

    other = from_config(cfg)
    with pytest.raises(ValueError, match=match):
        to_hf(other, tmp_path)
    with pytest.raises(ValueError, match=match):
        to_hf(other, tmp_path, format="blip2")
    assert not (tmp_path / "config.json").exists()


def test_wrong_image_size_is_an_error_not_truncated_positions():
    """transformers' BLIP-2 tower silently adds only the first position embeddings to a smaller image's tokens; the
    blip2 encoder refuses a size whose patch grid is not the native one, naming it."""
    model = tiny_blip2_vlm()
    assert model.num_image_tokens() == NUM_QUERIES == model.num_image_tokens((32, 38))  # same 4 x 4 grid
    with pytest.raises(ValueError, match=r"image size \(24, 24\) gives a 3x3 patch grid.*native 4x4"):
        model.num_image_tokens((24, 24))
    ids = image_batch_ids(model, [1])
    with pytest.raises(ValueError, match=r"image size \(24, 24\) gives a 3x3 patch grid"):
        model(ids, torch.randn(1, 3, 24, 24))
    with pytest.raises(ValueError, match=r"image placeholder count mismatch: input_ids hold 8 image tokens .* 16"):
        model(ids, torch.randn(2, 3, 32, 32))  # two images' queries for one image's placeholders
