"""Every registered encoder x every registered token connector composes into a VLM and trains one step (the
registries are the parametrization: a newly registered component joins, and fails until it has a tiny config
here)."""
import copy

import pytest
import torch

import vlm
from tests.conftest import TINY_TEXT, TINY_VISION, image_batch_ids
from vlm.connectors import CONNECTORS
from vlm.encoders import ENCODERS

# a small config per encoder: 32 px images, 32 output channels (the tiny LLM's width, so `identity` composes too),
# an even patch grid (so `pixel_shuffle_mlp` composes too)
TINY_ENCODERS = {
    **TINY_VISION,
    "siglip2": {**TINY_VISION["siglip"], "name": "siglip2"},
    "timm": {"name": "timm", "model_name": "resnet10t", "image_size": 32, "feature_layer": 3,
             "model_kwargs": {"channels": [8, 16, 32, 32], "stem_width": 8}},
    "open_clip": {"name": "open_clip", "model_config": {"embed_dim": 16, "vision_cfg": {
        "image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8}}},
    "idefics3_vision": {"name": "idefics3_vision", "image_size": 32, "patch_size": 8, "hidden_size": 32,
                        "num_layers": 2, "num_heads": 4, "intermediate_size": 64},
    "blip2": {"name": "blip2", "image_size": 32, "patch_size": 8, "hidden_size": 32, "num_layers": 2, "num_heads": 4,
              "intermediate_size": 64},
    "qwen2_vl_vit": {"name": "qwen2_vl_vit", "image_size": 32, "config": {
        "model_type": "qwen2_5_vl_vision", "depth": 2, "hidden_size": 32, "num_heads": 2, "intermediate_size": 48,
        "out_hidden_size": 32, "patch_size": 8, "window_size": 32, "fullatt_block_indexes": [1]}},
}
TINY_CONNECTORS = {"identity": {}, "linear": {}, "mlp": {"depth": 2}, "pixel_shuffle_mlp": {"scale": 0.5},
                   "patch_merger": {},
                   "qformer": {"num_queries": 4, "hidden_size": 32, "num_layers": 2, "num_heads": 4,
                               "intermediate_size": 48},
                   "resampler": {"num_queries": 4, "num_heads": 2},
                   "perceiver": {"num_latents": 4, "depth": 1, "heads": 2, "head_dim": 8},
                   }
# fusion connectors (``fuses_by_cross_attention``) start with closed tanh gates: no gradient reaches the encoder in
# the first step by design (tests/test_xattn.py trains them); the matrix is over token connectors
TOKEN_CONNECTORS = [n for n in CONNECTORS.names() if not CONNECTORS.get(n).fuses_by_cross_attention]


@pytest.mark.parametrize("connector", TOKEN_CONNECTORS)
@pytest.mark.parametrize("encoder", ENCODERS.names())
def test_every_encoder_with_every_connector_trains_one_step(encoder, connector):
    assert encoder in TINY_ENCODERS, f"add a tiny config for the encoder {encoder!r} to TINY_ENCODERS"
    assert connector in TINY_CONNECTORS, f"add a tiny config for the connector {connector!r} to TINY_CONNECTORS"
    torch.manual_seed(0)
    model = vlm.build({"encoder": copy.deepcopy(TINY_ENCODERS[encoder]),
                       "connector": {"name": connector, **TINY_CONNECTORS[connector]},
                       "llm": {"name": "hf_causal_lm", "config": copy.deepcopy(TINY_TEXT["llama"])}})
    model.train()
    ids = image_batch_ids(model, [1, 2])
    pixels = torch.randn(3, 3, 32, 32)
    trained = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trained]
    opt = torch.optim.AdamW(trained, lr=1e-3)
    loss = model(ids, pixels, labels=ids).loss
    assert torch.isfinite(loss)
    loss.backward()
    # (modules after the feature layer, e.g. CLIP's post-layernorm, get none)
    enc_grads = [p.grad for p in model.encoder.parameters() if p.grad is not None]
    assert any(bool(g.abs().sum() > 0) for g in enc_grads), "no gradient reached the encoder"
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, trained))
    assert all(not torch.equal(a, p) for a, p in zip(before, model.connector.parameters()))


MROPE_TEXT = {"model_type": "qwen2_vl_text", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128,
              "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}}


@pytest.mark.parametrize("connector", ["mlp", "patch_merger", "resampler"])
@pytest.mark.parametrize("encoder", ["clip", "qwen2_vl_vit"])
def test_an_mrope_llm_composes_with_other_towers_and_connectors(encoder, connector):
    """Qwen2-VL's text model (3-D mRoPE) after a CLIP tower (images on CLIP's grid) or the Qwen2.5-VL tower, through
    a token-wise, a merging and a query connector: positions come from each image's LLM-token grid, and one step
    trains."""
    torch.manual_seed(0)
    model = vlm.build({"encoder": copy.deepcopy(TINY_ENCODERS[encoder]),
                       "connector": {"name": connector, **TINY_CONNECTORS[connector]},
                       "llm": {"name": "hf_causal_lm", "config": copy.deepcopy(MROPE_TEXT)}})
    assert model.llm.position_scheme == "mrope"
    model.train()
    ids = image_batch_ids(model, [1, 2])
    pixels = torch.randn(3, 3, 32, 32)
    media = model.media_tokens(ids, pixels)
    out_grid = model.connector.output_grid(model.encoder.grid(32))
    assert media.grids == [(1, *out_grid) if out_grid else (1, 1, model.num_image_tokens())] * 3
    positions = model.lm_inputs(ids, pixels)["position_ids"]
    assert positions.shape == (3, 2, ids.shape[1])
    if out_grid and out_grid[0] > 1:  # an image's rows and columns get their own height / width indices
        assert not torch.equal(positions[1], positions[2])
    loss = model(ids, pixels, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.connector.parameters())


GRID_CONNECTORS = [n for n in TOKEN_CONNECTORS if n in TINY_CONNECTORS and CONNECTORS.get(n).token_wise
                   or n in ("pixel_shuffle_mlp", "patch_merger")]


@pytest.mark.parametrize("encoder,connector", [(e, "mlp") for e in ENCODERS.names()]
                         + [("clip", c) for c in GRID_CONNECTORS if c != "mlp"])
def test_the_anyres_grid_arrangement_composes_with_every_encoder_and_grid_connector(encoder, connector):
    """LLaVA-NeXT's arrangement (``vlm.arrangements.anyres_grid``) after every encoder (with ``mlp``) and every
    grid-keeping connector (after CLIP): images of two sizes in one batch, the processor's count of placeholders
    per image, one step trains image_newline and the connector; query connectors are refused when composed."""
    torch.manual_seed(0)
    enc = copy.deepcopy(TINY_ENCODERS[encoder])
    if enc.get("name") in ("clip", "blip2"):
        enc["select"] = "patch"  # the patch grid only (CLS has no place on it)
    model = vlm.build({"encoder": enc, "connector": {"name": connector, **TINY_CONNECTORS[connector]},
                       "llm": {"name": "hf_causal_lm", "config": copy.deepcopy(TINY_TEXT["llama"])},
                       "arrangement": {"name": "anyres_grid", "pinpoints": [[32, 64], [64, 32], [64, 64]]}})
    model.train()
    sizes = torch.tensor([[20, 50], [40, 33]])
    counts = [model.image_token_count(h, w) for h, w in sizes.tolist()]
    ids = torch.full((2, max(counts) + 4), 7)
    for row, n in enumerate(counts):
        ids[row, 2:2 + n] = model.image_token_id
    pixels = torch.randn(sum(model.arrangement.num_views(h, w) for h, w in sizes.tolist()), 3, 32, 32)
    loss = model(ids, pixels, labels=ids, image_sizes=sizes).loss
    loss.backward()
    assert torch.isfinite(loss) and model.arrangement.image_newline.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.connector.parameters())


@pytest.mark.parametrize("connector", [n for n in TOKEN_CONNECTORS if n not in GRID_CONNECTORS])
def test_the_anyres_grid_arrangement_refuses_connectors_without_a_grid(connector):
    with pytest.raises(ValueError, match="anyres_grid"):
        vlm.build({"encoder": {**copy.deepcopy(TINY_ENCODERS["clip"]), "select": "patch"},
                   "connector": {"name": connector, **TINY_CONNECTORS[connector]},
                   "llm": {"name": "hf_causal_lm", "config": copy.deepcopy(TINY_TEXT["llama"])},
                   "arrangement": {"name": "anyres_grid", "pinpoints": [[32, 64]]}})


@pytest.mark.parametrize("encoder,connector", [(e, "mlp") for e in ENCODERS.names()]
                         + [("clip", c) for c in GRID_CONNECTORS if c != "mlp"])
def test_the_onevision_arrangement_composes_with_every_encoder_and_grid_connector(encoder, connector):
    """LLaVA-OneVision's arrangement (``vlm.arrangements.onevision``) after every encoder (with ``mlp``) and every
    grid-keeping connector (after CLIP): one batch with an image alone (its tiles pooled past a 1-tile budget), two
    images sharing a sample (one view each) and a video of 3 frames (pooled 2x2); the counts the model states fill the
    placeholders, and one step trains image_newline and the connector."""
    torch.manual_seed(0)
    enc = copy.deepcopy(TINY_ENCODERS[encoder])
    if enc.get("name") in ("clip", "blip2"):
        enc["select"] = "patch"
    model = vlm.build({"encoder": enc, "connector": {"name": connector, **TINY_CONNECTORS[connector]},
                       "llm": {"name": "hf_causal_lm", "config": copy.deepcopy(TINY_TEXT["llama"])},
                       "arrangement": {"name": "onevision", "pinpoints": [[32, 64], [64, 32], [64, 64]],
                                       "max_tiles": 1}})
    model.train()
    arr = model.arrangement
    sizes, per_sample = torch.tensor([[40, 50], [20, 50], [40, 33]]), torch.tensor([1, 2])
    alone = [True, False, False]
    counts = [arr.num_tokens(h, w, alone=a) for (h, w), a in zip(sizes.tolist(), alone)]
    (r0, r1), (c0, c1) = arr.kept(40, 50)
    assert arr.pooled(r1 - r0, c1 - c0) is not None  # the image alone is past its budget: pooled
    video = arr.video_tokens(3)
    ids = torch.full((2, max(counts[0], counts[1] + counts[2] + video) + 4), 7)
    ids[0, 2:2 + counts[0]] = model.image_token_id
    ids[1, 2:2 + counts[1] + counts[2]] = model.image_token_id
    ids[1, 2 + counts[1] + counts[2]:2 + counts[1] + counts[2] + video] = model.video_token_id
    views = sum(arr.num_views(h, w, alone=a) for (h, w), a in zip(sizes.tolist(), alone))
    loss = model(ids, torch.randn(views, 3, 32, 32), labels=ids, image_sizes=sizes, batch_num_images=per_sample,
                 pixel_values_videos=torch.randn(1, 3, 3, 32, 32)).loss
    loss.backward()
    assert torch.isfinite(loss) and arr.image_newline.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.connector.parameters())


@pytest.mark.parametrize("connector", [n for n in TOKEN_CONNECTORS if n not in GRID_CONNECTORS])
def test_the_onevision_arrangement_refuses_connectors_without_a_grid(connector):
    with pytest.raises(ValueError, match="onevision arranges the tokens of a tile on its grid"):
        vlm.build({"encoder": {**copy.deepcopy(TINY_ENCODERS["clip"]), "select": "patch"},
                   "connector": {"name": connector, **TINY_CONNECTORS[connector]},
                   "llm": {"name": "hf_causal_lm", "config": copy.deepcopy(TINY_TEXT["llama"])},
                   "arrangement": {"name": "onevision", "pinpoints": [[32, 64]]}})
