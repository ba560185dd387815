"""Stopping a run: SIGTERM checkpoints first, Ctrl-C stops at once; both say how to resume.

- SIGTERM (a scheduler's preemption, ``kill``): :func:`stop_on_sigterm` turns it into a request the loop checks after
  every optimizer step (agreed on by all processes); the loop writes a checkpoint of the step it just finished, then
  raises :class:`Interrupted`. A second SIGTERM stops at once.
- Ctrl-C (SIGINT): Python's ``KeyboardInterrupt`` stops at once; the run turns it into :class:`Interrupted`.
- ``python -m vlm.train`` prints :attr:`Interrupted.message` plus the command that resumes the run, without a
  traceback, and exits with ``128 + signal number`` (130 for Ctrl-C, 143 for SIGTERM).

``trainer.kill_at: <stage>:<step>`` (or ``<stage>:end``) with ``trainer.kill_signal: KILL | TERM | INT`` makes the
run send itself that signal right after step ``<step>`` of ``<stage>`` (after its metrics row and any checkpoint;
step 0: after the stage's setup, before its first step; ``end``: after the stage finished, ``DONE.json`` written).
It is meant for testing preemption handling (yours or ours) deterministically; it fires once per run directory
(a marker file records it), so a resumed run passes the point even when its config still holds ``kill_at``.
"""
from __future__ import annotations

import shlex
import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vlm.train.checkpoint import last_checkpoint
from vlm.train.schema import KILL_SIGNALS, TrainerConfig  # noqa: F401 (KILL_SIGNALS: re-exported)


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal. ``message`` names the signal, where the run stopped and its last checkpoint;
    ``run_dir`` is the run to resume (``None`` when it stopped before one existed)."""

    def __init__(self, signal_name: str, where: str = "", run_dir: Path | None = None,
                 last: str | None = None) -> None:
        self.signal_name, self.where, self.run_dir, self.last = signal_name, where, run_dir, last
        super().__init__(self.message)

    @property
    def exit_code(self) -> int:
        return 128 + int(getattr(signal, f"SIG{self.signal_name}", signal.SIGINT))

    @property
    def message(self) -> str:
        head = f"interrupted by {'Ctrl-C' if self.signal_name == 'INT' else 'SIG' + self.signal_name}"
        head += f" {self.where}" if self.where else ""
        if self.run_dir is None:
            return head + "; no run directory was created yet, nothing to resume"
        return f"{head}; last checkpoint: {self.last or 'none (the resumed run starts from the beginning)'}"

    def with_run(self, run_dir: Path, stages: Sequence[str]) -> "Interrupted":
        """The same interruption, knowing its run (and so its last checkpoint)."""
        return Interrupted(self.signal_name, self.where, run_dir, last_checkpoint(run_dir, stages))


def with_run(err: KeyboardInterrupt, run_dir: Path, stages: Sequence[str]) -> Interrupted:
    """``err`` (a SIGTERM stop, or Ctrl-C's plain ``KeyboardInterrupt``) as an :class:`Interrupted` of ``run_dir``."""
    base = err if isinstance(err, Interrupted) else Interrupted("INT")
    return base.with_run(run_dir, stages)


def resume_command(overrides: Sequence[str], run_dir: Path, world_size: int = 1) -> str:
    """``python -m vlm.train <overrides> output_dir=<run_dir> resume=auto``: the command line overrides of the
    interrupted run, its own ``output_dir``/``resume`` replaced by its run directory and ``trainer.kill_at`` /
    ``kill_signal`` (a test instrument, not part of the run) dropped; ``torchrun ...`` when it ran on several
    processes. ``resume=auto`` continues from the last checkpoint, or starts the run afresh if it has none."""
    dropped = ("output_dir", "resume", "trainer.kill_at", "trainer.kill_signal")
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in dropped]
    launcher = "python" if world_size <= 1 else "torchrun <the same torchrun options>"
    return f"{launcher} -m vlm.train " + shlex.join([*kept, f"output_dir={run_dir}", "resume=auto"])


class _StopRequest:
    """The SIGTERM flag the loop polls (process-wide: signal handlers are)."""

    def __init__(self) -> None:
        self.requested = False

    def handler(self, signum: int, frame: Any) -> None:
        if self.requested:  # asked twice: stop now, without a checkpoint
            raise Interrupted("TERM", "(second SIGTERM, no checkpoint written)")
        self.requested = True


STOP = _StopRequest()


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """While active (main thread only), SIGTERM sets :data:`STOP` instead of killing the process."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, STOP.handler)
    STOP.requested = False
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        STOP.requested = False


def kill_point(trainer: TrainerConfig, stage: str, point: int | str, run_dir: Path, rank: int = 0) -> None:
    """Send ``trainer.kill_signal`` to this process if ``trainer.kill_at`` names ``<stage>:<point>``, once per run
    directory and process (a marker file ``.kill_at-<stage>-<point>-rank<r>`` is written first), so a resume whose
    config still holds ``kill_at`` passes the point."""
    if trainer.kill_at is None or str(trainer.kill_at) != f"{stage}:{point}":
        return
    marker = Path(run_dir) / f".kill_at-{stage}-{point}-rank{rank}"
    if marker.exists():
        return
    marker.write_text(trainer.kill_signal)
    signal.raise_signal(getattr(signal, f"SIG{trainer.kill_signal}"))
