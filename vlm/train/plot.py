"""The end-of-run plot: training loss per stage (raw and smoothed), learning rate, and evaluation metrics."""
from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from vlm.train.loggers import read_metrics


def smooth(values: list[float], alpha: float = 0.1) -> list[float]:
    out, ema = [], None
    for v in values:
        ema = v if ema is None else (1 - alpha) * ema + alpha * v
        out.append(ema)
    return out


class Curve(NamedTuple):
    offset: int          # steps of the stages before this one
    x: list[int]         # step over all stages
    loss: list[float]
    lr: list[float]      # largest learning rate of the param groups


def curves(rows: list[dict[str, Any]]) -> dict[str, Curve]:
    """``{stage: Curve}`` from training-step rows, in stage order, sorted by step."""
    steps = [r for r in rows if "loss" in r]
    out, offset = {}, 0
    for st in dict.fromkeys(r["stage"] for r in steps):
        rs = sorted((r for r in steps if r["stage"] == st), key=lambda r: r["step"])
        x = [offset + r["step"] for r in rs]
        lr = [max(r["lr"].values()) if isinstance(r.get("lr"), dict) and r["lr"] else 0.0 for r in rs]
        out[st] = Curve(offset, x, [float(r["loss"]) for r in rs], lr)
        offset = max(x)
    return out


def plot_metrics(metrics_file: Path, out: Path) -> Path | None:
    """Write ``out`` (PNG, matplotlib Agg) from ``metrics.jsonl``; ``None`` when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_file)  # one row per step: abandoned steps of interrupted attempts left out
    evals = [r for r in rows if "eval" in r]
    lines = curves(rows)
    if not lines:
        return None
    fig, axes = plt.subplots(1, 3 if evals else 2, figsize=(15 if evals else 10, 4))
    offsets = {st: c.offset for st, c in lines.items()}
    for st, c in lines.items():
        (line,) = axes[0].plot(c.x, smooth(c.loss), label=st)
        axes[0].plot(c.x, c.loss, alpha=0.25, color=line.get_color())
        axes[1].plot(c.x, c.lr, label=st, color=line.get_color())
    axes[0].set(title="training loss", xlabel="step (all stages)", ylabel="loss", yscale="log")
    axes[0].legend()
    axes[1].set(title="learning rate (largest group)", xlabel="step (all stages)")
    axes[1].legend()
    if evals:
        keys = sorted({k for r in evals for k, v in r["eval"].items()
                       if isinstance(v, (int, float)) and "/" not in k and k != "eval_seconds"})
        for k in keys:
            pts = [(offsets.get(r["stage"], 0) + r["step"], r["eval"][k]) for r in evals if k in r["eval"]]
            axes[2].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=k)
        axes[2].set(title="evaluation", xlabel="step (all stages)", ylim=(0, 1.05))
        axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def job_label(row: dict[str, Any], override_keys: list[str]) -> str:
    """A job's name on the chart: its varying overrides (``connector=mlp``), else ``job N``."""
    parts = [f"{k}={row[k]}" for k in override_keys if k in row]
    return ", ".join(parts) if parts else f"job {row.get('job')}"


def plot_summary(rows: list[dict[str, Any]], columns: list[str], out: Path,
                 metrics: tuple[str, ...] = ()) -> Path | None:
    """Write ``out`` (PNG): a grouped bar chart of a sweep's table, one group per metric and one bar per job; the
    evaluation metrics (scores in [0, 1], ``metrics``, in that order) on the left, the final loss of each stage on
    the right. Jobs that did not finish are left out. ``None`` when no finished job has a value to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r.get("status") == "done"]
    overrides = columns[1:columns.index("status")] if "status" in columns else []
    scores = [m for m in metrics if any(isinstance(r.get(m), (int, float)) for r in done)]
    losses = [c for c in columns if c.endswith(" loss") and any(isinstance(r.get(c), (int, float)) for r in done)]
    panels = [(title, keys) for title, keys in (("evaluation", scores), ("final training loss", losses)) if keys]
    if not done or not panels:
        return None
    widths = [max(3.0, 0.45 * len(keys) * max(2, len(done)) + 1.0) for _, keys in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(sum(widths), 4.2), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    bar = 0.8 / len(done)
    for ax, (title, keys) in zip(axes[0], panels):
        for j, r in enumerate(done):
            xs = [i + (j - (len(done) - 1) / 2) * bar for i in range(len(keys))]
            ys = [float(r[k]) if isinstance(r.get(k), (int, float)) else 0.0 for k in keys]
            ax.bar(xs, ys, width=bar, label=job_label(r, overrides))
        ax.set_xticks(range(len(keys)), [k.removesuffix(" loss") for k in keys], rotation=30, ha="right")
        ax.set_title(title)
        if title == "evaluation":
            ax.set_ylim(0, 1.05)
    handles, labels = axes[0][0].get_legend_handles_labels()
    rows_of_legend = -(-len(done) // 4)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(done), 4), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 * rows_of_legend + 0.02, 1, 1))
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
