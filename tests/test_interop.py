"""Exact interop with transformers LLaVA: ``vlm.interop.from_hf`` / ``to_hf`` and ``python -m vlm.convert``.

Every model is tiny and random (hidden 32, 2 layers, 32 px images, patch 8), saved to ``tmp_path`` and loaded back.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoImageProcessor, AutoProcessor, LlavaConfig, LlavaForConditionalGeneration

import vlm
from tests.conftest import TINY_TEXT, image_batch_ids, tiny_cfg
from vlm import convert
from vlm.interop import from_hf, to_hf
from vlm.interop.llava import projector_layers
from vlm.interop.mapping import ACT_FROM_HF, ACT_TO_HF

ATOL = 1e-4
IMAGE_TOKEN_ID = 120
TOWERS = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}
TINY_TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "image_size": 32, "patch_size": 8}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _quiet():
    """Missing-tokenizer warnings are expected in most tests here; tests that check a warning re-enable it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="to_hf: model.tokenizer is not set")
        yield


# ------------------------------------------------------------------------------------------------------ helpers
def make_llava(tower: str = "clip", text: str = "llama", feature_layer=-2, strategy: str = "default",
               **kw) -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    cfg = LlavaConfig(vision_config={"model_type": TOWERS[tower], **TINY_TOWER}, text_config=dict(TINY_TEXT[text]),
                      image_token_id=IMAGE_TOKEN_ID, vision_feature_layer=feature_layer,
                      vision_feature_select_strategy=strategy, **kw)
    return LlavaForConditionalGeneration(cfg).eval()


def save_llava(path: Path, **kw) -> LlavaForConditionalGeneration:
    hf = make_llava(**kw)
    hf.save_pretrained(str(path))
    return hf


def inputs(model: vlm.VLM, rows=(1, 2), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` with ``model.num_image_tokens()`` placeholders per image, and the matching pixels."""
    ids = image_batch_ids(model, list(rows), length=48, seed=seed)
    g = torch.Generator().manual_seed(seed)
    return ids, torch.randn(sum(rows), 3, 32, 32, generator=g)


@torch.no_grad()
def assert_same_logits(ours: vlm.VLM, hf: LlavaForConditionalGeneration, ids, px) -> None:
    a = ours.eval()(ids, px).logits
    b = hf.eval()(input_ids=ids, pixel_values=px).logits
    assert a.shape == b.shape
    diff = (a - b).abs().max().item()
    assert diff <= ATOL, f"max abs logit diff {diff}"


@torch.no_grad()
def assert_same_vlm(a: vlm.VLM, b: vlm.VLM, ids, px) -> None:
    diff = (a.eval()(ids, px).logits - b.eval()(ids, px).logits).abs().max().item()
    assert diff <= ATOL, f"max abs logit diff {diff}"


def tiny_tokenizer():
    """A word-level fast tokenizer with ``<image>`` as a single special token (no network)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "<pad> <s> </s> <unk> a b c hello world what is in this picture".split()
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tok


# ------------------------------------------------------------------------------------------------------ import
@pytest.mark.parametrize("text", ["llama", "qwen2"])  # qwen2 ties its embeddings (TINY_TEXT)
@pytest.mark.parametrize("strategy", ["default", "full"])
@pytest.mark.parametrize("feature_layer", [-2, [-2, -1]], ids=["layer-2", "layers-2-1"])
@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_from_hf_identical_logits(tmp_path, tower, feature_layer, strategy, text):
    hf = save_llava(tmp_path, tower=tower, text=text, feature_layer=feature_layer, strategy=strategy)
    model = from_hf(tmp_path)
    expected_select = {("clip", "default"): "patch", ("clip", "full"): "all",
                       ("siglip", "default"): "llava_default", ("siglip", "full"): "patch"}[(tower, strategy)]
    assert model.encoder.select == expected_select
    assert model.encoder.feature_layer == feature_layer
    assert model.image_token_id == IMAGE_TOKEN_ID
    # LLaVA's token count: patches (+1 CLS for CLIP), minus token 0 under "default"
    n = 16 + (tower == "clip") - (strategy == "default")
    assert model.num_image_tokens() == n
    assert model.connector.layers[0].in_features == 32 * (1 if isinstance(feature_layer, int) else 2)
    tied = model.llm.model.get_output_embeddings().weight is model.llm.model.get_input_embeddings().weight
    assert tied == (text == "qwen2")
    ids, px = inputs(model)
    assert_same_logits(model, hf, ids, px)


@pytest.mark.parametrize("text", ["qwen3", "gemma"])  # gemma scales input embeddings inside the LM: same in both
def test_other_text_models_both_directions(tmp_path, text):
    hf = save_llava(tmp_path / "llava", tower="clip", text=text)
    model = from_hf(tmp_path / "llava")
    assert model.llm.text_config.model_type == text
    ids, px = inputs(model)
    assert_same_logits(model, hf, ids, px)
    to_hf(model, tmp_path / "back")
    assert_same_logits(model, LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "back")), ids, px)


def test_from_hf_projector_options_and_dtype(tmp_path):
    hf = save_llava(tmp_path, tower="siglip", text="qwen2", projector_hidden_act="gelu_pytorch_tanh",
                    multimodal_projector_bias=False)
    model = from_hf(tmp_path)
    assert model.connector.options["act"] == "gelu_tanh" and model.connector.options["bias"] is False
    assert model.connector.layers[0].bias is None
    assert_same_logits(model, hf, *inputs(model))
    bf16 = from_hf(tmp_path, dtype="bfloat16")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}


def test_from_hf_trusts_the_directory_config_keys(tmp_path):
    """Keys transformers does not know (e.g. written by an older version) in a LLaVA config.json do not stop from_hf;
    the components then carry strict_config=False so the vlm.load round trip accepts them too."""
    hf = save_llava(tmp_path / "llava", tower="clip", text="llama")
    cfg = json.loads((tmp_path / "llava" / "config.json").read_text())
    cfg["text_config"]["torchscript"] = False
    cfg["vision_config"]["pruned_heads"] = {}
    (tmp_path / "llava" / "config.json").write_text(json.dumps(cfg))
    model = from_hf(tmp_path / "llava")
    assert_same_logits(model, hf, *inputs(model))
    exported = model.config.to_dict()
    assert exported["llm"]["strict_config"] is False and exported["encoder"]["strict_config"] is False
    model.save_pretrained(tmp_path / "ours")
    assert_same_vlm(model, vlm.load(tmp_path / "ours"), *inputs(model))
    save_llava(tmp_path / "clean", tower="clip", text="llama")
    clean = from_hf(tmp_path / "clean")
    assert "strict_config" not in clean.config.to_dict()["llm"]


@pytest.mark.parametrize("head_saved", [True, False])
def test_from_hf_image_token_id_key_and_siglip_head(tmp_path, head_saved):
    """Configs may spell ``image_token_id`` (transformers writes ``image_token_index``); SigLIP's pooling head, which
    LLaVA never runs, may be missing from a checkpoint and is left out of our encoder either way."""
    hf = make_llava(tower="siglip", text="llama")
    assert hf.config.vision_config.vision_use_head
    hf.save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["image_token_id"] = cfg.pop("image_token_index")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    weights = tmp_path / "model.safetensors"
    if not head_saved:
        state = {k: v for k, v in load_file(str(weights)).items() if "vision_tower.head." not in k}
        save_file(state, str(weights), metadata={"format": "pt"})
    model = from_hf(tmp_path)
    assert model.image_token_id == IMAGE_TOKEN_ID
    assert not any(".head." in k for k in model.encoder.state_dict())
    assert model.encoder.hf_config.vision_use_head is False
    assert_same_logits(model, hf, *inputs(model))
    to_hf(model, tmp_path / "back")  # and the export is consistent: no head in the config, none in the weights
    back = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "back"))
    assert back.config.vision_config.vision_use_head is False
    assert_same_logits(model, back, *inputs(model))


@pytest.mark.parametrize("layout", ["current", "bin"])
def test_from_hf_other_checkpoint_layouts(tmp_path, layout):
    """Keys as transformers >= 4.52 names modules (``model.language_model.*``), or a pickle-free-loaded
    ``pytorch_model.bin`` (``torch.load(weights_only=True)``)."""
    hf = save_llava(tmp_path, tower="clip", text="llama")
    weights = tmp_path / "model.safetensors"
    if layout == "current":
        save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(weights), metadata={"format": "pt"})
        assert any(k.startswith("model.language_model.") for k in load_file(str(weights)))
    else:
        torch.save(load_file(str(weights)), tmp_path / "pytorch_model.bin")
        weights.unlink()
    model = from_hf(tmp_path)
    assert_same_logits(model, hf, *inputs(model))


def test_activation_table_is_exact():
    """Every projector activation name we accept computes our activation (the tanh variants to float rounding)."""
    from transformers.activations import ACT2FN

    from vlm.connectors.mlp import ACTIVATIONS

    x = torch.linspace(-6, 6, 1001)
    for theirs, ours in ACT_FROM_HF.items():
        torch.testing.assert_close(ACT2FN[theirs](x), ACTIVATIONS[ours]()(x), atol=1e-6, rtol=0, msg=theirs)
    for ours, theirs in ACT_TO_HF.items():
        assert ACT_FROM_HF[theirs] == ours


@pytest.mark.parametrize("tower,strategy", [("siglip", "default"), ("siglip", "full"), ("clip", "default")])
def test_non_divisible_image_size_both_directions(tmp_path, tower, strategy):
    """A tower whose image size is not a multiple of its patch (SigLIP So400m/14 at 384 px; here 30 px, patch 8):
    the patch convolution floors to 3 x 3, LLaVA's processor counts ``(30 // 8) ** 2 (+1 CLS) (-1 default)`` image
    tokens, and so does ``num_image_tokens``; logits are identical both ways."""
    torch.manual_seed(0)
    cfg = LlavaConfig(vision_config={"model_type": TOWERS[tower], **TINY_TOWER, "image_size": 30},
                      text_config=dict(TINY_TEXT["llama"]), image_token_id=IMAGE_TOKEN_ID,
                      vision_feature_select_strategy=strategy)
    hf = LlavaForConditionalGeneration(cfg).eval()
    hf.save_pretrained(str(tmp_path / "llava"))
    model = from_hf(tmp_path / "llava")
    expected = 9 + (tower == "clip") - (strategy == "default")
    assert model.encoder.grid() == (3, 3) and model.num_image_tokens() == expected
    ids = image_batch_ids(model, [1, 2], length=40)
    px = torch.randn(3, 3, 30, 30)
    assert_same_logits(model, hf, ids, px)
    to_hf(model, tmp_path / "back")
    back = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "back"))
    assert back.config.image_seq_length == expected
    image_processor = AutoImageProcessor.from_pretrained(str(tmp_path / "back"))
    assert tuple(image_processor(images=np.zeros((20, 45, 3), np.uint8), return_tensors="pt")
                 ["pixel_values"].shape) == (1, 3, 30, 30)
    assert_same_logits(model, back, ids, px)


def test_to_hf_warns_about_interpolated_position_embeddings(tmp_path):
    model = vlm.build(tiny_cfg("siglip", "llama", interpolate_pos_encoding=True)).eval()
    with pytest.warns(UserWarning, match="interpolate_pos_encoding=True has no LlavaConfig field"):
        to_hf(model, tmp_path)
    assert_same_logits(model, LlavaForConditionalGeneration.from_pretrained(str(tmp_path)), *inputs(model))


# ------------------------------------------------------------------------------------------------------ export
@pytest.mark.parametrize("text", ["llama", "qwen2"])
@pytest.mark.parametrize("feature_layer", [-2, [-2, -1]], ids=["layer-2", "layers-2-1"])
@pytest.mark.parametrize("tower,select", [("clip", "patch"), ("clip", "all"), ("siglip", "patch"), ("siglip", "all"),
                                          ("siglip", "llava_default")])
def test_to_hf_identical_logits_and_round_trip(tmp_path, tower, select, feature_layer, text):
    torch.manual_seed(0)
    model = vlm.build(tiny_cfg(tower, text, feature_layer=feature_layer, select=select)).eval()
    ids, px = inputs(model)
    to_hf(model, tmp_path / "hf")
    hf = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "hf"))
    strategy = {("clip", "patch"): "default", ("clip", "all"): "full", ("siglip", "patch"): "full",
                ("siglip", "all"): "full", ("siglip", "llava_default"): "default"}[(tower, select)]
    assert hf.config.vision_feature_select_strategy == strategy
    assert hf.config.vision_feature_layer == feature_layer
    assert hf.config.image_token_id == model.image_token_id
    assert hf.config.image_seq_length == model.num_image_tokens()
    assert_same_logits(model, hf, ids, px)
    back = from_hf(tmp_path / "hf")  # vlm -> hf -> vlm
    assert back.num_image_tokens() == model.num_image_tokens()
    assert back.encoder.image_mean == model.encoder.image_mean  # via preprocessor_config.json
    assert_same_vlm(model, back, ids, px)


def test_to_hf_dtype(tmp_path):
    model = vlm.build(tiny_cfg("clip", "llama")).eval()
    to_hf(model, tmp_path, dtype="bfloat16")
    assert json.loads((tmp_path / "config.json").read_text())["text_config"]["dtype"] == "bfloat16"
    hf = LlavaForConditionalGeneration.from_pretrained(str(tmp_path), dtype="auto")
    assert {p.dtype for p in hf.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("tower,select", [("clip", "patch"), ("siglip", "patch"), ("siglip", "llava_default")])
def test_to_hf_processor_matches_model(tmp_path, tower, select):
    """With a tokenizer, the exported directory has a working ``LlavaProcessor``: its expansion of ``<image>`` is
    exactly ``num_image_tokens()`` and its pixels give identical logits in transformers and vlm."""
    from PIL import Image

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = vlm.build(tiny_cfg(tower, "llama", select=select, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.4]),
                      tokenizer=tok).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "processor skipped" warning
        to_hf(model, tmp_path)
    assert (tmp_path / "processor_config.json").is_file() and (tmp_path / "preprocessor_config.json").is_file()
    processor = AutoProcessor.from_pretrained(str(tmp_path))
    assert type(processor).__name__ == "LlavaProcessor"
    assert list(processor.image_processor.image_mean) == [0.4, 0.5, 0.6]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8))
    batch = processor(images=image, text="hello <image> what is in this picture", return_tensors="pt")
    assert int((batch["input_ids"] == model.image_token_id).sum()) == model.num_image_tokens()
    assert tuple(batch["pixel_values"].shape) == (1, 3, 32, 32)
    hf = LlavaForConditionalGeneration.from_pretrained(str(tmp_path))
    back = from_hf(tmp_path)
    assert back.tokenizer is not None and back.image_token == "<image>"
    assert back.encoder.image_std == (0.2, 0.3, 0.4)
    assert_same_logits(back, hf, batch["input_ids"], batch["pixel_values"])
    assert_same_vlm(model, back, batch["input_ids"], batch["pixel_values"])


def test_to_hf_skips_processor_when_tokenizer_lacks_image_token(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    model = vlm.build(tiny_cfg("clip", "llama"))
    tk = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    model.tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")
    with pytest.warns(UserWarning, match=r"no processor_config.json .* encodes the image token '<image>' as \[0\]"):
        to_hf(model, tmp_path)
    assert (tmp_path / "tokenizer_config.json").is_file() and (tmp_path / "preprocessor_config.json").is_file()
    assert not (tmp_path / "processor_config.json").exists()
    assert LlavaForConditionalGeneration.from_pretrained(str(tmp_path)) is not None


@pytest.mark.parametrize("connector,match", [
    ({"name": "linear"}, r"connector is 'linear'.*'mlp' connector with depth=2"),
    ({"name": "mlp", "depth": 3}, r"depth=3.*exactly 2 linear layers"),
    ({"name": "mlp", "depth": 2, "norm": True}, r"norm=True"),
    ({"name": "mlp", "depth": 2, "hidden_dim": 48}, r"hidden_dim=48"),
])
def test_to_hf_rejects_what_llava_cannot_express(tmp_path, connector, match):
    model = vlm.build(tiny_cfg("clip", "llama", connector=connector))
    with pytest.raises(ValueError, match=match):
        to_hf(model, tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_to_hf_rejects_tied_llm_without_embed_tokens(tmp_path):
    model = vlm.build(tiny_cfg("clip", "gpt2"))  # gpt2 ties wte; transformers' LLaVA ties to embed_tokens
    with pytest.raises(ValueError, match=r"ties lm_head to language_model.embed_tokens.weight"):
        to_hf(model, tmp_path)


# ------------------------------------------------------------------------------------------------------ bad input
def test_from_hf_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        from_hf(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"config.json' does not exist; expected a transformers directory "
                                                r".*'llava': 'LlavaForConditionalGeneration'"):
        from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match=r"config.json'.*model_type 'llama' is not a format vlm converts; supported: .*'llava'"):
        from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "vlm"}))
    with pytest.raises(ValueError, match=r"is a vlm directory \(format 'vlm'\); load it with vlm.load"):
        from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava", "vision_feature_select_strategy": "x"}))
    with pytest.raises(ValueError, match=r"is not a valid LlavaConfig: .*vision_feature_select_strategy"):
        from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        from_hf(tmp_path)


def test_from_hf_missing_weights(tmp_path):
    save_llava(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no weights in .*expected one of model.safetensors, "
                                                r"model.safetensors.index.json, pytorch_model.bin"):
        from_hf(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match=r"names shard\(s\) missing .*model-00001-of-00002.safetensors"):
        from_hf(tmp_path)


def test_from_hf_incomplete_weights(tmp_path):
    save_llava(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = {k: v for k, v in load_file(str(weights)).items() if "linear_2" not in k}
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"do not match its config.json: missing .*linear_2"):
        from_hf(tmp_path)


# ------------------------------------------------------------------------------------------------------ CLI
def test_cli_both_directions_in_process(tmp_path, capsys):
    hf = save_llava(tmp_path / "llava", tower="siglip", text="qwen2", feature_layer=[-2, -1])
    assert convert.main([str(tmp_path / "llava"), str(tmp_path / "ours")]) == 0  # detected: import
    assert "transformers LlavaForConditionalGeneration -> vlm" in capsys.readouterr().out
    ours = vlm.load(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["format"] == "vlm"
    ids, px = inputs(ours)
    assert_same_logits(ours, hf, ids, px)
    assert convert.main([str(tmp_path / "ours"), str(tmp_path / "back")]) == 0  # detected: export
    assert "vlm -> transformers LlavaForConditionalGeneration" in capsys.readouterr().out
    assert_same_logits(ours, LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "back")), ids, px)


def test_cli_errors(tmp_path, capsys):
    assert convert.main([str(tmp_path / "missing"), str(tmp_path / "out")]) == 1
    assert "is not a directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert convert.main([str(tmp_path / "empty"), str(tmp_path / "out")]) == 1
    assert "config.json' does not exist" in capsys.readouterr().err
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert convert.main([str(tmp_path / "llama"), str(tmp_path / "out")]) == 1
    assert "model_type='llama'; expected format 'vlm'" in capsys.readouterr().err
    assert convert.main([str(tmp_path / "llama"), str(tmp_path / "out"), "--to", "vlm"]) == 1
    assert "'llava'" in capsys.readouterr().err
    assert convert.main([str(tmp_path / "llama"), str(tmp_path / "out"), "--to", "hf"]) == 1
    assert "--to hf needs a vlm directory" in capsys.readouterr().err
    save_llava(tmp_path / "llava")
    assert convert.main([str(tmp_path / "llava"), str(tmp_path / "llava")]) == 1
    assert "same directory" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_subprocess(tmp_path):
    model = vlm.build(tiny_cfg("clip", "llama", feature_layer=[-2, -1])).eval()
    model.save_pretrained(tmp_path / "ours")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "vlm.convert", str(tmp_path / "ours"), str(tmp_path / "hf"),
                           "--to", "hf"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "vlm -> transformers LlavaForConditionalGeneration" in proc.stdout
    assert_same_logits(model, LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "hf")), *inputs(model))


def test_to_hf_asks_the_connector_for_the_projector_layout_not_its_name(tmp_path):
    """A connector of another name that states LLaVA's projector layout exports; one that does not is refused."""
    from vlm.connectors.base import Connector
    from vlm.connectors.mlp import MLPConnector

    class Projector(MLPConnector):  # not registered: its name says nothing about its layout
        registry_name = "my_projector"

    model = vlm.build(tiny_cfg("clip", "llama"))
    conn = Projector(model.connector.in_dim, model.connector.out_dim)
    conn.load_state_dict(model.connector.state_dict())
    model.connector = conn
    to_hf(model, tmp_path / "ok")
    ids, px = inputs(model)
    assert_same_logits(model, LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "ok")), ids, px)

    class Plain(Connector):
        registry_name = "plain"

    assert projector_layers(Plain()) is None and projector_layers(conn) is not None
    model.connector = Plain()
    with pytest.raises(ValueError, match=r"connector is 'plain'; LLaVA's projector is linear_1 -> act -> linear_2"):
        to_hf(model, tmp_path / "no")
