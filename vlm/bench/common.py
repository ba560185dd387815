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
