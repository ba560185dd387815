"""Each part (encoder, connector, LLM) keeps its own dtype: features are cast at each boundary.

Every pair of float32 / bfloat16 for the three parts, forward and backward on CPU without autocast; the same model
in float32 gives the reference loss; save/load keeps each part's dtype; a training run with a bfloat16 encoder.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import vlm
from tests.conftest import image_batch_ids, tiny_cfg
from vlm import connectors
from vlm.data.templates import build_template

DTYPES = ("float32", "bfloat16")
COMBOS = list(itertools.product(DTYPES, repeat=3))


def mixed_cfg(encoder: str, connector: str, llm: str, tower: str = "clip") -> dict:
    cfg = tiny_cfg(tower, "llama")
    cfg["encoder"]["dtype"], cfg["llm"]["dtype"] = encoder, llm
    cfg["connector"]["dtype"] = connector
    return cfg


def part_dtypes(model: vlm.VLM) -> tuple[torch.dtype, ...]:
    return tuple(next(m.parameters()).dtype for m in (model.encoder, model.connector, model.llm))


@pytest.mark.parametrize("enc,conn,lm", COMBOS, ids=["-".join(c) for c in COMBOS])
def test_every_dtype_combination_forward_backward(enc, conn, lm):
    torch.manual_seed(0)
    model = vlm.build(mixed_cfg(enc, conn, lm)).train()
    assert part_dtypes(model) == tuple(getattr(torch, d) for d in (enc, conn, lm))
    ids = image_batch_ids(model, [1, 2], length=48)
    px = torch.randn(3, 3, 32, 32)
    out = model(ids, px, labels=ids)
    assert out.logits.dtype == getattr(torch, lm)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for part in ("encoder", "connector", "llm"):
        grads = [p.grad for p in getattr(model, part).parameters() if p.requires_grad]
        got = [g for g in grads if g is not None]
        assert got, f"{part}: no gradient reached its parameters"
        assert all(torch.isfinite(g).all() for g in got), f"{part}: non-finite gradient"
        assert any(g.abs().sum() > 0 for g in got), f"{part}: all-zero gradients"

    # same weights in float32: the mixed model's loss is the float32 loss up to bfloat16 rounding
    ref = vlm.build(mixed_cfg("float32", "float32", "float32")).eval()
    ref.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    model.eval()
    with torch.no_grad():
        a, b = model(ids, px, labels=ids).loss.float(), ref(ids, px, labels=ids).loss
    tol = 1e-5 if (enc, conn, lm) == ("float32",) * 3 else 0.05 * float(b)
    assert abs(float(a) - float(b)) <= tol, (float(a), float(b))


@pytest.mark.parametrize("enc,conn,lm", [("float32", "bfloat16", "bfloat16"), ("bfloat16", "float32", "float32"),
                                         ("bfloat16", "bfloat16", "float32")])
def test_mixed_dtypes_generate_and_round_trip(tmp_path, enc, conn, lm):
    torch.manual_seed(0)
    model = vlm.build(mixed_cfg(enc, conn, lm, tower="siglip")).eval()
    ids = image_batch_ids(model, [1], length=24)
    px = torch.randn(1, 3, 32, 32)
    new = model.generate(ids, px, max_new_tokens=3)
    assert new.shape == (1, 3)
    model.save_pretrained(tmp_path)
    back = vlm.load(tmp_path)
    assert part_dtypes(back) == part_dtypes(model)
    with torch.no_grad():
        torch.testing.assert_close(back(ids, px).logits, model(ids, px).logits, atol=0, rtol=0)


def test_connector_dtype_defaults_to_the_llm_and_is_configurable():
    cfg = tiny_cfg("clip", "llama")
    cfg["llm"]["dtype"] = "bfloat16"
    assert next(vlm.build(cfg).connector.parameters()).dtype == torch.bfloat16  # unchanged default: the LLM's
    cfg["connector"]["dtype"] = "float32"
    assert next(vlm.build(cfg).connector.parameters()).dtype == torch.float32
    c = connectors.build({"name": "mlp", "depth": 2, "dtype": "bfloat16"}, in_dim=8, out_dim=16)
    assert c.export_config()["dtype"] == "bfloat16"
    assert next(connectors.build(c.export_config()).parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'bfloat61'"):
        connectors.build({"name": "linear", "dtype": "bfloat61"}, in_dim=8, out_dim=16)


def test_timm_encoder_takes_a_dtype():
    torch.manual_seed(0)
    cfg = {"encoder": {"name": "timm", "model_name": "resnet10t", "image_size": 32, "feature_layer": 3,
                       "model_kwargs": {"channels": [8, 8, 16, 16], "stem_width": 8}, "dtype": "bfloat16"},
           "connector": {"name": "mlp", "depth": 2}, "llm": tiny_cfg("clip", "llama")["llm"]}
    model = vlm.build(cfg)
    assert part_dtypes(model)[0] == torch.bfloat16 and part_dtypes(model)[2] == torch.float32
    assert model.config.encoder["dtype"] == "bfloat16"
    ids = image_batch_ids(model, [1], length=16)
    model(ids, torch.randn(1, 3, 32, 32), labels=ids).loss.backward()


@pytest.mark.parametrize("override", ["+encoder.dtype=bfloat16", "+connector.dtype=bfloat16",
                                      "+llm.dtype=bfloat16"])
def test_training_run_with_one_part_in_bfloat16(tmp_path, override):
    """docs/recipes.md's example ``recipe=micro +encoder.dtype=bfloat16`` (and the other parts) trains and exports."""
    from vlm.train import run

    out = run(recipe="micro", overrides=[override, f"output_dir={tmp_path}", "stage.pretrain.max_steps=1",
                                         "stage.sft.max_steps=2", "eval.limit=2", "eval.max_new_tokens=2"])
    losses = [x for s in out.losses.values() for x in s]
    assert losses and all(torch.isfinite(torch.tensor(x)) for x in losses)
    back = vlm.load(out.final_dir)
    part = {"encoder": 0, "connector": 1, "llm": 2}[override[1:].split(".")[0]]
    assert part_dtypes(back)[part] == torch.bfloat16
    # final/ carries the last stage's template (micro: chatml, with the run's image placement) and its end of turn
    # as a stop id
    assert back.tokenizer.convert_tokens_to_ids("<|im_end|>") in back.generation["eos_token_id"]
    assert back.tokenizer.chat_template == build_template("chatml").as_jinja(back.tokenizer, back.image_token,
                                                                             back.image_placement)
