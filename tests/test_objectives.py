"""Non-LM stage objectives (vlm.objectives): SigLIP's loss against its formula, the `align` stage end to end
(what it trains, checkpoints and exports), exact resume, config errors; frozen parts stay in eval mode."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

import vlm
from vlm.objectives import build as build_objective
from vlm.train import ConfigError, compose, run
from vlm.train.build import build_model, build_tokenizer, seed_everything
from vlm.train.policy import apply_policies

from test_train_checkpoint import crash_at

ALIGN = ["stage=[align,sft]", "stages=[align,sft]", "stage.align.global_batch_size=8",
         "stage.align.micro_batch_size=4", "stage.align.max_steps=4", "stage.align.save_every=2",
         "stage.sft.max_steps=2", "eval.enabled=false"]


def micro_model(overrides=()):
    cfg = compose("micro", list(overrides))
    seed_everything(0)
    return cfg, build_model(cfg, build_tokenizer(cfg, ["plain", "chatml"]))


def test_siglip_loss_matches_the_papers_formula():
    _, model = micro_model()
    head = build_objective({"name": "siglip", "dim": 16, "scale": 7.0, "bias": -3.0}, model=model)
    model.objective_head = head
    torch.manual_seed(0)
    b, L = 5, 9
    ids = torch.randint(0, 200, (b, L))
    labels = torch.full((b, L), -100)
    for i in range(b):  # ragged targets, some repeated tokens
        labels[i, 2:3 + i] = ids[i, 2:3 + i]
    pixels = torch.randn(b, 3, 32, 32)
    out = model(ids, pixels, labels=labels, objective=True)
    # the formula, written out per pair: -1/|B| sum_i sum_j log sigmoid(z_ij (t x_i . y_j + b))
    feats = model.encoder(pixels).mean(1)
    x = torch.nn.functional.normalize(head.image_proj(feats), dim=-1)
    ys = []
    for i in range(b):
        toks = labels[i][labels[i] != -100]
        ys.append(torch.nn.functional.normalize(head.text_embed(toks).mean(0), dim=-1))
    total = 0.0
    for i in range(b):
        for j in range(b):
            z = 1.0 if i == j else -1.0
            logit = 7.0 * float((x[i] @ ys[j]).detach()) - 3.0
            total += -math.log(1 / (1 + math.exp(-z * logit)))
    assert out.loss.item() == pytest.approx(total / b, abs=1e-5)
    assert out.logits.shape == (b, b)
    out.loss.backward()
    assert head.log_scale.grad is not None and model.encoder.model.embeddings.patch_embedding.weight.grad is not None
    assert all(p.grad is None for p in model.llm.parameters())  # the LLM takes no part


def test_siglip_rejects_samples_without_text_or_with_several_images():
    _, model = micro_model()
    model.objective_head = build_objective({"name": "siglip"}, model=model)
    ids = torch.randint(0, 200, (2, 6))
    labels = ids.clone()
    labels[1] = -100
    with pytest.raises(ValueError, match=r"sample\(s\) \[1\].*no target text"):
        model(ids, torch.randn(2, 3, 32, 32), labels=labels, objective=True)
    with pytest.raises(ValueError, match="exactly one image per sample"):
        model(ids, torch.randn(4, 3, 32, 32), labels=ids, objective=True)
    model.objective_head = None
    with pytest.raises(ValueError, match="objective head"):
        model(ids, torch.randn(2, 3, 32, 32), labels=ids, objective=True)


def test_align_stage_trains_the_encoder_only_and_exports_no_head(tmp_path):
    res = run(compose("micro", ALIGN + [f"output_dir={tmp_path}"]))
    assert [s.name for s in res.stages] == ["align", "sft"]
    assert all(math.isfinite(x) for x in res.losses["align"]) and len(res.losses["align"]) == 4
    delta = load_file(str(tmp_path / "align" / "weights.safetensors"))
    assert delta and all(k.startswith("encoder.") for k in delta), sorted(delta)[:5]
    ckpt = load_file(str(tmp_path / "align" / "checkpoints" / "step_000002" / "model.safetensors"))
    assert any(k.startswith("objective_head.") for k in ckpt)          # resumable: the head is checkpointed
    assert not any(k.startswith(("llm.model.model.", "connector.")) for k in ckpt)  # frozen in this stage
    _, fresh = micro_model(ALIGN)
    moved = (delta["encoder.model.embeddings.patch_embedding.weight"]
             - fresh.state_dict()["encoder.model.embeddings.patch_embedding.weight"]).abs().max()
    assert moved > 1e-4
    final = vlm.load(res.final_dir)
    assert final.objective_head is None and not any("objective" in k for k in final.state_dict())


@pytest.mark.slow
def test_align_stage_resumes_exactly(tmp_path, monkeypatch):
    ov = ALIGN + ["stages=[align]"]
    full = run(compose("micro", ov + [f"output_dir={tmp_path / 'full'}"]))
    crash_at(monkeypatch, "align", 4)  # steps 1-3 done, checkpoint at step 2
    with pytest.raises(KeyboardInterrupt):
        run(compose("micro", ov + [f"output_dir={tmp_path / 'cut'}"]))
    monkeypatch.undo()
    resumed = run(compose("micro", ov + [f"output_dir={tmp_path / 'cut'}", "resume=auto"]))
    assert resumed.stages[0].resumed_from.endswith("step_000002")
    assert resumed.losses["align"] == pytest.approx(full.losses["align"], abs=1e-6)


@pytest.mark.parametrize("override, match", [
    ("stage.align.objective.name=clip_loss", "unknown"),
    ("+stage.align.objective.temperature=3", "unknown argument"),
    ("stage.align.packing=true", "packing=false"),
    ("trainer.strategy=fsdp", "not fsdp"),
    ("+stage.sft.objective.dim=3", "takes no options"),
])
def test_objective_config_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        compose("micro", ALIGN + [override])


def bn_model():
    """A micro recipe stage config and a tiny VLM whose tower is a BatchNorm CNN (timm resnet10t, narrow)."""
    from conftest import tiny_cfg

    spec = tiny_cfg()
    spec["encoder"] = {"name": "timm", "model_name": "resnet10t", "image_size": 32, "feature_layer": 3,
                       "model_kwargs": {"channels": [8, 16, 32, 64], "stem_width": 8}}
    return compose("micro"), vlm.build(spec)


def with_policy(cfg, encoder_policy):
    from omegaconf import OmegaConf

    st = OmegaConf.to_container(cfg.stage.sft, resolve=True)
    st["policy"]["encoder"] = encoder_policy
    return OmegaConf.create(st)


def test_frozen_batchnorm_tower_stays_fixed_in_training_mode():
    cfg, model = bn_model()
    bns = [m for m in model.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns
    apply_policies(model, with_policy(cfg, "frozen"))
    model.train()
    assert not model.encoder.training and model.llm.training
    before = bns[0].running_mean.clone()
    model.image_features(torch.randn(4, 3, 32, 32))
    assert torch.equal(bns[0].running_mean, before)
    apply_policies(model, with_policy(cfg, "full"))
    model.train()
    assert model.encoder.training
    model.image_features(torch.randn(4, 3, 32, 32))
    assert not torch.equal(bns[0].running_mean, before)


def test_stage_weights_carry_batchnorm_statistics_of_trained_modules():
    from vlm.train.export import trained_names

    cfg, model = bn_model()
    apply_policies(model, with_policy(cfg, "full"))
    names = trained_names(model)
    assert {"encoder.model.bn1.running_mean", "encoder.model.bn1.running_var",
            "encoder.model.bn1.num_batches_tracked"} <= names
    apply_policies(model, with_policy(cfg, "frozen"))
    assert not any(n.startswith("encoder.") for n in trained_names(model))
