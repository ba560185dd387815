import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from vlm import encoders
from tests.conftest import TINY_VISION


@pytest.mark.parametrize("name,has_cls", [("clip", True), ("siglip", False)])
@pytest.mark.parametrize("select", ["patch", "all", "llava_default"])
@pytest.mark.parametrize("feature_layer", [-1, -2, [-2, -1], [0, 1, 2]])
def test_shapes(name, has_cls, select, feature_layer):
    enc = encoders.build({**TINY_VISION[name], "select": select, "feature_layer": feature_layer})
    n_layers = 1 if isinstance(feature_layer, int) else len(feature_layer)
    x = torch.randn(3, 3, 32, 32)
    y = enc(x)
    grid = 16
    expected_T = {"patch": grid, "all": grid + int(has_cls), "llava_default": grid + int(has_cls) - 1}[select]
    assert y.shape == (3, expected_T, 32 * n_layers)
    assert enc.hidden_size == 32 * n_layers
    assert enc.num_tokens() == expected_T == enc.num_tokens((32, 32))
    assert enc.grid() == enc.grid((32, 32)) == (4, 4) and enc.patch_size == 8 and enc.image_size == 32
    assert enc.has_cls is has_cls


def test_siglip_patch_keeps_every_patch_and_clip_drops_only_cls():
    for name in ("clip", "siglip"):
        enc = encoders.build({**TINY_VISION[name], "feature_layer": -1}).eval()
        x = torch.randn(1, 3, 32, 32)
        hs = enc.model(pixel_values=x, output_hidden_states=True).hidden_states[-1]
        out = enc(x)
        expected = hs[:, 1:] if name == "clip" else hs
        torch.testing.assert_close(out, expected)


def test_feature_layer_list_concatenates_in_order():
    enc = encoders.build({**TINY_VISION["clip"], "feature_layer": [-2, 1], "select": "all"}).eval()
    x = torch.randn(2, 3, 32, 32)
    hs = enc.model(pixel_values=x, output_hidden_states=True).hidden_states
    torch.testing.assert_close(enc(x), torch.cat([hs[-2], hs[1]], dim=-1))


def test_normalization_constants():
    clip = encoders.build(TINY_VISION["clip"])
    siglip = encoders.build(TINY_VISION["siglip"])
    assert clip.image_mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert siglip.image_std == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("name,model_cls,cfg_cls", [("clip", CLIPVisionModel, CLIPVisionConfig),
                                                      ("siglip", SiglipVisionModel, SiglipVisionConfig)])
def test_pretrained_directory_round_trip(tmp_path, name, model_cls, cfg_cls):
    torch.manual_seed(0)
    ref = model_cls(cfg_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=32, patch_size=8)).eval()
    ref.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text('{"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6]}')
    enc = encoders.build({"name": name, "pretrained": str(tmp_path), "feature_layer": -2, "select": "all"}).eval()
    x = torch.randn(2, 3, 32, 32)
    expected = ref(pixel_values=x, output_hidden_states=True).hidden_states[-2]
    assert (enc(x) - expected).abs().max() <= 1e-5
    assert enc.image_mean == (0.1, 0.2, 0.3) and enc.image_std == (0.4, 0.5, 0.6)
    # the exported config rebuilds the same architecture without the directory
    again = encoders.build(enc.export_config())
    again.load_state_dict(enc.state_dict())
    assert (again.eval()(x) - enc(x)).abs().max() == 0


def test_freeze():
    enc = encoders.build({**TINY_VISION["clip"], "freeze": True})
    assert not any(p.requires_grad for p in enc.parameters())


@pytest.mark.parametrize("shape,match", [
    ((3, 32, 32), r"siglip encoder: pixel_values must have shape \(N, 3, H, W\); got rank 3 shape \(3, 32, 32\)"),
    ((1, 1, 32, 32), r"must have 3 channels at dim 1, shape \(N, 3, H, W\); got 1 channels"),
    ((1, 3, 4, 32), r"image size \(4, 32\) is smaller than one 8x8 patch; expected H and W >= 8"),
    ((1, 3, 24, 32), (r"image size \(24, 32\) gives a 3x4 patch grid, but the tower's position embeddings cover "
                      r"its native 4x4 grid .* expected H and W in 32..39")),
])
def test_bad_pixels(shape, match):
    enc = encoders.build(TINY_VISION["siglip"])
    with pytest.raises(ValueError, match=match):
        enc(torch.randn(*shape))


TINY_TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}


@pytest.mark.parametrize("select", ["patch", "all"])
def test_siglip_non_divisible_size_floors_like_transformers(tmp_path, select):
    """SigLIP takes an image size that is not a multiple of the patch (So400m/14 at 384 px): its stride-p patch
    convolution floors, and so do ``grid`` / ``num_tokens``. Checked against ``SiglipVisionModel`` itself, through
    a saved directory, at every size that floors to the native grid."""
    torch.manual_seed(0)
    ref = SiglipVisionModel(SiglipVisionConfig(**TINY_TOWER, image_size=30, patch_size=8)).eval()  # 3 x 3 patches
    ref.save_pretrained(tmp_path)
    enc = encoders.build({"name": "siglip", "pretrained": str(tmp_path), "select": select}).eval()
    assert enc.image_size == 30 and enc.grid() == (3, 3) and enc.num_tokens() == 9  # no CLS: nothing dropped
    for hw in [(30, 30), (24, 31), (31, 24)]:
        x = torch.randn(2, 3, *hw)
        expected = ref(pixel_values=x, output_hidden_states=True).hidden_states[-1]
        assert expected.shape == (2, 9, 32) and enc.num_tokens(hw) == 9 and enc.grid(hw) == (3, 3)
        assert (enc(x) - expected).abs().max() <= 1e-5
    with pytest.raises(ValueError, match=r"image size \(32, 30\) gives a 4x3 patch grid.*native 3x3 grid .*"
                                         r"expected H and W in 24..31"):
        enc(torch.randn(1, 3, 32, 30))


def test_clip_non_divisible_native_size_and_strict_size(tmp_path):
    """CLIP floors too (30 px, patch 8 -> 3 x 3 + CLS) but transformers' CLIP takes only its exact image size."""
    torch.manual_seed(0)
    ref = CLIPVisionModel(CLIPVisionConfig(**TINY_TOWER, image_size=30, patch_size=8)).eval()
    ref.save_pretrained(tmp_path)
    enc = encoders.build({"name": "clip", "pretrained": str(tmp_path), "select": "all"}).eval()
    x = torch.randn(2, 3, 30, 30)
    expected = ref(pixel_values=x, output_hidden_states=True).hidden_states[-1]
    assert expected.shape == (2, 10, 32) and enc.num_tokens() == 10 and enc.grid() == (3, 3)
    assert (enc(x) - expected).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="doesn't match model"):
        ref(pixel_values=torch.randn(1, 3, 31, 31))  # why the rule below is the backbone's own
    with pytest.raises(ValueError, match=r"clip encoder: image size \(31, 31\) is not the tower's native size; "
                                         r"expected exactly 30x30"):
        enc.num_tokens((31, 31))


@pytest.mark.parametrize("name,model_cls,cfg_cls,cls", [("clip", CLIPVisionModel, CLIPVisionConfig, 1),
                                                          ("siglip", SiglipVisionModel, SiglipVisionConfig, 0)])
def test_interpolate_pos_encoding(name, model_cls, cfg_cls, cls):
    """Off the native grid the position embeddings are interpolated (transformers' ``interpolate_pos_encoding``);
    such sizes must then be multiples of the patch size."""
    torch.manual_seed(0)
    headless = {"vision_use_head": False} if name == "siglip" else {}  # (as our siglip tower, however built)
    ref = model_cls(cfg_cls(**TINY_TOWER, image_size=32, patch_size=8, **headless)).eval()
    enc = encoders.build({"name": name, "config": ref.config.to_dict(), "select": "all",
                          "interpolate_pos_encoding": True}).eval()
    enc.model.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 32, 48)
    expected = ref(pixel_values=x, interpolate_pos_encoding=True, output_hidden_states=True).hidden_states[-1]
    assert enc.grid((32, 48)) == (4, 6) and enc.num_tokens((32, 48)) == 24 + cls == expected.shape[1]
    assert (enc(x) - expected).abs().max() <= 1e-5
    assert enc.num_tokens((33, 33)) == 16 + cls  # the native grid stays as the backbone floors it
    with pytest.raises(ValueError, match=r"image size \(44, 48\) is not divisible by the patch size 8; .* "
                                         r"e.g. 40x48 or 48x48"):
        enc.grid((44, 48))
    again = encoders.build(enc.export_config())
    assert again.interpolate_pos_encoding and again.num_tokens((32, 48)) == 24 + cls
    plain = encoders.build({"name": name, "config": ref.config.to_dict()})
    with pytest.raises(ValueError, match="interpolate_pos_encoding=True"):
        plain.grid((32, 48))


def test_bad_image_sizes_other_towers():
    with pytest.raises(ValueError, match=r"clip encoder: image size \(4, 4\) is smaller than one 8x8 patch"):
        encoders.build({**TINY_VISION["clip"], "image_size": 4})
    s2 = encoders.build({"name": "siglip2", "image_size": 32, "patch_size": 8, "hidden_size": 32, "num_layers": 1,
                         "num_heads": 4})
    with pytest.raises(ValueError, match=r"siglip2 encoder: image size \(30, 32\) is not divisible by the patch "
                                         r"size 8; .* e.g. 24x32 or 32x32"):
        s2(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="siglip2 encoder: interpolate_pos_encoding does not apply"):
        encoders.build({"name": "siglip2", "image_size": 32, "patch_size": 8, "hidden_size": 32, "num_layers": 1,
                        "num_heads": 4, "interpolate_pos_encoding": True})
    with pytest.raises(ValueError, match=r"timm encoder: image size \(40, 40\) is not divisible by the patch size "
                                         r"16"):
        encoders.build({"name": "timm", "model_name": "resnet10t", "image_size": 40, "feature_layer": 3})


def test_pretrained_full_model_directory_and_siglip_head(tmp_path):
    """``pretrained:`` may hold a full CLIP/SigLIP model (its vision part is used). SigLIP's attention-pooling head,
    which patch features never reach, is left out as when building from dimensions or importing LLaVA."""
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
            "vocab_size": 99}
    vision = {**TINY_TOWER, "image_size": 32, "patch_size": 8}
    x = torch.randn(1, 3, 32, 32)
    for name, model_cls, cfg_cls in [("clip", CLIPModel, CLIPConfig), ("siglip", SiglipModel, SiglipConfig)]:
        torch.manual_seed(0)
        full = model_cls(cfg_cls(vision_config=vision, text_config=text)).eval()
        full.save_pretrained(tmp_path / name)
        enc = encoders.build({"name": name, "pretrained": str(tmp_path / name), "select": "all"}).eval()
        expected = full.vision_model(pixel_values=x, output_hidden_states=True).hidden_states[-1]
        assert (enc(x) - expected).abs().max() <= 1e-5
        assert not any(".head." in k for k in enc.model.state_dict())
        assert sum(p.numel() for p in enc.parameters()) == sum(p.numel() for p in full.vision_model.parameters()) \
            - sum(p.numel() for n, p in full.vision_model.named_parameters() if n.startswith("head."))


def test_pretrained_directory_missing_files(tmp_path):
    ref = SiglipVisionModel(SiglipVisionConfig(**TINY_TOWER, image_size=32, patch_size=8))
    ref.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"siglip encoder: no weights in .*expected one of model.safetensors"):
        encoders.build({"name": "siglip", "pretrained": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match=r"siglip encoder: pretrained directory .*nope' does not exist"):
        encoders.build({"name": "siglip", "pretrained": str(tmp_path / "nope")})


def test_bad_options(tmp_path):
    with pytest.raises(ValueError, match="select"):
        encoders.build({**TINY_VISION["clip"], "select": "cls"})
    with pytest.raises(ValueError, match="feature_layer 5 out of range"):
        encoders.build({**TINY_VISION["clip"], "feature_layer": 5})
    with pytest.raises(FileNotFoundError, match="no config.json"):
        encoders.build({"name": "clip", "pretrained": str(tmp_path)})


@pytest.mark.parametrize("model_name,kwargs,layer,C,grid", [
    ("resnet10t", {}, 2, 128, 4),
    ("vit_tiny_patch16_224", {"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}, [-2, -1], 128, 4),
])
def test_timm_tower(tmp_path, model_name, kwargs, layer, C, grid):
    import timm
    from safetensors.torch import save_file

    enc = encoders.build({"name": "timm", "model_name": model_name, "image_size": 32, "feature_layer": layer,
                          "model_kwargs": kwargs}).eval()
    x = torch.randn(2, 3, 32, 32)
    y = enc(x)
    assert y.shape == (2, grid * grid, C) and enc.hidden_size == C and enc.num_tokens() == grid * grid
    assert enc.patch_size == 32 // grid
    # a local weights file of the full timm model loads through pretrained=
    torch.manual_seed(1)
    full = timm.create_model(model_name, img_size=32, **kwargs) if "vit" in model_name else timm.create_model(model_name)
    full.eval()
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(tmp_path / "w.safetensors"))
    loaded = encoders.build({"name": "timm", "model_name": model_name, "image_size": 32, "feature_layer": layer,
                             "model_kwargs": kwargs, "pretrained": str(tmp_path / "w.safetensors")}).eval()
    ref = full.forward_intermediates(x, indices=[layer] if isinstance(layer, int) else layer,
                                     intermediates_only=True)
    ref = torch.cat(ref, dim=1).flatten(2).transpose(1, 2)
    assert (loaded(x) - ref).abs().max() <= 1e-5
    again = encoders.build(loaded.export_config())
    again.load_state_dict(loaded.state_dict())
    assert (again.eval()(x) - loaded(x)).abs().max() == 0


def test_timm_errors(tmp_path):
    with pytest.raises(KeyError, match="unknown timm model"):
        encoders.build({"name": "timm", "model_name": "resnet_nope"})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        encoders.build({"name": "timm", "model_name": "resnet10t", "pretrained": str(tmp_path / "x.safetensors")})
    with pytest.raises(ValueError, match="different strides"):
        encoders.build({"name": "timm", "model_name": "resnet10t", "image_size": 32, "feature_layer": [1, 2]})


def test_siglip2_matches_transformers_processor_path(tmp_path):
    from transformers import Siglip2VisionConfig, Siglip2VisionModel
    from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches

    torch.manual_seed(0)
    ref = Siglip2VisionModel(Siglip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                 num_attention_heads=4, num_patches=16, patch_size=8)).eval()
    ref.save_pretrained(tmp_path)
    enc = encoders.build({"name": "siglip2", "pretrained": str(tmp_path), "feature_layer": -1}).eval()
    assert enc.image_size == 32 and enc.num_tokens() == 16
    x = torch.randn(2, 3, 32, 48)  # non-square: position embeddings are resized by the model
    patches = torch.stack([convert_image_to_patches(img, 8) for img in x])
    out = ref(pixel_values=patches, pixel_attention_mask=torch.ones(2, 24, dtype=torch.long),
              spatial_shapes=torch.tensor([[4, 6], [4, 6]]), output_hidden_states=True)
    assert (enc(x) - out.hidden_states[-1]).abs().max() <= 1e-5
    small = encoders.build({"name": "siglip2", "image_size": 32, "patch_size": 8, "hidden_size": 32,
                            "num_layers": 1, "num_heads": 4})
    assert small(torch.randn(1, 3, 32, 32)).shape == (1, 16, 32)


def test_timm_sincos_position_codes():
    from vlm.encoders.timm_tower import sincos_2d

    pe = sincos_2d(3, 4, 18)  # q = 4 frequencies per sin/cos half, 2 channels of zero padding
    assert pe.shape == (12, 18) and torch.equal(pe[:, 16:], torch.zeros(12, 2))
    f = 10000.0 ** (-torch.arange(4) / 4)
    r, c = 2, 1
    want = torch.cat([torch.sin(r * f), torch.cos(r * f), torch.sin(c * f), torch.cos(c * f)])
    torch.testing.assert_close(pe[r * 4 + c, :16], want)
    assert len({tuple(row.tolist()) for row in pe}) == 12  # every cell has its own code
    spec = {"name": "timm", "model_name": "resnet10t", "image_size": 32, "feature_layer": 3,
            "model_kwargs": {"channels": [8, 16, 32, 64], "stem_width": 8}}
    plain = encoders.build(spec).eval()
    coded = encoders.build({**spec, "pos_embed": "sincos2d", "pos_scale": 0.5}).eval()
    coded.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(coded(x) - plain(x), 0.5 * sincos_2d(2, 2, 32).expand(2, -1, -1))
    again = encoders.build(coded.export_config())
    assert again.pos_embed == "sincos2d" and again.pos_scale == 0.5
    with pytest.raises(ValueError, match="pos_embed='learned'; expected null or 'sincos2d'"):
        encoders.build({**spec, "pos_embed": "learned"})


def blocks_of(enc):
    return [list(block.parameters()) for block in enc.blocks()]


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_blocks_are_the_hidden_state_layers_and_checkpointing_keeps_outputs(name):
    """``blocks()[k]`` maps hidden state ``k`` to ``k + 1``; gradient checkpointing changes no output or gradient."""
    enc = encoders.build({**TINY_VISION[name], "feature_layer": -1}).eval()
    x = torch.randn(2, 3, 32, 32)
    out = enc.model(pixel_values=x, output_hidden_states=True)
    blocks = enc.blocks()
    assert len(blocks) == TINY_VISION[name]["num_layers"] == len(out.hidden_states) - 1
    # freezing what feature_layer=-2 never uses: the last block and the post-layernorm after it, nothing else
    from types import SimpleNamespace

    from vlm.train.policy import freeze_unused_encoder_layers

    shallow = encoders.build({**TINY_VISION[name], "feature_layer": -2})
    frozen = freeze_unused_encoder_layers(SimpleNamespace(encoder=shallow))
    last = {f"encoder.{n}" for n, p in shallow.named_parameters() if any(p is q for q in blocks_of(shallow)[-1])}
    assert last and last <= set(frozen) and all("post_layernorm" in n for n in set(frozen) - last)
    assert any("post_layernorm" in n for n in frozen)
    assert all(p.requires_grad == (f"encoder.{n}" not in frozen) for n, p in shallow.named_parameters())
    plain = encoders.build({**TINY_VISION[name], "feature_layer": -1})
    plain.load_state_dict(enc.state_dict())
    assert enc.enable_gradient_checkpointing() is True
    enc.train(), plain.train()
    grads = []
    for m in (plain, enc):
        m.zero_grad()
        y = m(x)
        y.square().mean().backward()
        grads.append((y.detach(), m.blocks()[0].mlp.fc1.weight.grad.clone()))
    assert any(getattr(mod, "gradient_checkpointing", False) for mod in enc.model.modules())
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_timm_tower_has_no_blocks_and_cannot_checkpoint():
    enc = encoders.build({"name": "timm", "model_name": "resnet10t", "image_size": 32, "feature_layer": 3})
    assert enc.blocks() is None
    assert enc.enable_gradient_checkpointing() is False


TIMM_VIT = {"name": "timm", "model_name": "vit_tiny_patch16_224", "image_size": 32,
            "model_kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "reg_tokens": 2}}


@pytest.mark.parametrize("layer", [-1, 0, [-2, -1]])
def test_timm_prefix_tokens_come_from_the_model(layer):
    """CLS + registers: the model's own num_prefix_tokens; select='all' puts them first, 'patch' drops them."""
    torch.manual_seed(0)
    enc = encoders.build({**TIMM_VIT, "feature_layer": layer, "select": "all"}).eval()
    assert enc.has_cls and enc.num_register_tokens == 2 and enc.num_prefix_tokens == 3
    inner = enc.model.model
    assert inner.num_prefix_tokens == 3
    x = torch.randn(2, 3, 32, 32)
    outs = inner.forward_intermediates(x, indices=[layer] if isinstance(layer, int) else layer,
                                       return_prefix_tokens=True, output_fmt="NLC", intermediates_only=True)
    want = torch.cat([torch.cat([prefix, patches], dim=1) for patches, prefix in outs], dim=-1)
    y = enc(x)
    assert y.shape == (2, 3 + 16, enc.hidden_size) and enc.num_tokens() == 19
    assert (y - want).abs().max() <= 1e-5
    patch = encoders.build({**TIMM_VIT, "feature_layer": layer}).eval()
    patch.load_state_dict(enc.state_dict())
    assert patch.num_tokens() == 16 and torch.equal(patch(x), y[:, 3:])
    no_cls = encoders.build({**TIMM_VIT, "model_kwargs": {**TIMM_VIT["model_kwargs"], "class_token": False,
                                                          "global_pool": "avg"}, "select": "all"})
    assert not no_cls.has_cls and no_cls.num_prefix_tokens == 2 and no_cls(x).shape[1] == 18


def test_timm_dynamic_image_size():
    torch.manual_seed(0)
    fixed = encoders.build(TIMM_VIT).eval()
    dyn = encoders.build({**TIMM_VIT, "dynamic_img_size": True}).eval()
    dyn.load_state_dict(fixed.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert (dyn(x) - fixed(x)).abs().max() <= 1e-6  # the same model at its native size
    assert dyn(torch.randn(1, 3, 32, 48)).shape == (1, 24, 32) and dyn.num_tokens((32, 48)) == 24
    with pytest.raises(ValueError, match=r"image size \(32, 48\) does not fit .* dynamic_img_size=True"):
        fixed(torch.randn(1, 3, 32, 48))
    with pytest.raises(ValueError, match="not divisible by the patch size 8"):
        dyn.num_tokens((36, 48))
    assert encoders.build(dyn.export_config()).dynamic_img_size
    with pytest.raises(ValueError, match="cannot be built with dynamic_img_size=True"):
        encoders.build({"name": "timm", "model_name": "resnet10t", "image_size": 32, "dynamic_img_size": True})
    cnn = encoders.build({"name": "timm", "model_name": "resnet10t", "image_size": 32, "feature_layer": 3})
    assert cnn.num_tokens((32, 64)) == 8 and cnn.num_prefix_tokens == 0  # a CNN takes any multiple of its stride


@pytest.mark.parametrize("name", ["siglip", "siglip2"])
def test_config_built_siglip_drops_the_pooling_head(name):
    """A tower built from a ``config`` (no weights) has no attention-pooling head, as a ``pretrained`` one: SigLIP
    So400m/14-384's config (transformers' default ``vision_use_head: true``, or stated) gives transformers'
    ``SiglipVisionModel`` parameter count without the head, 412,987,248 (the head alone would add 15.2M)."""
    so400m = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
              "image_size": 384, "patch_size": 14}
    count = lambda module: sum(p.numel() for p in module.parameters())
    with torch.device("meta"):
        headless = count(SiglipVisionModel(SiglipVisionConfig(**so400m, vision_use_head=False)))
        with_head = count(SiglipVisionModel(SiglipVisionConfig(**so400m)))
        if name == "siglip2":  # siglip2's config has no image_size (native patches), its own key for positions
            so400m = {k: v for k, v in so400m.items() if k != "image_size"}
        for cfg in (so400m, {**so400m, "vision_use_head": True}):
            enc = encoders.build({"name": name, "config": cfg})
            assert getattr(enc.model, "head", None) is None and enc.model.config.vision_use_head is False
            if name == "siglip":
                assert count(enc) == headless == 412_987_248
    assert with_head - headless > 15_000_000
