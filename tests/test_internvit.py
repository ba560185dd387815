"""``internvit``: identical hidden states to transformers' ``InternVLVisionModel`` (every tensor randomized, so a
dropped or misplaced weight shows), position-embedding resizing, options and bad input."""
import pytest
import torch
from safetensors.torch import save_file
from transformers import InternVLVisionConfig, InternVLVisionModel

from tests.conftest import TINY_VISION
from vlm import encoders
from vlm.encoders.internvit_keys import hf_to_ours, original_to_ours, ours_to_hf, ours_to_original


def random_tower(tmp_path, **overrides):
    cfg = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, image_size=28,
               patch_size=7, attention_bias=True)
    hf = InternVLVisionModel(InternVLVisionConfig(**{**cfg, **overrides})).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in hf.parameters():  # random init zeroes CLS / positions and sets the lambdas to a constant
            p.normal_(0, 0.3)
    hf.save_pretrained(tmp_path)
    return hf


@pytest.mark.parametrize("norm_type,qk_norm,mean_pooling,bias", [
    ("layer_norm", False, True, True), ("rms_norm", True, True, False), ("layer_norm", True, False, True),
    ("rms_norm", False, False, True)])
@pytest.mark.parametrize("feature_layer", [-1, -2, -4, 0])
def test_matches_transformers(tmp_path, norm_type, qk_norm, mean_pooling, bias, feature_layer):
    hf = random_tower(tmp_path, norm_type=norm_type, use_qk_norm=qk_norm, use_mean_pooling=mean_pooling,
                      attention_bias=bias)
    enc = encoders.build({"name": "internvit", "pretrained": str(tmp_path), "feature_layer": feature_layer,
                          "select": "all"}).eval()
    assert (enc.dims["norm_type"], enc.dims["qk_norm"], enc.dims["final_norm"]) == (norm_type, qk_norm,
                                                                                     not mean_pooling)
    torch.manual_seed(1)
    for size in (28, 42, 14):  # native grid, and resized position embeddings both ways
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            out = hf(pixel_values=x, output_hidden_states=True)
            ref = out.last_hidden_state if feature_layer == -1 else out.hidden_states[feature_layer]
            ours = enc(x)
        assert ours.shape == ref.shape == (2, 1 + (size // 7) ** 2, 32)
        assert (ours - ref).abs().max().item() <= 1e-4
    patch = encoders.build({"name": "internvit", "pretrained": str(tmp_path), "feature_layer": feature_layer})
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(patch(x), enc(x)[:, 1:])
    assert patch.num_tokens() == 16 and patch.num_tokens((42, 42)) == 36


def test_key_tables_round_trip(tmp_path):
    hf = random_tower(tmp_path, use_qk_norm=True, use_mean_pooling=False)
    enc = encoders.build({"name": "internvit", "pretrained": str(tmp_path)})
    theirs = hf.state_dict()
    assert set(ours_to_hf(enc.model.state_dict())) == set(theirs)
    assert set(hf_to_ours(theirs)) == set(enc.model.state_dict())
    # an original OpenGVLab checkpoint: fused qkv, class_embedding, ls1 ... (the final norm has no counterpart)
    ours = {k: v for k, v in enc.model.state_dict().items() if not k.startswith("norm.")}
    original = ours_to_original(ours)
    assert "encoder.layers.0.attn.qkv.weight" in original and "embeddings.class_embedding" in original
    assert original["encoder.layers.1.attn.qkv.weight"].shape == (96, 32) and "encoder.layers.2.ls2" in original
    assert not any("q_proj" in k or "lambda" in k for k in original)
    back = original_to_ours(original)
    assert set(back) == set(ours) and all(torch.equal(back[k], ours[k]) for k in ours)
    with pytest.raises(ValueError, match="'norm.weight' has no counterpart in the original InternViT"):
        ours_to_original(enc.model.state_dict())


def test_from_dimensions_options_and_training_step():
    enc = encoders.build({**TINY_VISION["internvit"], "norm_type": "rms_norm", "qk_norm": True, "drop_path": 0.2,
                          "layer_scale": 1.0, "final_norm": True, "qkv_bias": False})
    assert enc.has_cls and enc.image_mean == pytest.approx((0.485, 0.456, 0.406))
    assert [b.drop_path.p for b in enc.blocks()] == pytest.approx([0.0, 0.2])
    assert enc.blocks()[0].attn.q_proj.bias is None and torch.all(enc.blocks()[1].ls2 == 1.0)
    x = torch.randn(2, 3, 32, 32)
    enc.train()
    y = enc(x)
    assert y.shape == (2, 16, 32)
    y.square().mean().backward()
    assert all(p.grad is not None for p in enc.parameters())
    rebuilt = encoders.build(enc.export_config())
    rebuilt.load_state_dict(enc.state_dict())
    enc.eval(), rebuilt.eval()
    torch.testing.assert_close(rebuilt(x), enc(x))
    # gradient checkpointing: same outputs and gradients
    plain = encoders.build({**TINY_VISION["internvit"]})
    ckpt = encoders.build({**TINY_VISION["internvit"]})
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.enable_gradient_checkpointing()
    grads = []
    for m in (plain, ckpt):
        m.train()
        m(x).square().mean().backward()
        grads.append(m.blocks()[0].mlp.fc1.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_feature_layer_stops_early_and_bad_options():
    enc = encoders.build({**TINY_VISION["internvit"], "feature_layer": -2, "select": "all"}).eval()
    full = encoders.build({**TINY_VISION["internvit"], "feature_layer": 1, "select": "all"}).eval()
    full.load_state_dict(enc.state_dict())
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(enc(x), full(x))
    with pytest.raises(ValueError, match="feature_layer 3 out of range for a tower with 2 layers"):
        encoders.build({**TINY_VISION["internvit"], "feature_layer": 3})
    with pytest.raises(ValueError, match="norm_type='batch_norm'; expected one of"):
        encoders.build({**TINY_VISION["internvit"], "norm_type": "batch_norm"})
    with pytest.raises(ValueError, match="image_size 30 is not a multiple of patch_size 8"):
        encoders.build({**TINY_VISION["internvit"], "image_size": 30})


def test_bad_image_sizes():
    enc = encoders.build(TINY_VISION["internvit"])
    with pytest.raises(ValueError, match=r"image size \(36, 36\) is not divisible by the patch size 8"):
        enc(torch.randn(1, 3, 36, 36))
    with pytest.raises(ValueError, match="smaller than one 8x8 patch"):
        enc(torch.randn(1, 3, 4, 32))
    assert enc(torch.randn(1, 3, 48, 24)).shape == (1, 18, 32)  # any multiple of the patch size


def test_weights_that_do_not_match_list_the_keys(tmp_path):
    hf = random_tower(tmp_path)
    state = {k: v for k, v in hf.state_dict().items() if "layer.1.mlp.fc2" not in k}
    state["encoder.layer.0.attention.extra.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError) as e:
        encoders.build({"name": "internvit", "pretrained": str(tmp_path)})
    msg = str(e.value)
    assert "missing keys ['layers.1.mlp.fc2.bias', 'layers.1.mlp.fc2.weight']" in msg
    assert "unexpected keys ['encoder.layer.0.attention.extra.weight']" in msg
    (tmp_path / "config.json").write_text('{"model_type": "clip_vision_model"}')
    with pytest.raises(ValueError, match="model_type='clip_vision_model'; expected 'internvl_vision'"):
        encoders.build({"name": "internvit", "pretrained": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        encoders.build({"name": "internvit", "pretrained": str(tmp_path / "nowhere")})


def test_tile_size_the_model_cannot_take_and_tile_budget_below_one():
    import vlm
    from tests.conftest import TINY_TEXT
    from tests.test_interop import tiny_tokenizer
    from vlm.data.images import ImageProcessor
    from vlm.data.processor import Processor

    llm = {"name": "hf_causal_lm", "config": dict(TINY_TEXT["llama"])}
    # 40 px tiles of 8 px patches: a 5 x 5 grid, which a 2 x 2 pixel shuffle cannot fold
    with pytest.raises(ValueError, match=r"vlm.build: the encoder's image \(tile\) size 40 x 40 does not fit the "
                                         r"model: pixel_shuffle_mlp with scale 0.5 needs a patch grid divisible by 2; "
                                         r"got 5x5"):
        vlm.build({"encoder": {**TINY_VISION["internvit"], "image_size": 40}, "connector": {"name": "pixel_shuffle_mlp"},
                   "llm": llm})
    ip = ImageProcessor(32, (0.5,) * 3, (0.5,) * 3, tiling={"kind": "dynamic", "max_tiles": 4})
    # a per-sample cap above the tiling's own maximum does not raise it: 4 tiles + thumbnail, not 6 + thumbnail
    assert ip.num_images(200, 100) == ip.num_images(200, 100, max_tiles=6) == 3
    assert ip.num_images(600, 100) == ip.num_images(600, 100, max_tiles=9) == 5  # (4, 1), not (6, 1)
    with pytest.raises(ValueError, match="max_tiles_per_sample=0: a tile budget must be at least 1 tile"):
        Processor(tiny_tokenizer(), "plain", ip, 4, max_tiles_per_sample=0)
    with pytest.raises(ValueError, match="dynamic tiling needs 1 <= min_tiles <= max_tiles"):
        ImageProcessor(32, (0.5,) * 3, (0.5,) * 3, tiling={"kind": "dynamic", "max_tiles": 0})


def test_tile_settings_are_checked_when_a_recipe_is_composed():
    from vlm.train import compose
    from vlm.train.config_check import ConfigError

    with pytest.raises(ConfigError, match=r"stage.sft.max_tiles_per_sample=0: expected a whole number >= 1"):
        compose("tiny_internvl", ["stage.sft.max_tiles_per_sample=0"])
    with pytest.raises(ConfigError, match=r"stage.pretrain.tiling: dynamic tiling needs 1 <= min_tiles <= max_tiles"):
        compose("tiny_internvl", ["stage.pretrain.tiling.max_tiles=0"])
