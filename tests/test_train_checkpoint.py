"""Checkpoints: atomic writes, last-K pruning, RNG round trip, exact resume, fingerprint check."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from vlm.train import ConfigError, compose, run
from vlm.train import checkpoint as ckpt_mod
from vlm.train.checkpoint import CheckpointManager, rng_state, set_rng_state
from vlm.train.distributed import Strategy
from vlm.train.loop import StageLoop
from vlm.train.schema import TrainerConfig


def tiny_setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    model[0].requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def train_steps(model, opt, sched, n):
    for _ in range(n):
        loss = model(torch.randn(3, 4)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()


def manager(root, keep=2):
    s = Strategy(TrainerConfig())
    s.setup()
    return CheckpointManager(root, s, keep_last=keep)


def test_save_load_roundtrip_trainable_only(tmp_path):
    model, opt, sched = tiny_setup()
    train_steps(model, opt, sched, 3)
    m = manager(tmp_path)
    path = m.save(3, model, opt, sched, {"note": "x"})
    assert path.name == "step_000003" and m.latest() == path
    from safetensors.torch import load_file

    assert set(load_file(str(path / "model.safetensors"))) == {"1.weight", "1.bias", "2.weight", "2.bias"}
    expect = torch.randn(5)
    model2, opt2, sched2 = tiny_setup(seed=1)
    state = m.load(path, model2, opt2, sched2)
    assert state["step"] == 3 and state["note"] == "x"
    for (n, a), (_, b) in zip(model.named_parameters(), model2.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert sched2.last_epoch == sched.last_epoch
    assert torch.equal(torch.randn(5), expect)  # RNG restored to the state at save time


def test_killed_write_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    model, opt, sched = tiny_setup()
    m = manager(tmp_path)
    first = m.save(1, model, opt, sched, {})
    train_steps(model, opt, sched, 1)
    real = ckpt_mod.save_tensors

    def dies_midway(state, path, metadata=None):
        real(state, path, metadata)
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(ckpt_mod, "save_tensors", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        m.save(2, model, opt, sched, {})
    monkeypatch.setattr(ckpt_mod, "save_tensors", real)
    assert m.latest() == first
    assert any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())  # the half-written one is not a checkpoint
    model2, opt2, sched2 = tiny_setup(seed=1)
    assert m.load(first, model2, opt2, sched2)["step"] == 1
    second = m.save(2, model, opt, sched, {})
    assert m.latest() == second and not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())


def test_keep_last_k(tmp_path):
    model, opt, sched = tiny_setup()
    m = manager(tmp_path, keep=2)
    for step in range(1, 5):
        m.save(step, model, opt, sched, {})
    assert [p.name for p in ckpt_mod.step_dirs(tmp_path)] == ["step_000003", "step_000004"]


def test_rng_state_roundtrip_is_plain_tensors(tmp_path):
    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    a = (torch.rand(3), random.random(), np.random.rand())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]


def crash_at(monkeypatch, stage: str, call: int):
    """Make StageLoop.step raise on its ``call``-th call in ``stage`` (after earlier steps and checkpoints)."""
    real = StageLoop.step
    calls = {"n": 0}

    def step(self, step, micro):
        if self.name == stage:
            calls["n"] += 1
            if calls["n"] == call:
                raise KeyboardInterrupt("simulated crash")
        return real(self, step, micro)

    monkeypatch.setattr(StageLoop, "step", step)


OVERRIDES = ["stage.sft.max_steps=6", "stage.sft.save_every=2", "eval.enabled=false"]


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_loss_sequence(tmp_path, monkeypatch):
    full = run(compose("micro", OVERRIDES + [f"output_dir={tmp_path / 'full'}"]))
    crash_at(monkeypatch, "sft", 4)  # steps 1-3 done, checkpoint at step 2
    with pytest.raises(KeyboardInterrupt):
        run(compose("micro", OVERRIDES + [f"output_dir={tmp_path / 'cut'}"]))
    monkeypatch.undo()
    assert (tmp_path / "cut" / "pretrain" / "DONE.json").is_file()
    assert (tmp_path / "cut" / "sft" / "checkpoints" / "step_000002").is_dir()
    resumed = run(compose("micro", OVERRIDES + [f"output_dir={tmp_path / 'cut'}", "resume=auto"]))
    assert resumed.stages[0].skipped and resumed.stages[1].resumed_from.endswith("step_000002")
    a, b = full.losses["sft"], resumed.losses["sft"]
    assert len(a) == len(b) == 6
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-6, (a, b)
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "cut" / "final" / "model.safetensors"))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6
    # a different model cannot resume this run
    with pytest.raises(ConfigError, match="different model"):
        run(compose("micro", OVERRIDES + [f"output_dir={tmp_path / 'cut'}", "resume=auto",
                                          "llm.config.intermediate_size=48"]))


def test_output_dir_with_checkpoints_needs_resume(tmp_path):
    (tmp_path / "sft" / "checkpoints" / "step_000001").mkdir(parents=True)
    with pytest.raises(ConfigError, match="resume=auto"):
        run(compose("micro", [f"output_dir={tmp_path}"]))


def test_trainer_state_records_data_position(tmp_path):
    res = run(compose("micro", ["stages=[sft]", "stage.sft.max_steps=2", "eval.enabled=false",
                                f"output_dir={tmp_path}"]))
    state = json.loads((res.run_dir / "sft" / "checkpoints" / "step_000002" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["data"]["step"] == 2 and len(state["losses"]) == 2
    assert state["fingerprint"] and state["trainable_only"] is True
