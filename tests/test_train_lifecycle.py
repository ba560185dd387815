"""Run lifecycle: which run and which config a resume takes, the state a run directory records, metrics without the
abandoned steps of interrupted attempts, and skipped samples counted, reported and bounded."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import open_dict
from PIL import Image

from vlm.data import BadSamples, SampleDataset, TooManyBadSamples
import vlm
from vlm.train import ConfigError, compose, run
from vlm.train.loggers import read_metrics
from vlm.train.loop import StageLoop
from vlm.train.plot import curves, plot_metrics
from vlm.train.run import find_resumable

FAST = ["stages=[sft]", "eval.enabled=false", "trainer.progress=false"]


def crash_at(monkeypatch, call: int):
    """Make ``StageLoop.step`` raise ``KeyboardInterrupt`` on its ``call``-th call."""
    real, calls = StageLoop.step, {"n": 0}

    def step(self, step, micro):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt("simulated interrupt")
        return real(self, step, micro)

    monkeypatch.setattr(StageLoop, "step", step)


def run_info(run_dir):
    return json.loads((run_dir / "run.json").read_text())


# ---------------------------------------------------------------------------------------------- which run resumes
def fake_run(root, name, *, checkpoint=False, done=False, finished=False):
    d = root / name
    d.mkdir(parents=True)
    (d / "config.yaml").write_text("name: micro\n")
    (d / "run.json").write_text("{}")
    if checkpoint:
        (d / "sft" / "checkpoints" / "step_000002").mkdir(parents=True)
    if done:
        (d / "pretrain").mkdir()
        (d / "pretrain" / "DONE.json").write_text("{}")
    if finished:
        (d / "result.json").write_text("{}")
    return d


def test_find_resumable_needs_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "runs" / "micro"
    with_ckpt = fake_run(root, "20260101-000000", checkpoint=True)
    fake_run(root, "20260102-000000", checkpoint=True, finished=True)   # finished: nothing to resume
    failed_early = fake_run(root, "20260103-000000")                    # failed before its first checkpoint
    os.utime(failed_early, (2e9, 2e9))                                   # and it is the newest
    assert find_resumable("micro").resolve() == with_ckpt.resolve()
    stage_done = fake_run(root, "20260104-000000", done=True)            # a finished stage is something to carry
    os.utime(stage_done, (2.1e9, 2.1e9))
    assert find_resumable("micro").resolve() == stage_done.resolve()
    assert find_resumable("other") is None


def test_failed_before_training_is_recorded_and_not_resumed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # config mistakes are refused before a run directory exists (tests/test_train_errors.py); what fails after it is
    # made, before training, is a component failing while it is built (e.g. weights that do not fit): simulated here
    import vlm

    def broken_build(*args, **kwargs):
        raise TypeError("connector 'mlp': cannot load weights: no_such_option")

    monkeypatch.setattr(vlm, "build", broken_build)
    with pytest.raises(TypeError, match="no_such_option"):
        run(recipe="micro", overrides=FAST)
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    (failed,) = (tmp_path / "runs" / "micro").iterdir()
    info = run_info(failed)
    assert info["state"] == "failed" and "no_such_option" in info["error"]
    assert info["attempts"][-1]["state"] == "failed" and (failed / "config.yaml").is_file()
    assert find_resumable("micro") is None
    # resume=auto therefore starts a new run rather than "resuming" the failed one
    res = run(recipe="micro", overrides=FAST + ["stage.sft.max_steps=1", "resume=auto"])
    assert res.run_dir.resolve() != failed.resolve() and run_info(res.run_dir)["state"] == "finished"
    assert res.stages[0].resumed_from is None
    # naming it explicitly is refused with its state; resume=auto with it as output_dir starts it afresh
    with pytest.raises(ConfigError, match=r"no checkpoint to continue from \(state failed: TypeError: .*no_such"):
        run(recipe="micro", overrides=FAST + [f"resume={failed}"])
    again = run(recipe="micro", overrides=FAST + ["stage.sft.max_steps=1", "resume=auto", f"output_dir={failed}"])
    info = run_info(failed)
    assert again.run_dir == failed and again.stages[0].resumed_from is None
    assert [a["state"] for a in info["attempts"]] == ["failed", "finished"] and info["attempts"][1]["restarted"]
    assert "error" not in info and [r["attempt"] for r in read_metrics(failed / "metrics.jsonl")] == [1, 1]


# ---------------------------------------------------------------------------------------- which config, and state
@pytest.mark.slow
def test_resume_takes_the_saved_config_plus_overrides(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    first = FAST + ["stage.sft.max_steps=6", "stage.sft.save_every=2", f"output_dir={out}"]
    crash_at(monkeypatch, 4)  # steps 1-3 logged, checkpoint at step 2
    with pytest.raises(KeyboardInterrupt):
        run(recipe="micro", overrides=first)
    monkeypatch.undo()
    info = run_info(out)
    # the interrupt is recorded with where to resume from (vlm.train.interrupt turns a Ctrl-C into that message)
    assert info["state"] == "interrupted" and "interrupted by Ctrl-C; last checkpoint:" in info["error"]
    assert info["error"].endswith("step_000002")
    assert info["overrides"] == ["recipe=micro"] + first

    # what a bare `python -m vlm.train recipe=micro resume=auto output_dir=...` passes, plus one setting on top
    capsys.readouterr()
    res = run(recipe="micro", overrides=["resume=auto", f"output_dir={out}", "trainer.log_every=3"])
    printed = capsys.readouterr().out
    assert res.stages[0].steps == 6 and res.stages[0].resumed_from.endswith("step_000002")  # the saved max_steps
    assert "overrides ['trainer.log_every=3']" in printed and "trainer.log_every: 1 -> 3" in printed
    info = run_info(out)
    assert info["state"] == "finished" and [a["state"] for a in info["attempts"]] == ["interrupted", "finished"]
    assert info["attempts"][1]["overrides"] == ["trainer.log_every=3"]
    assert info["attempts"][1]["changes"] == ["trainer.log_every: 1 -> 3"]
    assert info["overrides"][-1] == "trainer.log_every=3"
    saved = compose(None, info["overrides"])  # the recorded overrides reproduce the config the run ended with
    assert saved.stage.sft.max_steps == 6 and saved.trainer.log_every == 3

    # metrics: one row per step in what readers see, each from the attempt that counts; the plot is continuous
    raw = read_metrics(out / "metrics.jsonl", all_attempts=True)
    assert [r["step"] for r in raw if "loss" in r] == [1, 2, 3, 3, 4, 5, 6]
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [(r["step"], r["attempt"]) for r in rows] == [(1, 0), (2, 0), (3, 1), (4, 1), (5, 1), (6, 1)]
    assert [round(r["loss"], 6) for r in rows[2:]] == [round(x, 6) for x in res.losses["sft"][2:]]
    (curve,) = curves(read_metrics(out / "metrics.jsonl")).values()
    assert curve.x == [1, 2, 3, 4, 5, 6]

    # a change of the model or of the data order is refused, naming the keys
    again = ["resume=auto", f"output_dir={out}"]
    with pytest.raises(ConfigError, match=r"different model.*intermediate_size: 64 -> 48"):
        run(recipe="micro", overrides=again + ["llm.config.intermediate_size=48"])
    with pytest.raises(ConfigError, match=r"data order.*seed: 0 -> 1"):
        run(recipe="micro", overrides=again + ["seed=1"])
    with pytest.raises(ConfigError, match=r"data order.*stage.sft.global_batch_size: 4 -> 8"):
        run(recipe="micro", overrides=again + ["stage.sft.global_batch_size=8"])


@pytest.mark.slow
def test_cli_bare_resume_continues_the_interrupted_run_with_its_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    crash_at(monkeypatch, 3)  # interrupted in step 3 of 5; checkpoint at step 2
    with pytest.raises(KeyboardInterrupt):
        run(recipe="micro", overrides=FAST + ["stage.sft.max_steps=5", "stage.sft.save_every=2"])
    monkeypatch.undo()
    (cut,) = (tmp_path / "runs" / "micro").iterdir()
    root = str(Path(vlm.__file__).resolve().parents[1])  # this checkout, whatever the installed one is
    proc = subprocess.run([sys.executable, "-m", "vlm.train", "recipe=micro", "resume=auto"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": root, "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming with its saved config; changes against the saved config: none" in proc.stdout
    assert "at step 2/5" in proc.stdout and "step 5/5" in proc.stdout  # not the recipe's default max_steps=4
    info = run_info(cut)
    assert info["state"] == "finished" and [a["state"] for a in info["attempts"]] == ["interrupted", "finished"]


def test_metrics_readers_drop_abandoned_steps(tmp_path):
    rows = [{"stage": "a", "step": s, "loss": 1.0, "attempt": 0} for s in (1, 2)] \
        + [{"stage": "b", "step": s, "loss": 2.0, "attempt": 0} for s in (1, 2, 3, 4, 5)] \
        + [{"stage": "b", "step": 2, "resumed": True, "attempt": 1}] \
        + [{"stage": "b", "step": 3, "loss": 3.0, "attempt": 1}] \
        + [{"stage": "b", "step": 2, "resumed": True, "attempt": 2}] \
        + [{"stage": "b", "step": s, "loss": 4.0, "attempt": 2} for s in (3, 4)] \
        + [{"stage": "b", "step": 4, "eval": {"all": 0.5}, "attempt": 2}]
    path = tmp_path / "metrics.jsonl"
    restarted = [{"stage": "a", "step": 1, "loss": 9.0, "attempt": 0}, {"restarted": True, "attempt": 1}]
    path.write_text("".join(json.dumps(r) + "\n" for r in restarted + rows[:2]))
    assert read_metrics(path) == rows[:2]  # a start afresh in the same directory drops everything before it
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = read_metrics(path)
    assert [(r["stage"], r["step"], r.get("loss"), r["attempt"]) for r in seen if "loss" in r] == [
        ("a", 1, 1.0, 0), ("a", 2, 1.0, 0), ("b", 1, 2.0, 0), ("b", 2, 2.0, 0), ("b", 3, 4.0, 2), ("b", 4, 4.0, 2)]
    assert not any(r.get("resumed") for r in seen) and len(read_metrics(path, all_attempts=True)) == len(rows)
    c = curves(seen)
    assert c["a"].x == [1, 2] and c["b"].x == [3, 4, 5, 6] and c["b"].offset == 2
    assert plot_metrics(path, tmp_path / "plot.png") == tmp_path / "plot.png"


# ------------------------------------------------------------------------------------------------ skipped samples
def llava_data(tmp_path, n=200, missing=()):
    """``n`` LLaVA-JSON samples with tiny PNGs; the images of ``missing`` indices are not written."""
    images = tmp_path / "images"
    images.mkdir()
    records = []
    for i in range(n):
        if i not in missing:
            Image.new("RGB", (32, 32), (i % 256, 40, 200)).save(images / f"{i}.png")
        records.append({"id": f"s{i}", "image": f"{i}.png",
                        "conversations": [{"from": "human", "value": "<image>\nWhat color is it?"},
                                          {"from": "gpt", "value": "blue"}]})
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records))
    return path, images


def llava_cfg(tmp_path, path, images, out="run", **spec):
    # one epoch of 200 samples in 4 steps: every index is asked for once
    cfg = compose("micro", FAST + ["stage.sft.max_steps=null", "stage.sft.epochs=1",
                                   "stage.sft.global_batch_size=50", "stage.sft.micro_batch_size=50",
                                   "stage.sft.max_length=64", f"output_dir={tmp_path / out}"])
    with open_dict(cfg):
        cfg.data.sft = {"name": "llava_json", "path": str(path), "image_root": str(images), **spec}
    return cfg


def test_skipped_samples_counted_once_and_reported(tmp_path, monkeypatch, capsys):
    path, images = llava_data(tmp_path, missing=(7, 8, 120))  # two adjacent: 7 is skipped again asking for 8
    cfg = llava_cfg(tmp_path, path, images)
    cfg.stage.sft.save_every = 2
    crash_at(monkeypatch, 4)  # interrupted in the last step: the counts of steps 1-2 come back from the checkpoint
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    monkeypatch.undo()
    state = json.loads((tmp_path / "run" / "sft" / "checkpoints" / "step_000002" / "trainer_state.json").read_text())
    assert len(state["skipped_samples"]["samples"]) >= 1  # so the final count needs the checkpoint's
    cfg.resume = "auto"
    capsys.readouterr()
    res = run(cfg)
    want = {"total": 3, "by_reason": {"missing_image": 3}, "num_samples": 200}
    got = res.stages[0].skipped_samples
    assert {k: got[k] for k in want} == want and len(got["examples"]) == 3
    assert all("image file not found" in e for e in got["examples"])
    assert {e.split("sample #")[1].split(" ")[0] for e in got["examples"]} == {"7", "8", "120"}
    printed = capsys.readouterr().out
    assert "[sft] data.sft (200 samples): skipped 3 bad sample(s) (missing_image: 3)" in printed
    assert "120.png" in printed
    result = json.loads((res.run_dir / "result.json").read_text())
    assert result["stages"][0]["skipped_samples"]["total"] == 3
    (row,) = [r for r in read_metrics(res.run_dir / "metrics.jsonl") if "skipped_samples" in r]
    assert row["stage"] == "sft" and row["skipped_samples"]["by_reason"] == {"missing_image": 3}


def test_too_many_bad_samples_stop_the_run(tmp_path):
    path, images = llava_data(tmp_path, missing=range(0, 200, 5))  # 40 of 200 = 20% > the default 5%
    cfg = llava_cfg(tmp_path, path, images)
    with pytest.raises(TooManyBadSamples, match=r"of its 200 samples are bad .*more than "
                                                r"data\.sft\.max_bad_fraction=0\.05 allows \(10\).*missing_image"):
        run(cfg)
    info = run_info(tmp_path / "run")
    assert info["state"] == "failed" and "TooManyBadSamples" in info["error"]
    res = run(llava_cfg(tmp_path, path, images, out="ok", max_bad_fraction=0.25))
    assert res.stages[0].skipped_samples["total"] == 40


def test_all_samples_bad_message(tmp_path):
    path, images = llava_data(tmp_path, n=20, missing=range(20))
    ds = SampleDataset(path, image_folder=images, skip_bad=True)
    with pytest.raises(TooManyBadSamples) as ei:
        ds[0]
    msg = str(ei.value)
    assert f"{path}: all 20 samples are bad; skipped 20 bad sample(s) (missing_image: 20)" in msg
    assert "21" not in msg and ds.bad.total == 20
    limited = SampleDataset(path, image_folder=images, skip_bad=True, max_skip=5)
    with pytest.raises(TooManyBadSamples, match=r"the 5 samples from index 3 on are all bad \(max_skip=5\)"):
        limited[3]


def test_bad_samples_merge_counts_each_sample_once():
    a, b = BadSamples(), BadSamples()
    a.update([{"index": 1, "reason": "missing_image", "message": "m1"}] * 3)
    b.update([{"index": 1, "reason": "missing_image", "message": "m1"}, {"index": 2, "reason": "format",
                                                                        "message": "m2"}])
    a.merge(json.loads(json.dumps(b.state())))  # e.g. another process, or a checkpoint
    assert a.total == 2 and dict(a.counts) == {"missing_image": 1, "format": 1} and a.examples == ["m1", "m2"]
    a.check(40, 0.05, "x")  # 2 of 40 is allowed
    with pytest.raises(TooManyBadSamples, match="x: 2 of its 20 samples are bad"):
        a.check(20, 0.05, "x")
