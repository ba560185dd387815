"""Resampling connectors: Qwen-VL's ``resampler``, Flamingo's ``perceiver``, and ``pixel_shuffle_mlp``'s order,
inverse and ``avg_pool`` reducer. Each against an independent re-derivation of its published semantics."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import vlm
from vlm import connectors
from vlm.connectors.base import pad_tokens
from vlm.connectors.pixel_shuffle_mlp import pixel_shuffle, pixel_unshuffle

RESAMPLER = {"name": "resampler", "num_queries": 16, "num_heads": 2}
PERCEIVER = {"name": "perceiver", "num_latents": 5, "depth": 2, "heads": 2, "head_dim": 4, "ff_mult": 2}


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random (LayerNorm weights and biases included), so no term hides behind an init value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def mae_sincos(side: int, dim: int) -> torch.Tensor:
    """MAE's ``get_2d_sincos_pos_embed`` as its paper code computes it (numpy, ``meshgrid(w, h)``: the first half of
    the channels encodes the column)."""
    gw, gh = np.meshgrid(np.arange(side, dtype=np.float64), np.arange(side, dtype=np.float64))

    def one_axis(pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return torch.from_numpy(np.concatenate([one_axis(gw), one_axis(gh)], axis=1)).float()


def reference_resampler(c, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Qwen-VL's resampler written out: q = ln_q(query) + pos, k = ln_kv(kv_proj(x)) + bicubic(pos -> grid),
    v = ln_kv(kv_proj(x)), multi-head softmax attention, out_proj, ln_post, proj."""
    k_q, dim = c.query.shape
    side = math.isqrt(k_q)
    heads = c.attn.num_heads
    pos = mae_sincos(side, dim)
    pos_k = F.interpolate(pos.reshape(1, side, side, dim).permute(0, 3, 1, 2), size=grid, mode="bicubic",
                          align_corners=False).permute(0, 2, 3, 1).reshape(-1, dim)
    kv = F.layer_norm(x @ c.kv_proj.weight.T, (dim,), c.ln_kv.weight, c.ln_kv.bias, 1e-6)
    q = F.layer_norm(c.query, (dim,), c.ln_q.weight, c.ln_q.bias, 1e-6) + pos
    wq, wk, wv = c.attn.in_proj_weight.chunk(3)
    bq, bk, bv = c.attn.in_proj_bias.chunk(3)
    qh = (q @ wq.T + bq).reshape(k_q, heads, -1).transpose(0, 1)                  # (H, K, d)
    kh = ((kv + pos_k) @ wk.T + bk).reshape(x.shape[0], -1, heads, dim // heads).transpose(1, 2)  # (N, H, T, d)
    vh = (kv @ wv.T + bv).reshape(x.shape[0], -1, heads, dim // heads).transpose(1, 2)
    att = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(dim // heads), dim=-1)
    out = (att @ vh).transpose(1, 2).reshape(x.shape[0], k_q, dim) @ c.attn.out_proj.weight.T + c.attn.out_proj.bias
    out = F.layer_norm(out, (dim,), c.ln_post.weight, c.ln_post.bias, 1e-6)
    return out @ c.proj.weight.T


@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (6, 2), (7, 7)])
def test_resampler_matches_qwen_vl_semantics(grid):
    torch.manual_seed(0)
    c = connectors.build(RESAMPLER, in_dim=12, out_dim=24)
    randomize(c)
    x = torch.randn(3, grid[0] * grid[1], 12)
    out = c(x, grid)
    assert out.shape == (3, 16, 24) and c.num_tokens(grid[0] * grid[1], grid) == 16
    assert (out - reference_resampler(c, x, grid)).abs().max() <= 1e-4


def test_resampler_position_table_and_layout():
    c = connectors.build({**RESAMPLER, "num_queries": 64}, in_dim=8, out_dim=32)
    torch.testing.assert_close(c.pos_embed, mae_sincos(8, 32))
    assert not any("pos_embed" in k for k in c.state_dict())  # frozen and recomputed, never saved
    assert {n for n, _ in c.named_parameters()} == {
        "query", "kv_proj.weight", "ln_q.weight", "ln_q.bias", "ln_kv.weight", "ln_kv.bias", "attn.in_proj_weight",
        "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias", "ln_post.weight", "ln_post.bias",
        "proj.weight"}
    same_width = connectors.build({**RESAMPLER, "dim": 8}, in_dim=8, out_dim=32)
    assert isinstance(same_width.kv_proj, torch.nn.Identity) and same_width.proj.weight.shape == (32, 8)
    assert connectors.build({"name": "resampler"}, in_dim=8, out_dim=256).attn.num_heads == 2  # dim // 128


@pytest.mark.parametrize("cfg", [RESAMPLER, PERCEIVER])
def test_per_image_grids_equal_each_image_alone(cfg):
    torch.manual_seed(0)
    c = connectors.build(cfg, in_dim=12, out_dim=24)
    assert c.per_image_grids
    randomize(c)
    grids = [(4, 4), (2, 3), (5, 3), (1, 2)]
    feats = [torch.randn(h * w, 12) for h, w in grids]
    out = c(pad_tokens(feats), grids)
    for i, (f, g) in enumerate(zip(feats, grids)):
        torch.testing.assert_close(out[i], c(f[None], g)[0], atol=1e-5, rtol=1e-5)


def test_resampler_errors():
    with pytest.raises(ValueError, match="square number"):
        connectors.build({"name": "resampler", "num_queries": 10}, in_dim=8, out_dim=16)
    with pytest.raises(ValueError, match="num_heads"):
        connectors.build({"name": "resampler", "num_queries": 4, "num_heads": 3}, in_dim=8, out_dim=16)
    with pytest.raises(ValueError, match="num_heads"):  # 16 // 128 = 0 heads
        connectors.build({"name": "resampler", "num_queries": 4}, in_dim=8, out_dim=16)
    c = connectors.build(RESAMPLER, in_dim=8, out_dim=16)
    with pytest.raises(ValueError, match="select='patch'"):
        c.num_tokens(17, (4, 4))
    with pytest.raises(ValueError, match=r"image 0 has a 4x4 patch grid \(16 tokens\) but x holds 17"):
        c(torch.randn(1, 17, 8), (4, 4))
    with pytest.raises(ValueError, match="2 grids for 3 images"):
        c(torch.randn(3, 16, 8), [(4, 4), (2, 2)])
    with pytest.raises(ValueError, match="image 1 has a 5x4 patch grid"):
        c(torch.randn(2, 16, 8), [(4, 4), (5, 4)])


def reference_perceiver(c, x: torch.Tensor) -> torch.Tensor:
    """OpenFlamingo's PerceiverResampler written out (einsum attention over cat(media, latents), residual
    feed-forward, final LayerNorm), then the connector's projection."""
    r = c.resampler
    lat = r.latents.expand(x.shape[0], -1, -1)
    for attn, ff in r.layers:
        h, d = attn.heads, attn.head_dim
        media = F.layer_norm(x, (x.shape[-1],), attn.norm_media.weight, attn.norm_media.bias)
        ln = F.layer_norm(lat, (lat.shape[-1],), attn.norm_latents.weight, attn.norm_latents.bias)
        q = ln @ attn.to_q.weight.T
        k, v = (torch.cat([media, ln], 1) @ attn.to_kv.weight.T).chunk(2, -1)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], h, d).permute(0, 2, 1, 3)  # noqa: E731
        sim = torch.einsum("bhid,bhjd->bhij", split(q) * d ** -0.5, split(k))
        out = torch.einsum("bhij,bhjd->bhid", (sim - sim.amax(-1, keepdim=True)).softmax(-1), split(v))
        lat = lat + out.permute(0, 2, 1, 3).reshape(lat.shape[0], lat.shape[1], h * d) @ attn.to_out.weight.T
        norm, up, down = ff[0], ff[1], ff[3]
        hidden = F.layer_norm(lat, norm.normalized_shape, norm.weight, norm.bias) @ up.weight.T
        lat = lat + F.gelu(hidden) @ down.weight.T
    return F.layer_norm(lat, r.norm.normalized_shape, r.norm.weight, r.norm.bias) @ c.proj.weight.T + c.proj.bias


@pytest.mark.parametrize("tokens,grid", [(16, (4, 4)), (17, (4, 4)), (15, (3, 5))])
def test_perceiver_matches_flamingo_semantics(tokens, grid):
    torch.manual_seed(0)
    c = connectors.build(PERCEIVER, in_dim=12, out_dim=24)
    randomize(c)
    x = torch.randn(2, tokens, 12)
    out = c(x, grid)
    assert out.shape == (2, 5, 24) and c.num_tokens(tokens, grid) == 5
    assert (out - reference_perceiver(c, x)).abs().max() <= 1e-4


def test_perceiver_module_layout():
    from vlm.connectors.perceiver import PerceiverResampler

    r = PerceiverResampler(16, depth=1, num_latents=3, heads=2, head_dim=8)
    assert r(torch.randn(2, 7, 16)).shape == (2, 3, 16)
    assert sorted(k for k in r.state_dict() if k.startswith("layers.0.0")) == [
        "layers.0.0.norm_latents.bias", "layers.0.0.norm_latents.weight", "layers.0.0.norm_media.bias",
        "layers.0.0.norm_media.weight", "layers.0.0.to_kv.weight", "layers.0.0.to_out.weight",
        "layers.0.0.to_q.weight"]
    assert not any(k.endswith("bias") for k in r.state_dict() if ".to_" in k or ".1.1." in k or ".1.3." in k)
    with pytest.raises(ValueError, match="depth=0"):
        connectors.build({"name": "perceiver", "depth": 0}, in_dim=8, out_dim=8)


@pytest.mark.parametrize("cfg", [RESAMPLER, PERCEIVER, {"name": "pixel_shuffle_mlp"},
                                 {"name": "pixel_shuffle_mlp", "reducer": "avg_pool"}])
def test_gradients_reach_every_trainable_parameter(cfg):
    torch.manual_seed(0)
    c = connectors.build(cfg, in_dim=12, out_dim=24)
    x = torch.randn(2, 24, 12, requires_grad=True)
    (c(x, (4, 6)) ** 2).sum().backward()
    params = dict(c.named_parameters())
    assert params and all(p.requires_grad for p in params.values())
    missing = [n for n, p in params.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    assert x.grad.abs().sum() > 0
    again = connectors.build(c.export_config())
    again.load_state_dict(c.state_dict())
    torch.testing.assert_close(again(x, (4, 6)), c(x, (4, 6)))


def closed_form_shuffle(x: torch.Tensor) -> torch.Tensor:
    """``out[a, b] = cat(x[2a, 2b], x[2a, 2b+1], x[2a+1, 2b], x[2a+1, 2b+1])`` entry by entry."""
    n, h, w, c = x.shape
    out = torch.empty(n, h // 2, w // 2, 4 * c)
    for a in range(h // 2):
        for b in range(w // 2):
            out[:, a, b] = torch.cat([x[:, 2 * a, 2 * b], x[:, 2 * a, 2 * b + 1], x[:, 2 * a + 1, 2 * b],
                                      x[:, 2 * a + 1, 2 * b + 1]], dim=-1)
    return out


@pytest.mark.parametrize("h,w", [(4, 4), (2, 6), (6, 4)])
def test_pixel_shuffle_closed_form_and_inverse(h, w):
    x = torch.randn(2, h, w, 3)
    y = pixel_shuffle(x, 0.5)
    assert torch.equal(y, closed_form_shuffle(x))
    assert torch.equal(pixel_unshuffle(y, 0.5), x)
    z = torch.randn(1, h // 2, w // 2, 12)
    assert torch.equal(pixel_shuffle(pixel_unshuffle(z, 0.5), 0.5), z)
    # k = 3: still the inverse
    x3 = torch.randn(1, 6, 3, 2)
    assert torch.equal(pixel_unshuffle(pixel_shuffle(x3, 1 / 3), 1 / 3), x3)


def test_pixel_shuffle_mlp_avg_pool_reducer():
    torch.manual_seed(0)
    c = connectors.build({"name": "pixel_shuffle_mlp", "reducer": "avg_pool"}, in_dim=8, out_dim=24)
    assert c.layers[0].normalized_shape == (8,)  # the MLP sees C channels, not 4C
    x = torch.randn(2, 4 * 6, 8)
    blocks = x.reshape(2, 2, 2, 3, 2, 8).mean(dim=(2, 4)).reshape(2, 6, 8)  # mean of each 2x2 block, row-major
    torch.testing.assert_close(c(x, (4, 6)), c.layers(blocks))
    assert c.num_tokens(24, (4, 6)) == 6
    default = connectors.build({"name": "pixel_shuffle_mlp"}, in_dim=8, out_dim=24)
    assert default.options["reducer"] == "shuffle" and default.layers[0].normalized_shape == (32,)
    with pytest.raises(ValueError, match="reducer='max'"):
        connectors.build({"name": "pixel_shuffle_mlp", "reducer": "max"}, in_dim=8, out_dim=24)


@pytest.mark.parametrize("reducer", ["shuffle", "avg_pool"])
def test_pixel_shuffle_mlp_odd_grid_is_a_clear_error(reducer):
    c = connectors.build({"name": "pixel_shuffle_mlp", "reducer": reducer}, in_dim=8, out_dim=24)
    with pytest.raises(ValueError, match=r"divisible by 2; got 3x4.*4x4 patches"):
        c(torch.randn(1, 12, 8), (3, 4))
    with pytest.raises(ValueError, match=r"got 4x5"):
        c.num_tokens(20, (4, 5))


@pytest.mark.parametrize("connector", [{"name": "resampler", "num_queries": 4, "num_heads": 2},
                                       {"name": "perceiver", "num_latents": 3, "depth": 1, "heads": 2,
                                        "head_dim": 8}])
def test_resampling_connector_in_a_vlm_any_image_size_and_save_load(connector, tmp_path):
    from tests.conftest import tiny_cfg

    torch.manual_seed(0)
    model = vlm.build(tiny_cfg("siglip", "qwen2", connector=connector, interpolate_pos_encoding=True))
    k = connector.get("num_queries") or connector["num_latents"]
    # the token count does not depend on the image size (24 x 40 px -> a 3 x 5 patch grid)
    assert model.num_image_tokens() == model.num_image_tokens((24, 40)) == k
    ids = torch.full((2, 12), 5)
    ids[:, 2:2 + k] = model.image_token_id
    for size in ((32, 32), (24, 40)):
        out = model(ids, torch.randn(2, 3, *size), labels=ids)
        assert out.logits.shape[:2] == (2, 12) and torch.isfinite(out.loss)
    pixels = torch.randn(2, 3, 32, 32)
    model.save_pretrained(tmp_path)
    again = vlm.load(tmp_path)
    torch.testing.assert_close(again(ids, pixels).logits, model(ids, pixels).logits)


@pytest.mark.parametrize("cfg", [RESAMPLER, PERCEIVER])
def test_bfloat16_parameters_follow_float32(cfg):
    torch.manual_seed(0)
    c32 = connectors.build(cfg, in_dim=12, out_dim=24)
    c16 = connectors.build({**cfg, "dtype": "bfloat16"}, in_dim=12, out_dim=24)
    c16.load_state_dict(c32.state_dict())
    assert {p.dtype for p in c16.parameters()} == {torch.bfloat16}
    x = torch.randn(2, 15, 12)
    y16 = c16(x.bfloat16(), (3, 5))
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), c32(x, (3, 5)), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("overrides", [["connector=resampler", "connector.num_queries=4", "connector.num_heads=2"],
                                       ["connector=resampler", "connector.num_queries=4", "connector.num_heads=2",
                                        "stage.sft.policy.llm=lora", "stage.sft.lora.r=4", "stage.sft.lora.alpha=8"],
                                       ["connector=perceiver", "connector.num_latents=4", "connector.depth=1",
                                        "connector.heads=2", "connector.head_dim=8"]])
def test_pretrain_and_sft_train_with_resampling_connectors(overrides, tmp_path):
    from vlm.train import compose, run

    result = run(compose("micro", overrides + ["eval.enabled=false", "stage.pretrain.max_steps=2",
                                               "stage.sft.max_steps=2", f"output_dir={tmp_path}"]))
    for stage in ("pretrain", "sft"):
        losses = result.losses[stage]
        assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    model = vlm.load(tmp_path / "final")
    assert model.connector.registry_name == overrides[0].split("=")[1] and model.num_image_tokens() == 4
