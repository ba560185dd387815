"""Sweep summaries: one row per job of a ``-m`` (multirun) sweep, written as ``summary.md`` and ``summary.csv`` in
the sweep directory by a Hydra callback when the sweep ends (or by ``summarize_sweep(dir)`` at any time)."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

SUMMARY_METRICS = ("all", "vqa_color", "vqa_shape", "vqa_count", "vqa_position", "grounding", "grounding/iou",
                   "caption", "referring")


def job_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One dict per finished job: its overrides (those that vary across the sweep), final loss per stage,
    evaluation metrics, time and directory."""
    rows, override_keys = [], set()
    for result_file in sorted(Path(sweep_dir).glob("*/result.json"), key=lambda p: _job_num(p.parent.name)):
        job = result_file.parent
        result = json.loads(result_file.read_text())
        overrides = json.loads((job / "overrides.json").read_text()) if (job / "overrides.json").is_file() else []
        row: dict[str, Any] = {"job": job.name}
        for o in overrides:
            key, _, value = o.lstrip("+~").partition("=")
            row[key] = value
            override_keys.add(key)
        for st in result.get("stages", []):
            row[f"{st['name']} loss"] = st.get("final_loss")
        ev = result.get("eval") or {}
        for k in SUMMARY_METRICS:
            if k in ev:
                row[k] = ev[k]
        row["minutes"] = result.get("seconds", 0.0) / 60
        row["run_dir"] = result.get("run_dir", str(job))
        rows.append(row)
    if len(rows) > 1:  # overrides shared by every job are the sweep's setting, not a column of the table
        same = {k for k in override_keys if len({r.get(k) for r in rows}) == 1}
        rows = [{k: v for k, v in r.items() if k not in same} for r in rows]
    return rows


def _job_num(name: str) -> int:
    head = name.split("-", 1)[0]
    return int(head) if head.isdigit() else 10**9


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "" if v is None else str(v)


def to_markdown(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no finished jobs)\n"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict[str, Any]]) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        w.writerow({c: r.get(c, "") for c in cols})
    return buf.getvalue()


def summarize_sweep(sweep_dir: str | Path) -> Path:
    """Write ``summary.md`` and ``summary.csv`` into ``sweep_dir``; returns the markdown path."""
    sweep_dir = Path(sweep_dir)
    rows = job_rows(sweep_dir)
    (sweep_dir / "summary.csv").write_text(to_csv(rows))
    md = sweep_dir / "summary.md"
    md.write_text(f"# Sweep {sweep_dir}\n\n{len(rows)} finished job(s).\n\n" + to_markdown(rows))
    return md


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra is a dependency
    Callback = object  # type: ignore[assignment,misc]


class SweepSummary(Callback):  # type: ignore[misc]
    """Hydra callback (configured in ``recipes/config.yaml``): summarize the sweep when it ends."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.is_dir():
            md = summarize_sweep(sweep_dir)
            print(f"\n{md.read_text()}\nsweep summary: {md} and {md.with_suffix('.csv')}", flush=True)
