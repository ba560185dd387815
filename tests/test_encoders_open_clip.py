"""open_clip towers: built by name from tiny registered configs, loaded from saved weights files, equal to open_clip's
own forward; the bundled configs (ViT-bigG-14, ViT-L-14, SigLIP) at their real sizes on the meta device."""
from __future__ import annotations

import json

import open_clip
import pytest
import torch
from safetensors.torch import save_file

import vlm
from vlm import encoders

TINY_TEXT = {"context_length": 16, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}
TINY_CONFIGS = {
    "vlm-test-ViT-T-8": {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 3, "width": 32,
                                                         "head_width": 16, "patch_size": 8}, "text_cfg": TINY_TEXT},
    "vlm-test-ViT-T-8-quickgelu": {"embed_dim": 16, "quick_gelu": True,
                                   "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16,
                                                  "patch_size": 8}, "text_cfg": TINY_TEXT},
    "vlm-test-timm-ViT": {"embed_dim": 16, "vision_cfg": {"image_size": 224, "timm_model_name": "vit_tiny_patch16_224",
                                                          "timm_model_pretrained": False, "timm_pool": "map",
                                                          "timm_proj": "none"}, "text_cfg": TINY_TEXT},
}


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """The tiny configs registered with open_clip, as a user registers their own (``open_clip.add_model_config``)."""
    folder = tmp_path_factory.mktemp("open_clip_configs")
    for name, cfg in TINY_CONFIGS.items():
        (folder / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    return folder


def reference_and_file(name: str, folder, fmt: str = "safetensors"):
    """A random full open_clip model (vision + text) and its weights saved the way open_clip saves them."""
    torch.manual_seed(0)
    ref = open_clip.create_model(name).eval()
    with torch.no_grad():  # random everything (LayerNorms included): no term hides behind an init value
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    path = folder / f"{name}.{fmt}"
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, str(path))
    return ref, str(path)


@pytest.mark.parametrize("name,layer,fmt", [("vlm-test-ViT-T-8", -1, "safetensors"), ("vlm-test-ViT-T-8", -2, "bin"),
                                            ("vlm-test-ViT-T-8-quickgelu", 1, "safetensors")])
def test_native_tower_equals_open_clip(registered, tmp_path, name, layer, fmt):
    ref, path = reference_and_file(name, tmp_path, fmt)
    enc = encoders.build({"name": "open_clip", "model_name": name, "pretrained": path, "feature_layer": layer,
                          "select": "all"}).eval()
    x = torch.randn(2, 3, 32, 32)
    n_blocks = len(ref.visual.transformer.resblocks)
    out = ref.visual.forward_intermediates(x, indices=[layer % (n_blocks + 1) - 1], intermediates_only=True,
                                           output_fmt="NLC", output_extra_tokens=True)
    want = torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1)
    y = enc(x)
    assert y.shape == (2, 17, 32) and enc.num_tokens() == 17 and enc.has_cls and enc.num_prefix_tokens == 1
    assert (y - want).abs().max() <= 1e-5
    patch = encoders.build({"name": "open_clip", "model_name": name, "pretrained": path, "feature_layer": layer})
    assert patch.num_tokens() == 16 and torch.equal(patch.eval()(x), y[:, 1:])
    # the pooling head and the blocks after feature_layer are gone: every parameter feeds the features
    assert len(enc.blocks()) == layer % (n_blocks + 1)
    assert not any(k.startswith(("model.proj", "model.ln_post")) for k in enc.state_dict())
    again = encoders.build(enc.export_config())  # the saved config holds the resolved open_clip model config
    assert again.model_config == TINY_CONFIGS[name]
    again.load_state_dict(enc.state_dict())
    assert torch.equal(again.eval()(x), y)


def test_timm_trunk_tower_equals_open_clip(registered, tmp_path):
    name = "vlm-test-timm-ViT"
    ref, path = reference_and_file(name, tmp_path)
    enc = encoders.build({"name": "open_clip", "model_name": name, "pretrained": path, "feature_layer": -2,
                          "select": "all"}).eval()
    assert (enc.image_size, enc.patch_size, enc.hidden_size, enc.num_prefix_tokens) == (224, 16, 192, 1)
    x = torch.randn(1, 3, 224, 224)
    out = ref.visual.trunk.forward_intermediates(x, indices=[10], return_prefix_tokens=True, output_fmt="NLC",
                                                 intermediates_only=True)
    patches, prefix = out[0]
    assert (enc(x) - torch.cat([prefix, patches], dim=1)).abs().max() <= 1e-5
    assert enc.image_mean == (0.5, 0.5, 0.5)  # the timm trunk's own constants
    with pytest.raises(ValueError, match="timm trunk takes its native 224 px only"):
        encoders.build({"name": "open_clip", "model_name": name, "image_size": 256})


def test_weights_at_another_resolution_get_resized_position_embeddings(registered, tmp_path):
    ref, path = reference_and_file("vlm-test-ViT-T-8", tmp_path)
    enc = encoders.build({"name": "open_clip", "model_name": "vlm-test-ViT-T-8", "pretrained": path,
                          "image_size": 48}).eval()
    assert enc.grid() == (6, 6) and enc.num_tokens() == 36
    state = {"visual.positional_embedding": ref.visual.positional_embedding.detach().clone()}
    big = open_clip.create_model("vlm-test-ViT-T-8", force_image_size=48)
    open_clip.model.resize_pos_embed(state, big)
    assert torch.equal(enc.model.positional_embedding, state["visual.positional_embedding"])
    assert enc(torch.randn(1, 3, 48, 48)).shape == (1, 36, 32)


def test_mismatched_weights_file_lists_the_keys(registered, tmp_path):
    _, path = reference_and_file("vlm-test-ViT-T-8-quickgelu", tmp_path)  # 2 blocks, the named model has 3
    with pytest.raises(ValueError, match=r"does not match the vlm-test-ViT-T-8 vision tower: 12 missing key\(s\) "
                                         r"\['transformer.resblocks.2"):
        encoders.build({"name": "open_clip", "model_name": "vlm-test-ViT-T-8", "pretrained": path})
    ref, _ = reference_and_file("vlm-test-ViT-T-8", tmp_path)
    state = {f"visual.{k}": v.contiguous() for k, v in ref.visual.state_dict().items()}
    state["visual.extra.weight"] = torch.zeros(2)
    state["visual.conv1.weight"] = torch.zeros(32, 3, 4, 4)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"1 unexpected key\(s\) \['extra.weight'\], 1 shape mismatch\(es\) "
                                         r"\['conv1.weight: file \(32, 3, 4, 4\) vs model \(32, 3, 8, 8\)'\]"):
        encoders.build({"name": "open_clip", "model_name": "vlm-test-ViT-T-8",
                        "pretrained": str(tmp_path / "bad.safetensors")})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        encoders.build({"name": "open_clip", "model_name": "vlm-test-ViT-T-8",
                        "pretrained": str(tmp_path / "nope.safetensors")})


def test_bad_input_errors(registered):
    with pytest.raises(KeyError, match=r"unknown model 'ViT-L-41'; closest: \[.*'ViT-L-14'"):
        encoders.build({"name": "open_clip", "model_name": "ViT-L-41"})
    enc = encoders.build({"name": "open_clip", "model_name": "vlm-test-ViT-T-8"})
    with pytest.raises(ValueError, match=r"image size \(40, 40\) does not fit .* expected 32x32"):
        enc(torch.randn(1, 3, 40, 40))
    with pytest.raises(ValueError, match="feature_layer 4 out of range"):
        encoders.build({"name": "open_clip", "model_name": "vlm-test-ViT-T-8", "feature_layer": 4})
    with pytest.raises(ValueError, match="is a ModifiedResNet; expected a ViT"):
        with torch.device("meta"):
            encoders.build({"name": "open_clip", "model_name": "RN50"})
    with pytest.raises(ValueError, match="needs 'embed_dim' and 'vision_cfg'"):
        encoders.build({"name": "open_clip", "model_config": {"vision_cfg": {}}})


@pytest.mark.parametrize("name,size,tokens,width,blocks,mean", [
    ("ViT-bigG-14", 448, 1024, 1664, 48, (0.48145466, 0.4578275, 0.40821073)),
    ("ViT-L-14", 224, 256, 1024, 24, (0.48145466, 0.4578275, 0.40821073)),
    ("ViT-B-16-SigLIP", 224, 196, 768, 12, (0.5, 0.5, 0.5)),
    ("ViT-B-16-SigLIP-384", 384, 576, 768, 12, (0.5, 0.5, 0.5)),
])
def test_bundled_configs_at_real_size_on_meta(name, size, tokens, width, blocks, mean):
    with torch.device("meta"):
        enc = encoders.build({"name": "open_clip", "model_name": name, "image_size": size})
    assert enc.num_tokens() == tokens and enc.hidden_size == width and len(enc.blocks()) == blocks
    assert enc.image_mean == pytest.approx(mean)


def test_normalization_follows_the_published_weights():
    with torch.device("meta"):
        plain = encoders.build({"name": "open_clip", "model_name": "ViT-L-14"})
        laion = encoders.build({"name": "open_clip", "model_name": "ViT-L-14", "pretrained_tag": "laion2b_s32b_b82k"})
    assert plain.image_mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))  # random tower: OpenAI CLIP's
    assert laion.image_mean == laion.image_std == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="use different normalization constants.*pretrained_tag"):
        plain.normalization({}, loaded=True)
    with pytest.raises(ValueError, match="pretrained_tag 'nope' is not a published tag"):
        with torch.device("meta"):
            encoders.build({"name": "open_clip", "model_name": "ViT-L-14", "pretrained_tag": "nope"})
    enc = encoders.build({"name": "open_clip", "model_config": TINY_CONFIGS["vlm-test-ViT-T-8"],
                          "image_mean": [0.1, 0.2, 0.3], "image_std": [1, 1, 1]})
    assert enc.image_mean == (0.1, 0.2, 0.3) and enc.image_std == (1.0, 1.0, 1.0)


def test_open_clip_tower_in_a_vlm_trains(registered, tmp_path):
    from tests.conftest import TINY_TEXT as TEXT

    torch.manual_seed(0)
    _, path = reference_and_file("vlm-test-ViT-T-8", tmp_path)
    model = vlm.build({"encoder": {"name": "open_clip", "model_name": "vlm-test-ViT-T-8", "pretrained": path},
                       "connector": {"name": "resampler", "num_queries": 4, "num_heads": 2},
                       "llm": {"name": "hf_causal_lm", "config": dict(TEXT["qwen2"])}})
    assert model.num_image_tokens() == 4
    ids = torch.full((2, 10), 3)
    ids[:, 1:5] = model.image_token_id
    out = model(ids, torch.randn(2, 3, 32, 32), labels=ids)
    out.loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, no_grad
    assert model.encoder.enable_gradient_checkpointing()
    model.save_pretrained(tmp_path / "m")
    again = vlm.load(tmp_path / "m")
    pixels = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(again(ids[:1], pixels).logits, model(ids[:1], pixels).logits)


@pytest.mark.parametrize("config,adapted", [
    (TINY_CONFIGS["vlm-test-ViT-T-8"], {"out_proj", "c_fc", "c_proj"}),  # in_proj_weight is not a Linear
    (TINY_CONFIGS["vlm-test-timm-ViT"], {"qkv", "proj", "fc1", "fc2"}),
])
def test_lora_on_the_tower_adapts_its_linear_layers(config, adapted):
    from tests.conftest import TINY_TEXT as TEXT
    from vlm.train import compose
    from vlm.train.policy import apply_policies

    model = vlm.build({"encoder": {"name": "open_clip", "model_config": config, "feature_layer": 1},
                       "connector": {"name": "resampler", "num_queries": 4, "num_heads": 2},
                       "llm": {"name": "hf_causal_lm", "config": dict(TEXT["qwen2"])}})
    apply_policies(model, compose("micro", ["stage.sft.policy.encoder=lora", "stage.sft.lora.r=4"]).stage.sft)
    trained = {n for n, p in model.named_parameters() if p.requires_grad and n.startswith("encoder.")}
    assert trained and all(".lora_" in n for n in trained)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trained} == adapted
