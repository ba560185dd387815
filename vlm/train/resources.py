"""What a stage costs: its peak memory and its typical step time (what sweep tables compare).

Peak memory is the device's: CUDA's peak allocated bytes on a GPU; on a CPU the process's peak resident set size
(``VmHWM``), whose high-water mark Linux resets when ``5`` is written to ``/proc/self/clear_refs``, so each stage (and
each job of an in-process sweep) is measured on its own. Where that reset is not available the CPU figure is the
process's peak since it started (``ru_maxrss``) and says so (``reset=False``).
"""
from __future__ import annotations

import resource
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")


@dataclass
class PeakMemory:
    """``start()`` resets the peak; ``mb()`` reads it (MiB). ``reset``: whether the reset took effect."""

    device: torch.device
    reset: bool = False

    def start(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.reset = True
            return self
        try:
            CLEAR_REFS.write_text("5")
            self.reset = True
        except OSError:
            self.reset = False
        return self

    def mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        if self.reset:
            for line in STATUS.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
        return peak / 2 ** 20 if sys.platform == "darwin" else peak / 1024


def typical_step_seconds(seconds: list[float]) -> float | None:
    """The median step time, the first step (warm-up: allocations, lazy inits) left out when there are others."""
    rest = seconds[1:] if len(seconds) > 1 else seconds
    return statistics.median(rest) if rest else None
