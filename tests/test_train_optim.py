"""Per-module learning rates, no-decay groups, and the warmup + decay schedules."""
from __future__ import annotations

import math

import pytest
import torch

from vlm.train import compose
from vlm.train.build import build_model, build_tokenizer, seed_everything
from vlm.train.optim import build_optimizer, build_scheduler, lr_multiplier, param_groups
from vlm.train.policy import apply_policies


@pytest.fixture(scope="module")
def model_and_stage():
    cfg = compose("micro", ["stage.sft.policy.encoder=full", "stage.sft.lr=1e-3", "stage.sft.weight_decay=0.1",
                            "stage.sft.module_lr.connector=5e-3", "stage.sft.module_lr.encoder=1e-4"])
    seed_everything(0)
    model = build_model(cfg, build_tokenizer(cfg, ["chatml"]))
    apply_policies(model, cfg.stage.sft)
    return model, cfg.stage.sft


def test_groups_per_module_with_their_lr(model_and_stage):
    model, stage = model_and_stage
    groups = {g["name"]: g for g in param_groups(model, stage)}
    assert set(groups) == {f"{m}.{k}" for m in ("encoder", "connector", "llm") for k in ("decay", "no_decay")}
    assert groups["encoder.decay"]["lr"] == pytest.approx(1e-4)
    assert groups["connector.decay"]["lr"] == pytest.approx(5e-3)
    assert groups["llm.decay"]["lr"] == pytest.approx(1e-3)  # falls back to stage.lr
    for name, g in groups.items():
        assert g["weight_decay"] == (pytest.approx(0.1) if name.endswith(".decay") else 0.0)
    # every trainable parameter is in exactly one group
    listed = [n for g in groups.values() for n in g["param_names"]]
    assert sorted(listed) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert len(listed) == len(set(listed))


def test_no_decay_on_norms_biases_and_embeddings(model_and_stage):
    model, stage = model_and_stage
    groups = {g["name"]: set(g["param_names"]) for g in param_groups(model, stage)}
    no_decay = groups["encoder.no_decay"] | groups["connector.no_decay"] | groups["llm.no_decay"]
    decay = groups["encoder.decay"] | groups["connector.decay"] | groups["llm.decay"]
    assert "llm.model.model.embed_tokens.weight" in no_decay
    assert any("position_embedding" in n for n in no_decay) and any("patch_embedding" in n for n in no_decay)
    assert all(n.endswith("bias") or "norm" in n or "embed" in n for n in no_decay), no_decay
    assert not any(n.endswith("bias") or "norm" in n.lower() for n in decay)
    assert "llm.model.model.layers.0.self_attn.q_proj.weight" in decay
    assert "connector.layers.0.weight" in decay and "connector.layers.0.bias" in no_decay
    assert "llm.model.model.norm.weight" in no_decay


def test_optimizer_and_scheduler(model_and_stage):
    model, stage = model_and_stage
    opt = build_optimizer(model, stage, torch.device("cpu"))
    sched = build_scheduler(opt, stage, total_steps=100)
    warm = math.ceil(stage.warmup_ratio * 100)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["connector.decay"] == pytest.approx(5e-3 / warm)  # first warmup step, per-group base LR kept
    assert lrs["encoder.no_decay"] == pytest.approx(1e-4 / warm)
    for _ in range(warm):
        opt.step()
        sched.step()
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["connector.decay"] == pytest.approx(5e-3) and lrs["llm.decay"] == pytest.approx(1e-3)


def test_schedule_shapes():
    total, warm = 100, 10
    assert lr_multiplier(0, total, warm, "cosine") == pytest.approx(0.1)
    assert lr_multiplier(9, total, warm, "cosine") == pytest.approx(1.0)
    assert lr_multiplier(10, total, warm, "cosine") == pytest.approx(1.0)
    assert lr_multiplier(55, total, warm, "cosine") == pytest.approx(0.5)
    assert lr_multiplier(55, total, warm, "linear") == pytest.approx(0.5)
    assert lr_multiplier(99, total, warm, "cosine", min_ratio=0.1) > 0.1
    assert lr_multiplier(50, total, warm, "constant") == 1.0
    vals = [lr_multiplier(s, total, warm, "cosine") for s in range(warm, total)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_norm_layers_are_found_by_type_not_name():
    """torch's norms are norms by type; a module merely *named* like one is not (its 2-D weight decays); a
    family's own norm class joins by register_norm."""
    from vlm.train.optim import NORM_TYPES, is_norm, no_decay_names, register_norm

    class NormalizedProjection(torch.nn.Linear):  # a name containing "norm", but a projection
        pass

    class GridNorm(torch.nn.Module):  # a norm with a 2-D affine weight
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(4, 4))

    for norm in (torch.nn.LayerNorm(4), torch.nn.GroupNorm(2, 4), torch.nn.BatchNorm2d(4), torch.nn.RMSNorm(4)):
        assert is_norm(norm)
    assert not is_norm(NormalizedProjection(4, 4))
    assert no_decay_names(NormalizedProjection(4, 4)) == {"bias"}
    assert no_decay_names(GridNorm()) == set()
    try:
        register_norm(GridNorm)
        assert no_decay_names(GridNorm()) == {"weight"}
    finally:
        NORM_TYPES.remove(GridNorm)
