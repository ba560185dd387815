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


def fake_costs(root, name, connector, image_tokens, media_tokens=None):
    d = root / name
    d.mkdir()
    (d / "overrides.json").write_text(json.dumps([f"connector={connector}"]))
    stage = lambda n, trainable, ms, mib: {"name": n, "final_loss": 1.0, "trainable_params": trainable,
                                           "image_tokens": image_tokens, "media_tokens": media_tokens,
                                           "step_seconds": ms / 1000, "peak_memory_mb": mib}
    (d / "result.json").write_text(json.dumps({"seconds": 60.0, "eval": {"all": 0.5, "grounding": 0.25},
                                               "stages": [stage("pretrain", 1000, 20.0, 300.0),
                                                          stage("sft", 5000, 30.0, 250.0)]}))


def test_ablation_columns_and_json(tmp_path):
    fake_costs(tmp_path, "0", "mlp", 16)
    fake_costs(tmp_path, "1", "xattn", 1, media_tokens=16)
    md = summarize_sweep(tmp_path).read_text()
    header = next(line for line in md.splitlines() if line.startswith("| job"))
    assert header == ("| job | connector | status | pretrain loss | sft loss | all | grounding | pretrain trainable | "
                      "sft trainable | image tokens | xattn keys | step ms | peak MiB | minutes |")
    assert "| 0 | mlp | done | 1.0000 | 1.0000 | 0.5000 | 0.2500 | 1000 | 5000 | 16 |  | 30.0000 | 300 | 1.0000 |" in md
    table = json.loads((tmp_path / "summary.json").read_text())
    assert table["columns"][:3] == ["job", "connector", "status"] and table["status"] == "2 job(s): 2 done"
    assert [(r["connector"], r["image tokens"], r.get("xattn keys")) for r in table["rows"]] == [("mlp", 16, None),
                                                                                              ("xattn", 1, 16)]
    assert table["rows"][1]["step ms"] == pytest.approx(30.0) and table["rows"][1]["peak MiB"] == 300.0


@pytest.mark.slow
def test_connector_ablation_table_is_seeded(tmp_path):
    """Two connectors, a few steps, run twice: one table each, identical except for times and memory; the trainable
    count is that of the model the stage builds (micro's sft trains every part but the tower's unused post-norm)."""
    from vlm.train import compose
    from vlm.train.build import build_model, build_tokenizer
    from vlm.train.policy import apply_policies

    tables = []
    for attempt in ("a", "b"):
        sweep = tmp_path / attempt
        cmd = [sys.executable, "-m", "vlm.train", "-m", "recipe=micro", "connector=mlp,xattn", "stages=[sft]",
               "stage.sft.max_steps=2", "eval.limit=8",
               f"hydra.sweep.dir={sweep}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        tables.append(json.loads((sweep / "summary.json").read_text()))
    rows = tables[0]["rows"]
    assert [r["connector"] for r in rows] == ["mlp", "xattn"] and [r["image tokens"] for r in rows] == [16, 1]
    assert "xattn keys" not in rows[0] and rows[1]["xattn keys"] == 16
    for r in rows:
        cfg = compose("micro", [f"connector={r['connector']}", "stages=[sft]"])
        model = build_model(cfg, build_tokenizer(cfg, ["chatml"]))
        apply_policies(model, cfg.stage.sft)
        assert r["sft trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert r["step ms"] > 0 and r["peak MiB"] > 0 and "all" in r
    measured = ("step ms", "peak MiB", "minutes")
    same = lambda t: [{k: v for k, v in r.items() if k not in measured} for r in t["rows"]]
    assert same(tables[0]) == same(tables[1])
