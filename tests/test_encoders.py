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
    assert enc.grid((32, 48)) == (4, 6) and enc.patch_size == 8 and enc.image_size == 32
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


@pytest.mark.parametrize("shape,match", [((3, 32, 32), "rank 3"), ((1, 1, 32, 32), "3 channels"),
                                         ((1, 3, 30, 32), "not divisible by the patch size 8")])
def test_bad_pixels(shape, match):
    enc = encoders.build(TINY_VISION["siglip"])
    with pytest.raises(ValueError, match=match):
        enc(torch.randn(*shape))


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
