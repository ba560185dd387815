"""The ``qformer`` connector (BLIP-2's Q-Former) and the ``blip2`` encoder: shapes and token counts for any grid and
width, gradient flow, the layer structure against transformers' ``Blip2QFormerModel``, errors, training smoke."""
from __future__ import annotations

import pytest
import torch

import vlm
from tests.conftest import TINY_TEXT, TINY_VISION, image_batch_ids
from vlm import connectors, encoders
from vlm.connectors.qformer import HF_LAYER_PREFIX, to_hf_name

SMALL = {"name": "qformer", "num_queries": 6, "hidden_size": 16, "num_layers": 3, "num_heads": 2}


@pytest.mark.parametrize("in_dim,out_dim", [(8, 24), (48, 16), (16, 16)])
@pytest.mark.parametrize("grid,tokens", [((3, 3), 9), ((4, 4), 17), ((2, 5), 10), ((1, 1), 1), ((24, 24), 577)])
def test_shapes_and_token_counts_for_any_grid_and_width(in_dim, out_dim, grid, tokens):
    c = connectors.build(SMALL, in_dim=in_dim, out_dim=out_dim)
    assert c.num_tokens(tokens, grid) == 6
    y = c(torch.randn(2, tokens, in_dim), grid)
    assert y.shape == (2, 6, out_dim) and torch.isfinite(y).all()


def test_each_image_is_read_on_its_own():
    """The queries of one image never see another image's tokens (batch rows are independent)."""
    c = connectors.build(SMALL, in_dim=8, out_dim=12).eval()
    x = torch.randn(3, 9, 8)
    whole = c(x, (3, 3))
    for i in range(3):
        torch.testing.assert_close(c(x[i:i + 1], (3, 3)), whole[i:i + 1], atol=1e-6, rtol=0)
    other = x.clone()
    other[1] = torch.randn(9, 8)
    changed = c(other, (3, 3))
    torch.testing.assert_close(changed[[0, 2]], whole[[0, 2]], atol=1e-6, rtol=0)
    assert not torch.allclose(changed[1], whole[1])


@pytest.mark.parametrize("frequency,crossing", [(1, [True, True, True]), (2, [True, False, True]),
                                                (3, [True, False, False])])
def test_gradients_reach_every_parameter(frequency, crossing):
    c = connectors.build({**SMALL, "cross_attention_frequency": frequency, "dropout": 0.1,
                          "attention_dropout": 0.1}, in_dim=8, out_dim=12).train()
    assert [layer.cross_attn is not None for layer in c.layers] == crossing
    c(torch.randn(2, 9, 8), (3, 3)).square().mean().backward()
    no_grad = [n for n, p in c.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad


def test_parameter_count_and_rebuild():
    c = connectors.build(SMALL, in_dim=8, out_dim=12)
    h, ffn = 16, 64
    attn = lambda ctx: h * h + h + 2 * (ctx * h + h) + h * h + h + 2 * h  # noqa: E731  q, k, v, out, norm
    per_layer = attn(h) + (h * ffn + ffn) + (ffn * h + h) + 2 * h
    # input norm, queries, query norm, 3 layers, cross-attention in layers 0 and 2 (keys / values from the 8-wide
    # image tokens), projection
    expected = 2 * 8 + 6 * h + 2 * h + 3 * per_layer + 2 * attn(8) + h * 12 + 12
    assert sum(p.numel() for p in c.parameters()) == expected
    again = connectors.build(c.export_config())
    again.load_state_dict(c.state_dict())
    x = torch.randn(2, 9, 8)
    torch.testing.assert_close(again.eval()(x, (3, 3)), c.eval()(x, (3, 3)))


@pytest.mark.parametrize("frequency", [1, 2])
def test_layers_equal_transformers_qformer(frequency):
    """Our layers + query norm compute what transformers' ``Blip2QFormerModel`` computes from the same weights."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    c = connectors.build({**SMALL, "cross_attention_frequency": frequency, "intermediate_size": 40,
                          "input_norm": False}, in_dim=8, out_dim=12).eval()
    ref = Blip2QFormerModel(Blip2QFormerConfig(hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                               intermediate_size=40, cross_attention_frequency=frequency,
                                               encoder_hidden_size=8)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in c.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    state = {to_hf_name(k).removeprefix("qformer."): v for k, v in c.state_dict().items()
             if to_hf_name(k).startswith("qformer.")}
    assert set(state) == set(ref.state_dict())  # one to one
    ref.load_state_dict(state)
    x = torch.randn(2, 9, 8)
    queries = c.query_tokens.expand(2, -1, -1)
    with torch.no_grad():
        expected = ref(query_embeds=queries, encoder_hidden_states=x).last_hidden_state
        torch.testing.assert_close(c(x, (3, 3)), c.proj(expected), atol=1e-5, rtol=0)


def test_hf_names_cover_every_parameter():
    c = connectors.build({**SMALL, "cross_attention_frequency": 2}, in_dim=8, out_dim=12)
    names = {to_hf_name(k) for k in c.state_dict()}
    assert len(names) == len(c.state_dict())
    assert f"{HF_LAYER_PREFIX}0.crossattention.attention.key.weight" in names
    assert f"{HF_LAYER_PREFIX}1.crossattention.attention.key.weight" not in names
    assert {"query_tokens", "vision_model.post_layernorm.weight", "qformer.layernorm.bias",
            "language_projection.weight"} <= names
    with pytest.raises(KeyError, match="no transformers BLIP-2 counterpart"):
        to_hf_name("layers.0.bogus.weight")


@pytest.mark.parametrize("change,match", [
    ({"num_queries": 0}, r"num_queries=0; expected an integer >= 1"),
    ({"hidden_size": 30, "num_heads": 4}, r"hidden_size=30 is not divisible by num_heads=4"),
    ({"num_layers": 0}, r"num_layers=0"),
    ({"cross_attention_frequency": 0}, r"cross_attention_frequency=0"),
    ({"act": "tanh"}, r"act='tanh'; expected one of"),
    ({"dropout": 1.0}, r"dropout=1.0; expected a probability"),
])
def test_sizes_that_do_not_fit(change, match):
    with pytest.raises(ValueError, match=match):
        connectors.build({**SMALL, **change}, in_dim=8, out_dim=12)


def test_input_that_does_not_fit():
    c = connectors.build(SMALL, in_dim=8, out_dim=12)
    with pytest.raises(ValueError, match=r"QFormerConnector expects \(N, T, 8\); got \(2, 9, 10\)"):
        c(torch.randn(2, 9, 10), (3, 3))
    with pytest.raises(ValueError, match="at least one image token"):
        c.num_tokens(0, (0, 0))
    with pytest.raises(TypeError, match=r"unknown argument\(s\) 'num_query'"):
        connectors.build({**SMALL, "num_query": 4}, in_dim=8, out_dim=12)


def test_blip2_encoder_features():
    """The ``blip2`` encoder is transformers' ``Blip2VisionModel``: its tokens are the last hidden state before
    ``post_layernorm``, CLS first; it is built with a usable init (not the config's 1e-10)."""
    enc = encoders.build({"name": "blip2", "image_size": 32, "patch_size": 8, "hidden_size": 32, "num_layers": 2,
                          "num_heads": 4, "select": "all"}).eval()
    assert enc.has_cls and enc.num_tokens() == 17 and enc.grid((32, 39)) == (4, 4)
    assert enc.model.config.initializer_range == 0.02
    assert enc.model.encoder.layers[0].mlp.fc1.weight.std() > 1e-3
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = enc.model(pixel_values=px)
        tokens = enc(px)
        torch.testing.assert_close(enc.model.post_layernorm(tokens), out.last_hidden_state)
    patch = encoders.build(enc.export_config() | {"select": "patch"})
    assert patch.num_tokens() == 16
    again = encoders.build(enc.export_config())
    again.load_state_dict(enc.state_dict())
    torch.testing.assert_close(again.eval()(px), tokens)


def test_blip2_encoder_pretrained_directories(tmp_path):
    """A saved ``Blip2VisionModel`` loads through ``pretrained:``; a full BLIP-2 directory (whose tower transformers'
    ``Blip2VisionModel.from_pretrained`` does not find, leaving it random) is an error saying what to do."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    enc = encoders.build({"name": "blip2", "image_size": 32, "patch_size": 8, "hidden_size": 32, "num_layers": 2,
                          "num_heads": 4, "select": "all"}).eval()
    enc.model.save_pretrained(tmp_path / "tower")
    again = encoders.build({"name": "blip2", "pretrained": str(tmp_path / "tower"), "select": "all"}).eval()
    px = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(again(px), enc(px))
    full = Blip2ForConditionalGeneration(Blip2Config(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8},
        qformer_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4},
        text_config=dict(TINY_TEXT["llama"]), num_query_tokens=2, image_token_index=100))
    full.save_pretrained(tmp_path / "full")
    with pytest.raises(ValueError, match=r"blip2 encoder: .*full' holds no weights for .* Blip2VisionModel.*"
                                         r"for a full BLIP-2 checkpoint save its tower first"):
        encoders.build({"name": "blip2", "pretrained": str(tmp_path / "full")})


def test_qformer_in_a_vlm_with_another_encoder():
    """Any tower: a SigLIP encoder's patch tokens (no CLS) feed 5 queries of a Qwen2-style LLM."""
    model = vlm.build({"encoder": dict(TINY_VISION["siglip"], interpolate_pos_encoding=True),
                       "connector": {**SMALL, "num_queries": 5},
                       "llm": {"name": "hf_causal_lm", "config": dict(TINY_TEXT["qwen2"])}})
    assert model.num_image_tokens() == 5 == model.num_image_tokens((64, 32))
    ids = image_batch_ids(model, [1, 2])
    out = model(ids, torch.randn(3, 3, 32, 32), labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None for p in model.connector.parameters())


QFORMER_MICRO = ["connector=qformer", "connector.num_queries=4", "connector.hidden_size=32", "connector.num_layers=2",
                 "connector.num_heads=2"]


def test_pretrain_and_lora_sft_with_the_qformer(tmp_path):
    """``connector=qformer`` trains through BLIP-2-style pretrain (only the connector) and an SFT with LoRA on the
    LLM; the final model reloads with the connector's weights changed by training."""
    from vlm.train import compose, run

    overrides = QFORMER_MICRO + [
        "stage.pretrain.policy={encoder: frozen, connector: full, llm: frozen}", "stage.pretrain.max_steps=2",
        "stage.sft.policy.llm=lora", "stage.sft.max_steps=2", "eval.enabled=false", f"output_dir={tmp_path}"]
    result = run(compose("micro", overrides))
    assert all(torch.isfinite(torch.tensor(v)).all() for v in result.losses.values())
    model = vlm.load(result.final_dir)
    assert model.connector.registry_name == "qformer" and model.num_image_tokens() == 4
    assert not any("lora" in k for k in model.state_dict())


def test_bf16_qformer_follows_fp32():
    c = connectors.build(SMALL, in_dim=8, out_dim=12).eval()
    half = connectors.build({**SMALL, "dtype": "bfloat16"}, in_dim=8, out_dim=12).eval()
    half.load_state_dict(c.state_dict())
    x = torch.randn(2, 9, 8)
    y = half(x.bfloat16(), (3, 3))
    assert y.dtype == torch.bfloat16 and {p.dtype for p in half.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(y.float(), c(x, (3, 3)), atol=0.1, rtol=0.05)


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path):
    """2-process DDP (gloo, CPU) with the qformer connector gives the single-process losses: every trainable
    parameter gets a gradient (DDP would stop otherwise) and the batches split exactly."""
    from tests.test_train_distributed import assert_matches_one_process

    args = ["recipe=micro", "stages=[sft]", "stage.sft.max_steps=3", "stage.sft.global_batch_size=4",
            "stage.sft.micro_batch_size=2", "eval.enabled=false", *QFORMER_MICRO]
    assert_matches_one_process(args, "ddp", tmp_path, steps=3)
