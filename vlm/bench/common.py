"""What every bench shares: the machine description, interleaved timing, peak-memory measurement, tables, JSON."""
from __future__ import annotations

import ctypes
import json
import os
import platform
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine(device: torch.device) -> dict[str, Any]:
    """Where the numbers come from: CPU, threads, device, library versions."""
    import transformers

    info: dict[str, Any] = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "device": str(device), "torch": torch.__version__, "transformers": transformers.__version__,
                            "python": platform.python_version(), "platform": platform.platform()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1,
                device: torch.device = torch.device("cpu")) -> dict[str, list[float]]:
    """Run every function ``warmup`` times, then ``repeats`` rounds of each in turn (``a b a b ...``, the order
    flipped every round so neither always runs first); returns each one's wall times in seconds."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            sync(device)
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    raise KeyError(key)


def cpu_peak_supported() -> bool:
    """Whether the kernel lets this process reset its RSS high-water mark (Linux ``/proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        _status_kib("VmHWM:")
        return True
    except (OSError, KeyError):
        return False


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """Measure the peak memory growth of the enclosed code in MiB into the yielded dict's ``peak_mib``.

    CUDA: ``max_memory_allocated`` over ``memory_allocated`` at entry. CPU: the process's resident set: freed heap
    pages are returned to the OS first (glibc ``malloc_trim(0)``), the kernel's high-water mark is reset
    (``/proc/self/clear_refs`` = 5), and the result is ``VmHWM`` at exit minus ``VmRSS`` at entry: the most
    physical memory the code held on top of what was live before (parameters, optimizer state, batches).
    """
    out: dict[str, float] = {}
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield out
        sync(device)
        out["peak_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_kib("VmRSS:")
    yield out
    out["peak_mib"] = (_status_kib("VmHWM:") - base) / 1024


def table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """A plain-text table of ``rows`` (dicts), floats with 4 significant digits."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def write_json(path: str | os.PathLike, result: dict[str, Any]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    return out


PLOT_COLUMNS = 4  # numeric columns drawn, at most (the first ones of the table)


def plot_table(result: dict[str, Any], out: str | os.PathLike) -> Path | None:
    """Write ``out`` (PNG): a bench's table as horizontal bars, one panel per numeric column (the first
    ``PLOT_COLUMNS``), one bar per row, rows named by their text columns. ``None`` when the table has no numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.get("rows") or []
    columns = result.get("columns") or (list(rows[0]) if rows else [])
    numeric = [c for c in columns if any(isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool)
                                         for r in rows)]
    text = [c for c in columns if c not in numeric]
    if not rows or not numeric:
        return None
    names = [" / ".join(str(r.get(c, "")) for c in text) or f"row {i}" for i, r in enumerate(rows)]
    numeric = numeric[:PLOT_COLUMNS]
    fig, axes = plt.subplots(1, len(numeric), figsize=(3.2 * len(numeric) + 1.5, 0.35 * len(rows) + 1.4),
                             squeeze=False, sharey=True)
    for ax, col in zip(axes[0], numeric):
        vals = [float(r[col]) if isinstance(r.get(col), (int, float)) else 0.0 for r in rows]
        ax.barh(range(len(rows)), vals, color="#3f51b5")
        ax.set_title(col, fontsize=9)
        ax.tick_params(labelsize=8)
    axes[0][0].set_yticks(range(len(rows)), names)
    axes[0][0].invert_yaxis()
    fig.suptitle(f"vlm.bench {result.get('bench', '')}", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
