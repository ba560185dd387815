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
