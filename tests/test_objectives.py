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


def siglip_case(name: str, b: int, L: int):
    """A micro model, objective ``name`` (dim 16, scale 7, bias -3) and a batch of ``b`` samples with ragged
    targets (some tokens repeated)."""
    _, model = micro_model()
    head = build_objective({"name": name, "dim": 16, "scale": 7.0, "bias": -3.0}, model=model)
    torch.manual_seed(0)
    ids = torch.randint(0, 200, (b, L))
    labels = torch.full((b, L), -100)
    for i in range(b):
        labels[i, 2:3 + i] = ids[i, 2:3 + i]
    return model, head, ids, labels, torch.randn(b, 3, 32, 32)


def test_siglip_loss_matches_the_papers_formula():
    model, head, ids, labels, pixels = siglip_case("siglip", b=5, L=9)
    b = len(ids)
    out = head(model, {"input_ids": ids, "pixel_values": pixels, "labels": labels})
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


def test_siglip_tokens_scores_each_text_token_by_its_best_image_token():
    model, head, ids, labels, pixels = siglip_case("siglip_tokens", b=4, L=8)
    b = len(ids)
    out = head(model, {"input_ids": ids, "pixel_values": pixels, "labels": labels})
    # written out per pair: s_ij = mean over text j's tokens of the max over image i's tokens of the cosine
    feats = model.encoder(pixels)                                        # (b, T, C)
    x = torch.nn.functional.normalize(head.image_proj(feats), dim=-1)
    total = 0.0
    for i in range(b):
        for j in range(b):
            toks = labels[j][labels[j] != -100]
            y = torch.nn.functional.normalize(head.text_embed(toks), dim=-1)     # (L_j, dim)
            s = sum(max(float(x[i, t] @ y[k]) for t in range(x.shape[1])) for k in range(len(toks))) / len(toks)
            z = 1.0 if i == j else -1.0
            total += -math.log(1 / (1 + math.exp(-z * (7.0 * s - 3.0))))
    assert out.loss.item() == pytest.approx(total / b, abs=1e-5)
    assert out.logits.shape == (b, b)
    out.loss.backward()
    assert model.encoder.model.embeddings.patch_embedding.weight.grad is not None
    assert all(p.grad is None for p in model.llm.parameters())
    labels[2] = -100
    with pytest.raises(ValueError, match=r"sample\(s\) \[2\].*no target text"):
        head(model, {"input_ids": ids, "pixel_values": pixels, "labels": labels})


def test_siglip_rejects_samples_without_text_or_with_several_images():
    _, model = micro_model()
    head = build_objective({"name": "siglip"}, model=model)
    ids = torch.randint(0, 200, (2, 6))
    labels = ids.clone()
    labels[1] = -100
    with pytest.raises(ValueError, match=r"sample\(s\) \[1\].*no target text"):
        head(model, {"input_ids": ids, "pixel_values": torch.randn(2, 3, 32, 32), "labels": labels})
    with pytest.raises(ValueError, match="exactly one image per sample"):
        head(model, {"input_ids": ids, "pixel_values": torch.randn(4, 3, 32, 32), "labels": ids})
    with pytest.raises(ValueError, match="needs labels"):
        head(model, {"input_ids": ids, "labels": ids})


@pytest.mark.parametrize("objective", ["siglip", "siglip_tokens"])
def test_align_stage_trains_the_encoder_only_and_exports_no_head(objective, tmp_path):
    res = run(compose("micro", ALIGN + [f"stage.align.objective.name={objective}", f"output_dir={tmp_path}"]))
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
    assert not any("objective" in k for k in final.state_dict())


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
    ("+stage.sft.objective.dim=3", "unknown argument"),   # lm's options: label_only_head, head_chunk_size
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


# ------------------------------------------------------------------------------------ the Objective interface
@pytest.mark.parametrize("weighting", ["token", "sample", "square"])
def test_lm_shares_sum_to_the_whole_batch_loss(weighting):
    """Split a batch into micro-batches: the shares (weight / total) add up to the loss of the whole batch."""
    from vlm.loss import lm_loss

    _, model = micro_model()
    model.eval()
    obj = build_objective({"name": "lm"}, model=model, loss_weighting=weighting)
    torch.manual_seed(0)
    ids = torch.randint(0, 200, (4, 10))
    labels = torch.full_like(ids, -100)
    for i, start in enumerate([8, 5, 2, 6]):
        labels[i, start:] = ids[i, start:]
    whole = lm_loss(model(ids).logits, labels, weighting)
    parts = [{"input_ids": ids[i:i + 2], "labels": labels[i:i + 2]} for i in (0, 2)]
    weights = [obj.weight(b) for b in parts]
    shares = sum(obj(model, b, weight=w, total=sum(weights)).loss for b, w in zip(parts, weights))
    torch.testing.assert_close(shares, whole, atol=1e-5, rtol=1e-5)


def test_train_module_checkpoints_read_like_the_model():
    """The stage trains TrainModule(model, objective); its checkpoint names are the model's own, the objective's
    parameters under objective_head. (never a model name), and map back."""
    from vlm.objectives import TrainModule

    _, model = micro_model()
    module = TrainModule(model, build_objective({"name": "siglip", "dim": 8}, model=model))
    names = [module.checkpoint_key(k) for k in module.state_dict()]
    assert set(names) - {n for n in names if n.startswith("objective_head.")} == set(model.state_dict())
    assert {n for n in names if n.startswith("objective_head.")} == \
        {f"objective_head.{k}" for k in module.objective.state_dict()}
    assert all(module.module_key(module.checkpoint_key(k)) == k for k in module.state_dict())
    assert set(module.model_state(module.state_dict())) == set(model.state_dict())


def test_objective_capabilities_decide_the_config_checks():
    """A new objective states what it supports; the config check reads the attributes, not names."""
    from vlm.objectives import OBJECTIVES, Objective

    @OBJECTIVES.register("test_whole_rows")
    class WholeRows(Objective):
        supports_packing = False

        def __init__(self, model=None, k: int = 1):
            super().__init__()

        def forward(self, model, batch, weight=None, total=None):
            raise NotImplementedError

    try:
        with pytest.raises(ConfigError, match="packing=false"):
            compose("micro", ["+stage.sft.objective={name:test_whole_rows}", "stage.sft.packing=true"])
        compose("micro", ["+stage.sft.objective={name:test_whole_rows,k:2}", "trainer.strategy=fsdp"])  # shardable
        with pytest.raises(ConfigError, match="unknown argument"):
            compose("micro", ["+stage.sft.objective={name:test_whole_rows,j:2}"])
    finally:
        OBJECTIVES._entries.pop("test_whole_rows")
