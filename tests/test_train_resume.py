"""Exact resume after SIGKILL / SIGTERM / Ctrl-C, with dropout, data workers and periodic evaluation drawing
randomness: every step's loss and the final weights are bit-identical to an uninterrupted run."""
from __future__ import annotations

import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vlm.train import ConfigError, compose
from vlm.train.batch_plan import BatchPlan, make_loader
from vlm.train.interrupt import STOP, Interrupted, kill_point, resume_command, stop_on_sigterm
from vlm.train.rng import derive_seed, isolated

# LoRA (dropout 0.05, the stage default) in both stages, 2 data workers, periodic evaluation between checkpoints.
ARGS = ["recipe=micro", "stage.pretrain.policy.llm=lora", "stage.sft.policy.llm=lora", "stage.sft.max_steps=6",
        "stage.sft.save_every=2", "stage.sft.eval_every=3", "eval.periodic_limit=4", "trainer.num_workers=2",
        "trainer.threads=1"]


def default_sigint() -> None:
    """In the child: SIGINT's default action (a shell's background job starts with SIGINT ignored, which the child
    would inherit, and then Python installs no KeyboardInterrupt handler)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def train(out: Path, *extra: str, argv: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "vlm.train", *ARGS, f"output_dir={out}", *extra] if argv is None else argv
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, preexec_fn=default_sigint,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})


def rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl rows with a loss or eval (a line cut by SIGKILL is skipped)."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in row or "eval" in row:
            out.append(row)
    return out


def key(row: dict) -> tuple:
    return (row["stage"], row["step"], "loss" if "loss" in row else "eval")


def value(row: dict) -> object:
    if "loss" in row:
        return row["loss"], row["grad_norm"]
    return {k: v for k, v in row["eval"].items() if k != "eval_seconds"}


def assert_same_as(reference: dict, observed: list[dict], run_dir: Path) -> None:
    """Every row any attempt logged equals the uninterrupted run's row exactly; all steps are covered; same final
    weights, bit for bit."""
    ref_rows, ref_weights = reference
    for row in observed:
        assert value(row) == ref_rows[key(row)], (key(row), value(row), ref_rows[key(row)])
    assert {key(r) for r in observed} == set(ref_rows)
    weights = load_file(str(run_dir / "final" / "model.safetensors"))
    assert weights.keys() == ref_weights.keys()
    assert all(torch.equal(weights[k], ref_weights[k]) for k in weights)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    proc = train(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = {key(r): value(r) for r in rows(out)}
    assert len([k for k in found if k[2] == "loss"]) == 2 + 6 and ("sft", 3, "eval") in found
    return found, load_file(str(out / "final" / "model.safetensors"))


# ----------------------------------------------------------------------------------------------- fast unit tests
class Draws(torch.utils.data.Dataset):
    """An item is whatever an augmentation would draw from the global torch / python / numpy RNGs."""

    def __len__(self):
        return 12

    def __getitem__(self, i):
        return [float(torch.rand(())), random.random(), float(np.random.rand()), i]


def items(num_workers, start, stop=6):
    plan = BatchPlan(12, global_batch=4, micro_batch=2, seed=7)
    loader = make_loader(Draws(), lambda batch: batch, plan, start, stop, num_workers)
    return [item for micro in loader for item in micro]


def test_item_randomness_depends_on_sample_and_epoch_only():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    py_before = random.getstate()
    plain = items(0, 0)
    assert torch.equal(torch.get_rng_state(), before) and random.getstate() == py_before  # the model's stream
    assert items(0, 4) == plain[4 * 4:]                       # a resumed loader: the same items from step 4
    assert items(2, 0) == plain and items(2, 1) == plain[4:]  # workers (and their seeds) change nothing
    by_epoch: dict[int, list] = {}
    for item in plain:  # 3 steps per epoch: each sample once per epoch, with new draws in the next epoch
        by_epoch.setdefault(item[3], []).append(item[:3])
    assert all(len(v) == 2 and v[0] != v[1] for v in by_epoch.values())


def test_isolated_stream_is_reproducible_and_leaves_the_caller_untouched():
    torch.manual_seed(1)
    expect = torch.rand(3)
    torch.manual_seed(1)
    with isolated(derive_seed("eval", 0, "sft", 3)):
        a = torch.rand(2), random.random(), np.random.rand()
    with isolated(derive_seed("eval", 0, "sft", 3)):
        b = torch.rand(2), random.random(), np.random.rand()
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
    assert torch.equal(torch.rand(3), expect)
    assert derive_seed("eval", 0, "sft", 3) != derive_seed("eval", 0, "sft", 4)


def test_resume_command_and_message(tmp_path):
    cmd = resume_command(["recipe=micro", "stage.sft.lr=1e-3", f"output_dir={tmp_path}", "trainer.kill_at=sft:2",
                          "trainer.kill_signal=TERM", "data.sft.path=/a b.json"], tmp_path)
    assert shlex.split(cmd) == ["python", "-m", "vlm.train", "recipe=micro", "stage.sft.lr=1e-3",
                                "data.sft.path=/a b.json", f"output_dir={tmp_path}", "resume=auto"]
    (tmp_path / "pretrain").mkdir()
    (tmp_path / "pretrain" / "DONE.json").write_text("{}")
    (tmp_path / "sft" / "checkpoints" / "step_000004").mkdir(parents=True)
    err = Interrupted("TERM", "in stage 'sft' after step 5/6").with_run(tmp_path, ["pretrain", "sft"])
    assert err.exit_code == 143 and "pretrain" in err.message  # step_000004 is incomplete: no trainer_state.json
    (tmp_path / "sft" / "checkpoints" / "step_000004" / "trainer_state.json").write_text("{}")
    err = Interrupted("INT").with_run(tmp_path, ["pretrain", "sft"])
    assert err.exit_code == 130 and err.message.startswith("interrupted by Ctrl-C")
    assert err.message.endswith(str(tmp_path / "sft" / "checkpoints" / "step_000004"))


def test_sigterm_is_a_request_and_a_second_one_stops_at_once():
    previous = signal.getsignal(signal.SIGTERM)
    with stop_on_sigterm():
        signal.raise_signal(signal.SIGTERM)
        assert STOP.requested  # the loop checkpoints at the end of the step, then stops
        with pytest.raises(Interrupted, match="second SIGTERM"):
            signal.raise_signal(signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is previous and not STOP.requested


def test_kill_at_fires_once_per_run_directory(tmp_path):
    # Python's own SIGINT handler (a shell's background job inherits SIGINT ignored, and Python then installs none)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _kill_at_fires_once(tmp_path)
    finally:
        signal.signal(signal.SIGINT, previous)


def _kill_at_fires_once(tmp_path):
    trainer = compose("micro", ["trainer.kill_at=sft:3", "trainer.kill_signal=INT"]).trainer
    kill_point(trainer, "sft", 2, tmp_path)
    kill_point(trainer, "pretrain", 3, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        kill_point(trainer, "sft", 3, tmp_path)
    kill_point(trainer, "sft", 3, tmp_path)  # a resume passing the point again (config still holding kill_at)
    with pytest.raises(KeyboardInterrupt):
        kill_point(trainer, "sft", 3, tmp_path, rank=1)  # each process fires once


@pytest.mark.parametrize("bad", ["trainer.kill_at=sft", "trainer.kill_at=nostage:3", "trainer.kill_at=sft:x",
                                 "trainer.kill_signal=HUP"])
def test_kill_at_is_checked(bad):
    with pytest.raises(ConfigError, match="trainer.kill_"):
        compose("micro", [bad])


# ---------------------------------------------------------------------------------------- killed subprocesses
@pytest.mark.slow
def test_sigkill_at_stage_and_handoff_points_resumes_bit_identically(reference, tmp_path):
    """SIGKILL after pretrain finished (hand-off), at the start of sft (after its setup, before step 1), mid-stage
    between checkpoints (step 3; checkpoint 2 is the latest) and right after a checkpoint (step 4); then finish."""
    out, seen = tmp_path / "run", []
    for i, point in enumerate(["pretrain:end", "sft:0", "sft:3", "sft:4"]):
        proc = train(out, f"trainer.kill_at={point}", *(["resume=auto"] if i else []))
        assert proc.returncode == -signal.SIGKILL, (point, proc.stderr[-3000:])
        seen += rows(out)
    assert (out / "pretrain" / "DONE.json").is_file() and not (out / "sft" / "DONE.json").exists()
    assert [p.name for p in sorted((out / "sft" / "checkpoints").glob("step_*"))] == ["step_000002", "step_000004"]
    proc = train(out, "resume=auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout + proc.stderr
    assert_same_as(reference, seen + rows(out), out)


@pytest.mark.slow
def test_external_sigkill_after_a_checkpoint_resumes_bit_identically(reference, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "vlm.train", *ARGS, f"output_dir={out}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=default_sigint,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    deadline = time.monotonic() + 600
    while not (out / "sft" / "checkpoints" / "step_000002").is_dir() and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(60) == -signal.SIGKILL
    assert not (out / "sft" / "DONE.json").exists()
    seen = rows(out)
    done = train(out, "resume=auto")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_as(reference, seen + rows(out), out)


@pytest.mark.slow
def test_sigterm_checkpoints_then_exits_and_ctrl_c_prints_the_resume_command(reference, tmp_path):
    out = tmp_path / "run"
    term = train(out, "trainer.kill_at=sft:3", "trainer.kill_signal=TERM")
    assert term.returncode == 128 + signal.SIGTERM, term.stderr[-3000:]
    assert "Traceback" not in term.stderr and "interrupted by SIGTERM in stage 'sft' after step 3/6" in term.stderr
    ckpt = out / "sft" / "checkpoints" / "step_000003"
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 3  # written on SIGTERM (save_every=2)
    assert f"last checkpoint: {ckpt}" in term.stderr
    seen = rows(out)

    ctrl_c = train(out, "resume=auto", "trainer.kill_at=sft:5", "trainer.kill_signal=INT")
    assert ctrl_c.returncode == 128 + signal.SIGINT, ctrl_c.stderr[-3000:]
    assert "Traceback" not in ctrl_c.stderr and "KeyboardInterrupt" not in ctrl_c.stderr
    assert "interrupted by Ctrl-C" in ctrl_c.stderr
    assert f"last checkpoint: {out / 'sft' / 'checkpoints' / 'step_000004'}" in ctrl_c.stderr
    seen += rows(out)
    assert re.findall(r"\[sft\] step (\d)/6 loss", ctrl_c.stdout) == ["4", "5"]  # right after the SIGTERM checkpoint
    command = next(line.split("resume with: ", 1)[1] for line in ctrl_c.stderr.splitlines() if "resume with: " in line)
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "vlm.train"] and argv[-2:] == [f"output_dir={out}", "resume=auto"]
    assert not any(a.startswith("trainer.kill") for a in argv)
    done = train(out, argv=[sys.executable] + argv[1:])
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_as(reference, seen + rows(out), out)
