"""Sweep summaries: one row per job of a ``-m`` (multirun) sweep, written as ``summary.md``, ``summary.csv`` and
``summary.json`` in the sweep directory by a Hydra callback when the sweep ends (or by ``summarize_sweep(dir)`` at any
time). An ablation (``-m connector=mlp,xattn``) reads its table there: final losses, accuracy per task, trainable
parameters per stage, image tokens per image, the last stage's median step time and the peak memory of the run.

A job is ``done`` (its ``result.json``), ``failed`` (its ``error.json``, written by ``python -m vlm.train`` when the
job raised; the row holds the error) or ``unfinished`` (neither: running, or killed). Both files are always
written, whatever the jobs' fates."""
from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

SUMMARY_METRICS = ("all", "vqa_color", "vqa_shape", "vqa_count", "vqa_position", "grounding", "grounding/iou",
                   "caption", "referring")


#: cost columns, after the losses and metrics, in this order (``vlm.train.stage.StageResult``'s fields)
IMAGE_TOKENS, MEDIA_TOKENS, STEP_MS, PEAK_MIB = "image tokens", "xattn keys", "step ms", "peak MiB"
COST_COLUMNS = (IMAGE_TOKENS, MEDIA_TOKENS, STEP_MS, PEAK_MIB)

STATUS_DONE, STATUS_FAILED, STATUS_UNFINISHED = "done", "failed", "unfinished"
MD_ERROR_CHARS = 160   # an error is cut to this many characters in summary.md (the csv holds it whole)


def job_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One dict per job directory: ``job`` (its number), the overrides that vary across the sweep, ``status``, final
    loss per stage, evaluation metrics, minutes, ``error`` (failed jobs) and ``dir`` (the job's directory name)."""
    rows, override_keys = [], set()
    jobs = [p for p in Path(sweep_dir).iterdir() if p.is_dir() and _job_num(p.name) is not None]
    for job in sorted(jobs, key=lambda p: _job_num(p.name)):
        overrides = json.loads((job / "overrides.json").read_text()) if (job / "overrides.json").is_file() else []
        row: dict[str, Any] = {"job": _job_num(job.name)}
        for o in overrides:
            key, _, value = o.lstrip("+~").partition("=")
            row[key] = value
            override_keys.add(key)
        if (job / "result.json").is_file():
            result = json.loads((job / "result.json").read_text())
            row["status"] = STATUS_DONE
            for st in result.get("stages", []):
                row[f"{st['name']} loss"] = st.get("final_loss")
            ev = result.get("eval") or {}
            for k in SUMMARY_METRICS:
                if k in ev:
                    row[k] = ev[k]
            row.update(cost_cells(result.get("stages", [])))
            row["minutes"] = result.get("seconds", 0.0) / 60
        elif (job / "error.json").is_file():
            row["status"] = STATUS_FAILED
            row["error"] = json.loads((job / "error.json").read_text()).get("error", "")
        else:
            row["status"] = STATUS_UNFINISHED
        row["dir"] = job.name
        rows.append(row)
    if len(rows) > 1:  # overrides shared by every job are the sweep's setting, not a column of the table
        same = {k for k in override_keys if len({r[k] for r in rows if k in r}) == 1}
        rows = [{k: v for k, v in r.items() if k not in same} for r in rows]
    return rows


def cost_cells(stages: list[dict[str, Any]]) -> dict[str, Any]:
    """``<stage> trainable`` per stage, image tokens per image (+ the keys per image of a fusion connector), the
    last trained stage's median step time (ms) and the largest stage peak memory (MiB); keys without a value (runs
    written before these were recorded, stages skipped on resume) are left out."""
    out: dict[str, Any] = {}
    trained = [st for st in stages if not st.get("skipped")]
    for st in trained:
        if st.get("trainable_params") is not None:
            out[f"{st['name']} trainable"] = st["trainable_params"]
    last = trained[-1] if trained else {}
    for key, column in (("image_tokens", IMAGE_TOKENS), ("media_tokens", MEDIA_TOKENS)):
        if last.get(key) is not None:
            out[column] = last[key]
    if last.get("step_seconds") is not None:
        out[STEP_MS] = 1000 * last["step_seconds"]
    peaks = [st["peak_memory_mb"] for st in trained if st.get("peak_memory_mb") is not None]
    if peaks:
        out[PEAK_MIB] = max(peaks)
    return out


def _job_num(name: str) -> int | None:
    """The job number a Hydra sweep subdirectory is named by or starts with (``3``, ``3-connector=mlp`` -> 3); None
    for other folders."""
    head = name.split("-", 1)[0]
    return int(head) if head.isdigit() else None


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.0f}"
    return "" if v is None else str(v)


def _md_cell(v: Any) -> str:
    text = _fmt(v).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= MD_ERROR_CHARS else text[:MD_ERROR_CHARS - 1] + "…"


def columns(rows: list[dict[str, Any]]) -> list[str]:
    """``job``, the overrides, ``status``, losses, metrics and trainable parameters (first-seen order), the cost
    columns (``COST_COLUMNS`` order), ``minutes``, ``error``, ``dir``."""
    seen = list(dict.fromkeys(k for r in rows for k in r))
    tail = ["minutes", "error", "dir"]
    head = [c for c in seen if c != "job" and seen.index(c) < seen.index("status")] if "status" in seen else []
    middle = [c for c in seen if c not in ("job", "status", *head, *COST_COLUMNS, *tail)]
    return [c for c in ["job", *head, "status", *middle, *COST_COLUMNS, *tail] if c in seen]


def to_markdown(rows: list[dict[str, Any]]) -> str:
    """The table without the ``dir`` column (the job number and the override columns name the job)."""
    if not rows:
        return "(no jobs)\n"
    cols = [c for c in columns(rows) if c != "dir"]
    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    lines += ["| " + " | ".join(_md_cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict[str, Any]]) -> str:
    cols = columns(rows) or ["job", "status"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow({c: r.get(c, "") for c in cols})
    return buf.getvalue()


def summarize_sweep(sweep_dir: str | Path) -> Path:
    """Write ``summary.md``, ``summary.csv``, ``summary.json`` (``{"sweep", "status", "columns", "rows"}``) and
    ``summary.png`` (a grouped bar chart of the metrics and final losses per job, when a job finished) into
    ``sweep_dir``; returns the markdown path."""
    sweep_dir = Path(sweep_dir)
    rows = job_rows(sweep_dir)
    (sweep_dir / "summary.csv").write_text(to_csv(rows))
    (sweep_dir / "summary.json").write_text(json.dumps({"sweep": str(sweep_dir), "status": status_line(rows),
                                                        "columns": columns(rows), "rows": rows}, indent=1))
    md = sweep_dir / "summary.md"
    md.write_text(f"# Sweep {sweep_dir}\n\n{status_line(rows)}. Job N's run directory is `N/` here; "
                  f"errors in full: summary.csv or `<job>/error.json`.\n\n" + to_markdown(rows)
                  + ("\n![metrics per job](summary.png)\n" if _plot(rows, sweep_dir / "summary.png") else ""))
    return md


def _plot(rows: list[dict[str, Any]], out: Path) -> Path | None:
    from vlm.train.plot import plot_summary

    try:
        return plot_summary(rows, columns(rows), out, SUMMARY_METRICS)
    except Exception as e:  # noqa: BLE001 - a chart must never fail a finished sweep
        print(f"[vlm.train] could not write {out}: {e}", file=sys.stderr)
        return None


def status_line(rows: list[dict[str, Any]]) -> str:
    """``4 job(s): 3 done, 1 failed``."""
    counts = {s: sum(r.get("status") == s for r in rows) for s in (STATUS_DONE, STATUS_FAILED, STATUS_UNFINISHED)}
    return f"{len(rows)} job(s): " + ", ".join(f"{n} {s}" for s, n in counts.items() if n or s == STATUS_DONE)


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra is a dependency
    Callback = object  # type: ignore[assignment,misc]


class SweepSummary(Callback):  # type: ignore[misc]
    """Hydra callback (configured in ``recipes/config.yaml``): summarize the sweep when it ends."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        """Write and print the summary; exit with status 1 when a job did not finish."""
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        md = summarize_sweep(sweep_dir)
        print(f"\n{md.read_text()}\nsweep summary: {md} and {md.with_suffix('.csv')}", flush=True)
        rows = job_rows(sweep_dir)
        if any(r["status"] != STATUS_DONE for r in rows):
            print(f"error: sweep {sweep_dir}: {status_line(rows)}", file=sys.stderr, flush=True)
            sys.exit(1)
