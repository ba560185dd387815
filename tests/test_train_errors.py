"""Bad input gives a clear error before training starts (or, for OOM / NaN, names what to change)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


def test_unknown_component_argument_fails_before_build(tmp_path):
    with pytest.raises(ConfigError, match=r"encoder.num_layerz=3: encoder 'siglip' takes no argument 'num_layerz'.*"
                                          r"did you mean 'num_layers'"):
        compose("micro", ["+encoder.num_layerz=3", f"output_dir={tmp_path}"])
    assert not any(tmp_path.iterdir())


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


# --------------------------------------------------------------------------- the command line: one line per mistake
# (command-line arguments, fragments the one-line error must hold: key=value, what was expected, the closest match)
CONFIG_MISTAKES = {
    "negative step count": (["stage.sft.max_steps=-1"], ["stage.sft.max_steps=-1", "expected a whole number >= 1",
                                                         "leave it unset"]),
    "zero batch size": (["stage.sft.micro_batch_size=0"], ["stage.sft.micro_batch_size=0", ">= 1"]),
    "top-level key typo": (["sed=1"], ["sed=1", "unknown key", "top level", "did you mean 'seed'"]),
    "stage key typo (+)": (["+stage.sft.max_step=10"], ["stage.sft.max_step=10", "key of stage.sft",
                                                        "did you mean 'max_steps'"]),
    "stage key typo": (["stage.sft.max_step=10"], ["stage.sft.max_step=10", "unknown key", "'max_steps'"]),
    "trainer key typo": (["trainer.thread=2"], ["trainer.thread=2", "key of trainer", "'threads'"]),
    "wrong type": (["seed=abc"], ["seed=abc", "Integer"]),
    "wrong type in stage": (["stage.sft.lr=fast"], ["stage.sft.lr=fast", "Float"]),
    "unknown recipe": (["recipe=tinny"], ["recipe=tinny", "recipes/recipe/", "did you mean 'tiny'"]),
    "unknown encoder option": (["encoder=tiny_cn"], ["encoder=tiny_cn", "'tiny_cnn'"]),
    "unknown connector option": (["connector=mpl"], ["connector=mpl", "expected one of", "did you mean 'mlp'"]),
    "unknown llm option": (["llm=tinny"], ["llm=tinny", "did you mean 'tiny'"]),
    "unknown data option": (["data=shape"], ["data=shape", "did you mean 'shapes'"]),
    "unknown trainer option": (["trainer=fdsp"], ["trainer=fdsp", "did you mean 'fsdp'"]),
    "unknown logger option": (["logger=wandbb"], ["logger=wandbb", "did you mean 'wandb'"]),
    "unknown stage option": (["stage=[pretrain,sfx]"], ["stage=[pretrain,sfx]", "recipes/stage/",
                                                       "did you mean 'sft'"]),
    "unknown encoder name": (["encoder.name=timmm"], ["encoder.name='timmm'", "unknown encoder",
                                                      "did you mean 'timm'"]),
    "unknown connector name": (["connector.name=linaer"], ["connector.name='linaer'", "did you mean 'linear'"]),
    "unknown llm name": (["llm.name=hf_causal"], ["llm.name='hf_causal'", "did you mean 'hf_causal_lm'"]),
    "unknown tokenizer name": (["tokenizer.name=byte_bp"], ["tokenizer.name='byte_bp'", "'byte_bpe'"]),
    "unknown dataset name": (["data.sft.name=shape"], ["data.sft.name='shape'", "did you mean 'shapes'"]),
    "unknown template": (["stage.sft.template=chatmll"], ["stage.sft.template='chatmll'", "'chatml'"]),
    "unknown policy": (["stage.sft.policy.llm=lorra"], ["stage.sft.policy.llm='lorra'", "did you mean 'lora'"]),
    "unknown strategy": (["trainer.strategy=dpp"], ["trainer.strategy='dpp'", "did you mean 'ddp'"]),
    "unknown component argument": (["+connector.pos_embd=9"], ["connector.pos_embd=9", "takes no argument",
                                                               "expected one of", "did you mean 'pos_embed'"]),
    "component key typo": (["encoder.feature_layr=2"], ["encoder.feature_layr=2", "key of encoder",
                                                        "did you mean 'feature_layer'"]),
    "transformers config key typo": (["+llm.config.num_hiden_layers=2"], ["llm: hf_causal_lm config",
                                                                           "'num_hiden_layers'",
                                                                           "did you mean 'num_hidden_layers'"]),
    "dataset argument typo": (["+data.sft.sizes=3"], ["data.sft.sizes=3", "dataset 'shapes'", "'size'"]),
    "an option the data set cannot take": (["recipe=llava15", "+data.pretrain.size=20000"],
                                            ["data.pretrain: size=20000", "not an option",
                                                                    "'llava' reader"]),
    "missing data path": (["recipe=llava15"], ["data.pretrain.path='data/LLaVA-Pretrain/", "does not exist",
                                             "expected an existing file"]),
    "missing eval path": (["~data.eval", "+data.eval={name:llava_json,path:nope/eval.json}"],
                          ["data.eval.path='nope/eval.json'", "does not exist"]),
    "file data set keeps shapes options": (["data.eval.name=llava_json", "+data.eval.path=nope/eval.json"],
                                           ["data.eval: size=500", "not an option", "'llava' reader"]),
    "unknown eval data": (["eval.data=evall"], ["eval.data='evall'", "did you mean 'eval'"]),
    "bad stage name in stages=": (["stages=[pretrain,sfft]"], ["stages=['pretrain', 'sfft']", "'sfft'",
                                                               "did you mean 'sft'"]),
    "unknown key in a sweep": (["-m", "seed=0,1", "stage.sft.lrr=1e-3,1e-4"],
                               ["stage.sft.lrr=", "key of stage.sft", "did you mean 'lr'"]),
    "unknown option in a sweep": (["-m", "connector=mlp,linaer"], ["connector=linaer", "'linear'"]),
    "missing init_from": (["init_from=nope/run"], ["init_from='nope/run'", "does not exist"]),
    "own data without its file": (["data=files"], ["data.train=???", "not set", "data.train=..."]),
    "own data file missing": (["data=files", "data.train=nope.json"], ["data.train='nope.json'", "does not exist"]),
    "own data without data=files": (["data.train=mine.json"], ["data.train=mine.json: unknown key",
                                                               "'train' is a key of data=files: add that option"]),
    "sweep with --cfg hydra": (["-m", "connector=mlp,linear", "--cfg", "hydra"], ["a sweep prints its jobs' configs "
                                                                                   "with --cfg job"]),
}


def run_cli(argv, monkeypatch):
    """``python -m vlm.train ARGV`` in this process: (exit status or None, the exception when one escapes)."""
    from vlm.train import __main__ as cli

    monkeypatch.setattr(sys, "argv", ["vlm.train", *argv])
    try:
        cli.main()
    except SystemExit as e:
        return e.code, None
    except Exception as e:  # with --debug / HYDRA_FULL_ERROR=1
        return None, e
    return 0, None


@pytest.mark.parametrize("argv,fragments", CONFIG_MISTAKES.values(), ids=CONFIG_MISTAKES.keys())
def test_config_mistake_is_one_line_before_anything_is_written(argv, fragments, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VLM_DATA", raising=False)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # (restored afterwards: --debug sets it to 1 in this process)
    status, exc = run_cli([*argv, "output_dir=out"], monkeypatch)
    err = capsys.readouterr().err
    assert exc is None and status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert not any(tmp_path.iterdir())  # no run directory, no sweep directory, no runs/


def test_sweep_cfg_job_prints_every_job(tmp_path, monkeypatch, capsys):
    """Hydra refuses ``-m`` with ``--cfg``; vlm prints each job's composed config (and writes nothing)."""
    monkeypatch.chdir(tmp_path)
    status, exc = run_cli(["-m", "connector=mlp,linear", "--cfg", "job"], monkeypatch)
    out = capsys.readouterr().out
    assert exc is None and status == 0
    assert "# job 0 of 2: connector=mlp" in out and "# job 1 of 2: connector=linear" in out
    configs = [part.split("\n", 1)[1] for part in out.split("# job ")[1:]]
    from omegaconf import OmegaConf

    assert [OmegaConf.create(c).connector.name for c in configs] == ["mlp", "linear"]
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("how", ["--debug", "HYDRA_FULL_ERROR=1"])
def test_debug_shows_the_traceback(how, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # (restored afterwards: --debug sets it to 1 in this process)
    argv = ["connector=mpl"]
    if how == "--debug":
        argv.append("--debug")
    else:
        monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    _, exc = run_cli(argv, monkeypatch)
    assert isinstance(exc, ConfigError) and "did you mean 'mlp'" in str(exc)
    assert not any(tmp_path.iterdir())


def test_command_line_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    """The real process: stderr is one line without --debug, a traceback with it."""
    cmd = [sys.executable, "-m", "vlm.train", "+stage.sft.max_step=10", f"output_dir={tmp_path / 'run'}"]
    root = str(Path(__file__).resolve().parents[1])  # this checkout's vlm, whatever the cwd
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("HYDRA_FULL_ERROR", None)
    plain = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert plain.returncode == 2 and plain.stdout == ""
    assert plain.stderr.splitlines() == ["error: stage.sft.max_step=10: unknown key; expected a key of stage.sft "
                                         "(did you mean 'max_steps' or 'warmup_steps'?)"]
    debug = subprocess.run([*cmd, "--debug"], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert debug.returncode != 0 and "Traceback (most recent call last)" in debug.stderr
    assert "ConfigError: stage.sft.max_step=10" in debug.stderr
    assert not any(tmp_path.iterdir())
