"""Ablation sweeps: one run directory per job and a summary table (markdown + csv) in the sweep directory."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from vlm.train.sweep import job_rows, summarize_sweep


def fake_job(root, name, overrides, loss, acc):
    d = root / name
    d.mkdir()
    (d / "overrides.json").write_text(json.dumps(overrides))
    (d / "result.json").write_text(json.dumps({
        "run_dir": str(d), "seconds": 90.0, "eval": {"all": acc, "vqa_color": acc, "vqa_color/n": 10},
        "stages": [{"name": "pretrain", "final_loss": loss + 1}, {"name": "sft", "final_loss": loss}]}))


def fake_failure(root, name, overrides, error):
    d = root / name
    d.mkdir()
    (d / "overrides.json").write_text(json.dumps(overrides))
    (d / "error.json").write_text(json.dumps({"error": error, "traceback": "Traceback ..."}))


def test_summary_table_from_job_dirs(tmp_path):
    fake_job(tmp_path, "0-connector=mlp,seed=0", ["connector=mlp", "seed=0", "recipe=tiny"], 0.5, 0.9)
    fake_job(tmp_path, "1-connector=linear,seed=1", ["connector=linear", "seed=1", "recipe=tiny"], 0.7, 0.6)
    (tmp_path / "2-connector=mlp,seed=1").mkdir()  # a job that did not finish (killed, or still running)
    (tmp_path / "notes").mkdir()                    # not a job directory: ignored
    md = summarize_sweep(tmp_path)
    text = md.read_text()
    assert "3 job(s): 2 done, 1 unfinished" in text
    assert "| job | connector | seed | status | pretrain loss | sft loss | all | vqa_color | minutes |" in text
    assert "| 0 | mlp | 0 | done | 1.5000 | 0.5000 | 0.9000" in text and "| 1 | linear | 1 | done | 1.7000 | 0.7000" in text
    assert "| 2 |  |  | unfinished |" in text
    assert "recipe" not in text and "run_dir" not in text  # the same in every job: not a column; no long paths
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert [r["connector"] for r in rows] == ["mlp", "linear", ""]
    assert [r["dir"] for r in rows] == ["0-connector=mlp,seed=0", "1-connector=linear,seed=1", "2-connector=mlp,seed=1"]
    assert float(rows[1]["sft loss"]) == pytest.approx(0.7) and float(rows[0]["minutes"]) == pytest.approx(1.5)
    assert "vqa_color/n" not in rows[0]


def test_failed_job_is_a_row_with_its_error(tmp_path):
    fake_failure(tmp_path, "0-lr=1e9", ["lr=1e9"], "NonFiniteLossError: stage 'sft': loss is nan at step 2 | x")
    fake_job(tmp_path, "1-lr=1e-3", ["lr=1e-3"], 0.5, 0.9)
    fake_failure(tmp_path, "2-lr=5", ["lr=5"], "RuntimeError: " + "long " * 60)
    text = summarize_sweep(tmp_path).read_text()
    assert "3 job(s): 1 done, 2 failed" in text
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| job"))
    assert header == "| job | lr | status | pretrain loss | sft loss | all | vqa_color | minutes | error |"
    row0 = next(line for line in lines if line.startswith("| 0 |"))
    assert "| 1e9 | failed |" in row0 and "loss is nan at step 2 \\| x |" in row0
    row2 = next(line for line in lines if line.startswith("| 2 |"))
    assert row2.endswith("… |") and len(row2) < 260  # cut in the markdown ...
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["failed", "done", "failed"]
    assert rows[2]["error"] == "RuntimeError: " + "long " * 60  # ... whole in the csv
    assert rows[0]["sft loss"] == "" and float(rows[1]["sft loss"]) == pytest.approx(0.5)


def test_empty_sweep_still_writes_both_files(tmp_path):
    md = summarize_sweep(tmp_path)
    assert "0 job(s)" in md.read_text() and (tmp_path / "summary.csv").read_text().startswith("job,status")


@pytest.mark.slow
def test_multirun_sweep_writes_summary_with_a_failed_job(tmp_path):
    """Job 1 (qlora on a CPU) fails when it starts; job 0 still runs, the summary lists both, the exit is 1."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "vlm.train", "-m", "recipe=micro", "stage.sft.policy.llm=full,qlora", "stages=[sft]",
           "stage.sft.max_steps=2", "eval.limit=4", f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    env.pop("HYDRA_FULL_ERROR", None)  # (with it, the first failure stops the sweep)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0", "1"]  # short: the overrides are columns of the summary
    assert (sweep / jobs[0] / "config.yaml").is_file() and (sweep / jobs[0] / "final" / "model.safetensors").is_file()
    assert not (sweep / jobs[1] / "config.yaml").exists()  # failed before its run directory was written
    rows = job_rows(sweep)
    assert [(r["stage.sft.policy.llm"], r["status"], r["dir"]) for r in rows] == [("full", "done", "0"),
                                                                                  ("qlora", "failed", "1")]
    assert rows[0]["sft loss"] > 0 and "all" in rows[0] and "recipe" not in rows[0]  # constant overrides dropped
    assert "ConfigError" in rows[1]["error"] and "CUDA" in rows[1]["error"]
    assert (sweep / "summary.md").is_file() and (sweep / "summary.csv").is_file()
    assert "2 job(s): 1 done, 1 failed" in (sweep / "summary.md").read_text()
    assert "sweep summary" in proc.stdout and "1 failed" in proc.stderr.splitlines()[-1]
