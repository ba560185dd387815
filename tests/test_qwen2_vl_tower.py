"""The ``qwen2_vl_vit`` tower and the ``patch_merger`` connector against transformers' Qwen2-VL / Qwen2.5-VL vision
models with the same weights (fp32, max abs diff <= 1e-4); the fixed-size path against the image processor's flat
patches; ``forward_flat`` / ``output_grid`` of every token connector; bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                          Qwen2VLVisionConfig)
from transformers.models.qwen2_5_vl import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                                            Qwen2_5_VLVisionConfig)
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchMerger as HFPatchMerger
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

from tests.conftest import TINY_VISION
from vlm import connectors, encoders
from vlm.encoders.qwen2_vl_blocks import block_to_row_major

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TOL = 1e-4
P = 4  # patch size of the tiny towers: flat patches of 3 * 2 * 4 * 4 = 96 values
# Qwen2-VL: LayerNorm + GELU MLP, full attention; Qwen2.5-VL: RMSNorm + SwiGLU, 16 px windows (2 x 2 merge units,
# 4 x 4 patches) except block 1
FAMILIES = {
    "qwen2_vl": (Qwen2VisionTransformerPretrainedModel, Qwen2VLVisionConfig, "layer_norm", dict(
        model_type="qwen2_vl_vision", depth=2, embed_dim=32, num_heads=2, mlp_ratio=2, hidden_size=24,
        patch_size=P)),
    "qwen2_5_vl": (Qwen2_5_VisionTransformerPretrainedModel, Qwen2_5_VLVisionConfig, "rms_norm", dict(
        model_type="qwen2_5_vl_vision", depth=3, hidden_size=32, num_heads=2, intermediate_size=40,
        out_hidden_size=24, patch_size=P, window_size=16, fullatt_block_indexes=[1])),
}
# (t, h, w) in patches: one odd-sized image (6 x 10: windows need padding on both sides); several sizes in one call
# (4 x 4: exactly one window; 8 x 12: no padding); a video of 2 temporal groups
GRIDS = {"one_odd_image": [[1, 6, 10]], "several_sizes": [[1, 6, 10], [1, 4, 4], [1, 8, 12], [1, 2, 2]],
         "video_t2": [[2, 4, 6]], "video_and_image": [[2, 6, 4], [1, 2, 6]]}


def reference(family: str, seed: int = 0):
    """``(transformers' vision model, our tower, our patch_merger)`` with the same random weights, eval mode."""
    model_class, config_class, norm, cfg = FAMILIES[family]
    torch.manual_seed(seed)
    ref = model_class(config_class(**{k: v for k, v in cfg.items() if k != "model_type"})).eval()
    enc = encoders.build({"name": "qwen2_vl_vit", "config": ref.config.to_dict(), "image_size": 16}).eval()
    state = ref.state_dict()
    enc.model.load_state_dict({k: v for k, v in state.items() if not k.startswith("merger.")})
    merger = connectors.build({"name": "patch_merger", "norm": norm}, in_dim=enc.hidden_size, out_dim=24).eval()
    merger.load_state_dict({k.removeprefix("merger."): v for k, v in state.items() if k.startswith("merger.")})
    return ref, enc, merger


def flat_pixels(grids: list[list[int]], seed: int = 1) -> torch.Tensor:
    n = sum(t * h * w for t, h, w in grids)
    return torch.randn(n, 3 * 2 * P * P, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", list(GRIDS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_tower_and_merger_equal_transformers(family, case):
    ref, enc, merger = reference(family)
    grid = torch.tensor(GRIDS[case])
    pixels = flat_pixels(GRIDS[case])
    with torch.no_grad():
        expected = ref(pixels, grid_thw=grid)
        tokens = enc(pixels, grid)
        merged = merger.forward_flat(tokens, grid.tolist())
    assert tokens.shape == (pixels.shape[0], enc.hidden_size)
    assert merged.shape == expected.pooler_output.shape
    assert (merged - expected.pooler_output).abs().max() <= TOL
    if family == "qwen2_vl":  # transformers' patch tokens are in block order: ours are the same tokens, row-major
        index = block_to_row_major(grid.tolist(), 2)
        assert (tokens - expected.last_hidden_state[index]).abs().max() <= TOL


def test_images_do_not_attend_to_each_other():
    _, enc, _ = reference("qwen2_5_vl")
    grids = GRIDS["several_sizes"]
    pixels = flat_pixels(grids)
    with torch.no_grad():
        together = enc(pixels, torch.tensor(grids))
        alone, start = [], 0
        for g in grids:
            n = g[0] * g[1] * g[2]
            alone.append(enc(pixels[start:start + n], torch.tensor([g])))
            start += n
    assert (together - torch.cat(alone)).abs().max() <= TOL


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fixed_size_path_equals_the_image_processors_flat_patches(family):
    """``(N, 3, H, W)`` is patchified as the image processor does (2 identical frames, block order undone)."""
    _, enc, merger = reference(family)
    images = torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(3))
    proc = Qwen2VLImageProcessor(do_resize=False, do_rescale=False, do_normalize=False, patch_size=P, merge_size=2,
                                 temporal_patch_size=2)
    out = proc(images=list(images), return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 6, 10]] * 2
    with torch.no_grad():
        fixed = enc(images)
        flat = enc(out["pixel_values"], out["image_grid_thw"])
        assert fixed.shape == (2, 60, enc.hidden_size)
        assert (fixed.reshape(-1, enc.hidden_size) - flat).abs().max() <= TOL
        # the fixed-size connector call equals the flat one
        assert (merger(fixed, (6, 10)).reshape(-1, 24) - merger.forward_flat(flat, [[1, 6, 10]] * 2)).abs().max() \
            <= TOL
    assert enc.grid((24, 40)) == (6, 10) and enc.num_tokens((24, 40)) == 60
    assert merger.num_tokens(60, (6, 10)) == 15 and merger.output_grid((6, 10)) == (3, 5)


def test_patch_merger_after_a_clip_grid_equals_qwen2_vl_merger():
    """Row-major CLIP tokens ``(N, h*w, C)``: regrouped into 2 x 2 blocks exactly as Qwen2-VL's merger reads them."""
    torch.manual_seed(0)
    clip = encoders.build(dict(TINY_VISION["clip"])).eval()
    merger = connectors.build({"name": "patch_merger"}, in_dim=32, out_dim=24).eval()
    hf = HFPatchMerger(dim=24, context_dim=32, spatial_merge_size=2).eval()
    hf.load_state_dict(merger.state_dict())
    with torch.no_grad():
        tokens = clip(torch.randn(3, 3, 32, 32))  # (3, 16, 32): a 4 x 4 grid, row-major
        h, w = clip.grid()
        blocks = tokens.reshape(3, h // 2, 2, w // 2, 2, 32).permute(0, 1, 3, 2, 4, 5).reshape(-1, 32)
        expected = hf(blocks).reshape(3, -1, 24)
        out = merger(tokens, (h, w))
        flat = merger.forward_flat(tokens.reshape(-1, 32), [(1, h, w)] * 3)
    assert out.shape == (3, 4, 24) and (out - expected).abs().max() <= TOL
    assert (flat - expected.reshape(-1, 24)).abs().max() <= TOL


TOKEN_CONNECTORS = {"identity": {}, "linear": {}, "mlp": {}, "pixel_shuffle_mlp": {},
                    "patch_merger": {}, "resampler": {"num_queries": 4, "num_heads": 2},
                    "perceiver": {"num_latents": 4, "depth": 1, "heads": 2, "head_dim": 8},
                    "qformer": {"num_queries": 4, "hidden_size": 32, "num_layers": 1, "num_heads": 4,
                                "intermediate_size": 48}}
OUTPUT_GRIDS = {"identity": (4, 6), "linear": (4, 6), "mlp": (4, 6), "pixel_shuffle_mlp": (2, 3),
                "patch_merger": (2, 3), "resampler": None, "perceiver": None, "qformer": None}


@pytest.mark.parametrize("name", list(TOKEN_CONNECTORS))
def test_forward_flat_equals_per_image_forward_and_output_grid(name):
    torch.manual_seed(0)
    con = connectors.build({"name": name, **TOKEN_CONNECTORS[name]}, in_dim=32, out_dim=32).eval()
    grids = [(1, 4, 6), (2, 2, 4), (1, 2, 2)]
    x = torch.randn(sum(t * h * w for t, h, w in grids), 32)
    with torch.no_grad():
        flat = con.forward_flat(x, grids)
        per_image, start = [], 0
        for t, h, w in grids:
            per_image.append(con(x[start:start + t * h * w].reshape(t, h * w, 32), (h, w)).reshape(-1, 32))
            start += t * h * w
    assert flat.shape[0] == sum(t * con.num_tokens(h * w, (h, w)) for t, h, w in grids)
    assert (flat - torch.cat(per_image)).abs().max() <= TOL
    assert con.output_grid((4, 6)) == OUTPUT_GRIDS[name]
    with pytest.raises(ValueError, match=r"hold 44 tokens .* x has 43 rows"):
        con.forward_flat(x[:-1], grids)


def test_linear_with_pos_embed_forward_flat_is_per_image():
    torch.manual_seed(0)
    con = connectors.build({"name": "linear", "pos_embed": 4}, in_dim=8, out_dim=8)
    with torch.no_grad():
        con.pos.normal_()
    x = torch.randn(8, 8)
    out = con.forward_flat(x, [(1, 2, 2), (1, 2, 2)])
    assert torch.allclose(out, con(x.reshape(2, 4, 8), (2, 2)).reshape(8, 8))


def test_gradient_checkpointing_gives_the_same_gradients_and_lora_injects():
    from peft import LoraConfig, inject_adapter_in_model

    _, enc, merger = reference("qwen2_5_vl")
    grid = torch.tensor(GRIDS["video_and_image"])
    pixels = flat_pixels(GRIDS["video_and_image"])

    def grads():
        enc.train().zero_grad()
        merger.forward_flat(enc(pixels, grid), grid.tolist()).square().sum().backward()
        return [p.grad.clone() for p in enc.parameters()]

    plain = grads()
    assert enc.enable_gradient_checkpointing("full")
    assert all((a - b).abs().max() <= TOL for a, b in zip(plain, grads()))
    assert enc.supports_lora and len(enc.blocks()) == 3
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["qkv", "proj"]), enc.model)
    assert any("lora_" in n for n, _ in enc.named_parameters())
    assert enc(pixels, grid).shape == (pixels.shape[0], 32)


# --------------------------------------------------------------------------------------------- pretrained / export
TEXT = dict(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
            vocab_size=64, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2]})


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pretrained_full_model_directory(family, tmp_path):
    """A saved transformers Qwen2-VL / Qwen2.5-VL model: the tower's ``visual.*`` weights load (the merger's not)."""
    model_class, config_class, norm, cfg = FAMILIES[family]
    full_config, full_class = {"qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
                               "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration)}[family]
    vision = {k: v for k, v in cfg.items() if k != "model_type"}
    torch.manual_seed(0)
    full = full_class(full_config(vision_config=vision, text_config=TEXT)).eval()
    full.save_pretrained(tmp_path)
    # the hub's files state no model_type in vision_config and carry keys of older versions (in_chans)
    written = json.loads((tmp_path / "config.json").read_text())
    written["vision_config"].pop("model_type")
    written["vision_config"]["in_chans"] = 3
    (tmp_path / "config.json").write_text(json.dumps(written))
    enc = encoders.build({"name": "qwen2_vl_vit", "pretrained": str(tmp_path)}).eval()
    visual = full.model.visual
    merger = connectors.build({"name": "patch_merger", "norm": norm}, in_dim=32, out_dim=24).eval()
    merger.load_state_dict({k.removeprefix("merger."): v for k, v in visual.state_dict().items()
                            if k.startswith("merger.")})
    grid = torch.tensor(GRIDS["several_sizes"])
    pixels = flat_pixels(GRIDS["several_sizes"])
    with torch.no_grad():
        expected = visual(pixels, grid_thw=grid).pooler_output
        assert (merger.forward_flat(enc(pixels, grid), grid.tolist()) - expected).abs().max() <= TOL
    # the export rebuilds the same architecture without the directory
    rebuilt = encoders.build(enc.export_config())
    rebuilt.load_state_dict(enc.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(pixels, grid), enc(pixels, grid))
    assert "pretrained" not in enc.export_config()


def test_pretrained_vision_model_directory_and_bad_directories(tmp_path):
    ref, _, _ = reference("qwen2_vl")
    ref.save_pretrained(tmp_path / "visual")
    enc = encoders.build({"name": "qwen2_vl_vit", "pretrained": str(tmp_path / "visual")}).eval()
    grid = torch.tensor(GRIDS["one_odd_image"])
    pixels = flat_pixels(GRIDS["one_odd_image"])
    with torch.no_grad():
        expected = ref(pixels, grid_thw=grid).last_hidden_state[block_to_row_major(grid.tolist(), 2)]
        assert (enc(pixels, grid) - expected).abs().max() <= TOL
    with pytest.raises(FileNotFoundError, match="does not exist"):
        encoders.build({"name": "qwen2_vl_vit", "pretrained": str(tmp_path / "missing")})
    clip_dir = tmp_path / "clip"
    encoders.build(dict(TINY_VISION["clip"])).model.save_pretrained(clip_dir)
    with pytest.raises(ValueError, match="model_type='clip_vision_model'"):
        encoders.build({"name": "qwen2_vl_vit", "pretrained": str(clip_dir)})


# --------------------------------------------------------------------------------------------- recipes
def _meta_param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("recipe,model_class,config_class,norm", [
    ("qwen2_vl_vit", Qwen2VisionTransformerPretrainedModel, Qwen2VLVisionConfig, "layer_norm"),
    ("qwen25_vl_vit", Qwen2_5_VisionTransformerPretrainedModel, Qwen2_5_VLVisionConfig, "rms_norm")])
def test_encoder_recipes_build_at_real_dimensions(recipe, model_class, config_class, norm):
    """The YAMLs build (on meta) with transformers' parameter counts: the tower's, and the merger's."""
    cfg = OmegaConf.to_container(OmegaConf.load(RECIPES / "encoder" / f"{recipe}.yaml"))
    with torch.device("meta"):
        enc = encoders.build(cfg)
        ref = model_class(config_class(**{k: v for k, v in cfg["config"].items() if k != "model_type"}))
        merger_cfg = OmegaConf.to_container(OmegaConf.load(RECIPES / "connector" / "patch_merger.yaml"))
        merger = connectors.build({**merger_cfg, "norm": norm}, in_dim=enc.hidden_size,
                                  out_dim=ref.merger.mlp[2].out_features)
    assert enc.hidden_size == 1280 and enc.native_resolution and enc.spatial_merge_size == 2
    assert _meta_param_count(enc) == _meta_param_count(ref) - _meta_param_count(ref.merger)
    assert _meta_param_count(merger) == _meta_param_count(ref.merger)
    assert enc.num_tokens((448, 448)) == 32 * 32 and merger.num_tokens(1024, (32, 32)) == 256


# --------------------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def tower():
    return reference("qwen2_5_vl")[1]


def test_grid_that_disagrees_with_the_pixels(tower):
    pixels = flat_pixels([[1, 6, 10]])
    with pytest.raises(ValueError, match=r"image_grid_thw disagrees with the pixels: .* hold 64 patches .* "
                                         r"pixel_values has 60 rows"):
        tower(pixels, torch.tensor([[1, 8, 8]]))
    with pytest.raises(ValueError, match=r"image_grid_thw\[0\] = \(1, 5, 12\).*multiples of spatial_merge_size 2"):
        tower(pixels, torch.tensor([[1, 5, 12]]))
    with pytest.raises(ValueError, match=r"image_grid_thw must have shape \(N, 3\)"):
        tower(pixels, torch.tensor([6, 10]))
    with pytest.raises(ValueError, match=r"flat patches of shape \(P, 96\).*got shape \(60, 48\)"):
        tower(pixels[:, :48], torch.tensor([[1, 6, 10]]))
    with pytest.raises(ValueError, match="need image_grid_thw"):
        tower(pixels)


def test_bad_image_sizes_and_channels(tower):
    with pytest.raises(ValueError, match=r"image size \(24, 42\) is not divisible by the patch size 4"):
        tower(torch.randn(1, 3, 24, 42))
    with pytest.raises(ValueError, match="3 channels"):
        tower(torch.randn(1, 4, 24, 40))
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        tower.grid((30, 40))


def test_bad_configs():
    base = dict(FAMILIES["qwen2_vl"][3])
    with pytest.raises(ValueError, match="model_type='qwen2_vl'.*expected one of"):
        encoders.build({"name": "qwen2_vl_vit", "config": {**base, "model_type": "qwen2_vl"}})
    with pytest.raises(TypeError, match="embed_dimm"):
        encoders.build({"name": "qwen2_vl_vit", "config": {**base, "embed_dimm": 16}})
    with pytest.raises(ValueError, match="exactly one of 'config'"):
        encoders.build({"name": "qwen2_vl_vit"})
    with pytest.raises(ValueError, match="window_size 4 px is smaller than one merged block"):
        encoders.build({"name": "qwen2_vl_vit", "config": {**FAMILIES["qwen2_5_vl"][3], "window_size": 4}})
    with pytest.raises(ValueError, match="attn_implementation='flash'"):
        encoders.build({"name": "qwen2_vl_vit", "config": base, "attn_implementation": "flash"})


def test_patch_merger_refuses_a_grid_it_cannot_merge():
    merger = connectors.build({"name": "patch_merger"}, in_dim=8, out_dim=8)
    msg = r"a 3x3 patch grid cannot be merged in 2x2 blocks \(merge_size 2\)"
    with pytest.raises(ValueError, match=msg):
        merger.num_tokens(9, (3, 3))
    with pytest.raises(ValueError, match=msg):
        merger.output_grid((3, 3))
    with pytest.raises(ValueError, match=msg):
        merger(torch.randn(1, 9, 8), (3, 3))
    with pytest.raises(ValueError, match=r"image 1, grid \(t, h, w\) = \(1, 3, 3\)"):
        merger.forward_flat(torch.randn(13, 8), [(1, 2, 2), (1, 3, 3)])
    with pytest.raises(ValueError, match="4x4=16 tokens"):
        merger(torch.randn(1, 17, 8), (4, 4))
    with pytest.raises(ValueError, match="norm='batch_norm'"):
        connectors.build({"name": "patch_merger", "norm": "batch_norm"}, in_dim=8, out_dim=8)


def test_rotary_angles_stay_float32_in_a_bfloat16_tower():
    cfg = {"name": "qwen2_vl_vit", "config": FAMILIES["qwen2_5_vl"][3], "image_size": 16}
    fp32, bf16 = encoders.build(cfg), encoders.build({**cfg, "dtype": "bfloat16"})
    grids = GRIDS["several_sizes"]
    assert all(torch.equal(a, b) for a, b in zip(fp32.model.rope(grids, "cpu"), bf16.model.rope(grids, "cpu")))
    out = bf16(flat_pixels(grids), torch.tensor(grids))
    assert out.dtype == torch.bfloat16 and bf16.export_config()["dtype"] == "bfloat16"


def test_eager_attention_equals_sdpa():
    _, enc, _ = reference("qwen2_5_vl")
    eager = encoders.build({**enc.export_config(), "attn_implementation": "eager"}).eval()
    eager.load_state_dict(enc.state_dict())
    grids = GRIDS["video_and_image"]
    pixels = flat_pixels(grids)
    with torch.no_grad():
        assert (eager(pixels, torch.tensor(grids)) - enc(pixels, torch.tensor(grids))).abs().max() <= TOL
