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


def test_summary_table_from_job_dirs(tmp_path):
    fake_job(tmp_path, "0-connector=mlp,seed=0", ["connector=mlp", "seed=0", "recipe=tiny"], 0.5, 0.9)
    fake_job(tmp_path, "1-connector=linear,seed=1", ["connector=linear", "seed=1", "recipe=tiny"], 0.7, 0.6)
    (tmp_path / "2-connector=mlp,seed=1").mkdir()  # a job that did not finish: not in the table
    md = summarize_sweep(tmp_path)
    text = md.read_text()
    assert "| job | connector | seed | pretrain loss | sft loss | all | vqa_color | minutes | run_dir |" in text
    assert "| mlp | 0 | 1.5000 | 0.5000 | 0.9000" in text and "| linear | 1 | 1.7000 | 0.7000 | 0.6000" in text
    assert "recipe" not in text  # the same in every job: not a column
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert [r["connector"] for r in rows] == ["mlp", "linear"]
    assert float(rows[1]["sft loss"]) == pytest.approx(0.7) and float(rows[0]["minutes"]) == pytest.approx(1.5)
    assert "vqa_color/n" not in rows[0]


@pytest.mark.slow
def test_multirun_sweep_writes_summary(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "vlm.train", "-m", "recipe=micro", "connector=mlp,linear", "stages=[sft]",
           "stage.sft.max_steps=2", "eval.limit=4", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 2 and jobs[0].startswith("0-connector=mlp") and jobs[1].startswith("1-connector=linear")
    for j in jobs:
        assert (sweep / j / "config.yaml").is_file() and (sweep / j / "final" / "model.safetensors").is_file()
    rows = job_rows(sweep)
    assert [r["connector"] for r in rows] == ["mlp", "linear"]
    assert all(r["sft loss"] > 0 and "all" in r and "recipe" not in r for r in rows)  # constant overrides dropped
    assert (sweep / "summary.md").is_file() and (sweep / "summary.csv").is_file()
    assert "sweep summary" in proc.stdout
