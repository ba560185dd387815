"""Bad input gives a clear error before training starts (or, for OOM / NaN, names what to change)."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf, open_dict

import vlm.train.stage as stage_mod
from vlm.model import VLM
from vlm.train import BatchTooLargeError, ConfigError, NonFiniteLossError, compose, run


@pytest.fixture
def no_build(monkeypatch):
    """Fail the test if a model gets built (errors must come first)."""
    def boom(*a, **k):
        raise AssertionError("a model was built before the config error was raised")

    monkeypatch.setattr(stage_mod, "build_model", boom)


def test_missing_data_file(tmp_path, no_build):
    cfg = compose("micro", [f"output_dir={tmp_path}"])
    with open_dict(cfg):
        cfg.data.sft = OmegaConf.create({"name": "llava_json", "path": str(tmp_path / "nope.json")})
    with pytest.raises(ConfigError, match="nope.json"):
        run(cfg)


def test_unknown_component_and_template(tmp_path, no_build):
    with pytest.raises(ConfigError, match="encoder.*nope.*clip"):
        run(compose("micro", ["encoder.name=nope", f"output_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="template.*vicuna_v9"):
        run(compose("micro", ["stage.sft.template=vicuna_v9", f"output_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="scheduler.*warmup_only"):
        run(compose("micro", ["stage.sft.scheduler=warmup_only", f"output_dir={tmp_path}"]))


def test_unknown_component_argument_fails_at_build(tmp_path):
    with pytest.raises(TypeError, match="num_layerz"):
        run(compose("micro", ["+encoder.num_layerz=3", f"output_dir={tmp_path}"]))


def test_qlora_on_cpu(tmp_path, no_build):
    with pytest.raises((RuntimeError, ConfigError), match="CUDA"):
        run(compose("micro", ["stage.sft.policy.llm=qlora", f"output_dir={tmp_path}"]))


def test_init_from_missing(tmp_path, no_build):
    with pytest.raises((ConfigError, FileNotFoundError), match="does not exist"):
        run(compose("micro", [f"init_from={tmp_path / 'missing'}", f"output_dir={tmp_path / 'out'}"]))


def test_oom_on_first_step_suggests_accumulation(tmp_path, monkeypatch):
    def oom(self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(VLM, "forward", oom)
    with pytest.raises(BatchTooLargeError, match=r"micro_batch_size=1.*global_batch_size=4.*accumulation"):
        run(compose("micro", ["stages=[sft]", f"output_dir={tmp_path}"]))


def test_nan_loss_names_step_and_samples(tmp_path, monkeypatch):
    real = VLM.forward
    calls = {"n": 0}

    def forward(self, *a, **k):
        out = real(self, *a, **k)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 3:  # step 2, first micro-batch (2 micro-batches per step)
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(VLM, "forward", forward)
    with pytest.raises(NonFiniteLossError, match=r"step 2.*shapes/train/\d+"):
        run(compose("micro", ["stages=[sft]", "eval.enabled=false", f"output_dir={tmp_path}"]))
