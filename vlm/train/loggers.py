"""Run logging: stdout and ``<run>/metrics.jsonl`` always; Weights & Biases with ``logger=wandb``.

wandb runs offline (files under ``<run>/wandb``, upload later with ``wandb sync``) unless a project is set and
``logger.mode=online``; the entity is never hard-coded (wandb's default unless ``logger.entity`` is set).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vlm.registry import Registry

BACKENDS: Registry[Any] = Registry("logger")


class Backend:
    def log(self, row: dict[str, Any], step: int) -> None: ...

    def summary(self, values: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


@BACKENDS.register("none")
def no_backend(cfg: DictConfig, run_dir: Path, run_cfg: DictConfig) -> Backend:
    return Backend()


class WandbBackend(Backend):
    def __init__(self, cfg: DictConfig, run_dir: Path, run_cfg: DictConfig) -> None:
        import wandb

        mode = cfg.mode
        if mode == "online" and not cfg.project:
            print("[vlm.train] logger.mode=online needs logger.project; logging offline", file=sys.stderr)
            mode = "offline"
        self.run = wandb.init(project=cfg.project or "vlm", entity=cfg.entity, mode=mode, dir=str(run_dir),
                              name=cfg.run_name or f"{run_cfg.name}/{run_dir.name}", tags=list(cfg.tags),
                              config=OmegaConf.to_container(run_cfg, resolve=True))
        self._step = 0

    def log(self, row: dict[str, Any], step: int) -> None:
        self._step = max(self._step, step)  # wandb steps must not go back; stages continue the count
        self.run.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=self._step)

    def summary(self, values: dict[str, Any]) -> None:
        for k, v in values.items():
            self.run.summary[k] = v

    def close(self) -> None:
        self.run.finish()


BACKENDS.register("wandb")(WandbBackend)


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    return v


class RunLogger:
    """Rank 0 writes; other ranks' calls are no-ops. Every ``metrics.jsonl`` row records its ``attempt`` (0 for the
    first run of the directory, then one more per resume)."""

    def __init__(self, run_dir: Path, cfg: DictConfig, is_main: bool, attempt: int = 0) -> None:
        self.is_main, self.attempt = is_main, attempt
        self.path = run_dir / "metrics.jsonl"
        self.backend: Backend = BACKENDS.get(cfg.logger.name)(cfg.logger, run_dir, cfg) if is_main else Backend()
        self._global_step = 0

    def info(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)

    def log(self, row: dict[str, Any], global_step: int | None = None) -> None:
        if not self.is_main:
            return
        row = _clean(row)
        self._write({**row, "attempt": self.attempt})
        flat = {}
        for k, v in row.items():
            if isinstance(v, dict):
                flat.update({f"{k}/{kk}": vv for kk, vv in v.items()})
            else:
                flat[k] = v
        self.backend.log({f"{row.get('stage', 'run')}/{k}": v for k, v in flat.items()},
                         step=global_step if global_step is not None else self._global_step)

    def _write(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def mark_resume(self, stage: str, step: int) -> None:
        """Record (in ``metrics.jsonl`` only) that ``stage`` continues from ``step``: rows of earlier attempts after
        it were abandoned, and :func:`read_metrics` leaves them out."""
        if self.is_main:
            self._write({"stage": stage, "step": step, "resumed": True, "attempt": self.attempt})

    def mark_restart(self) -> None:
        """Record (in ``metrics.jsonl`` only) that the run starts again from scratch in the same directory: every
        earlier row belongs to an abandoned attempt."""
        if self.is_main:
            self._write({"restarted": True, "attempt": self.attempt})

    def summary(self, values: dict[str, Any]) -> None:
        if self.is_main:
            self.backend.summary(values)

    def close(self) -> None:
        self.backend.close()


def read_metrics(path: Path, all_attempts: bool = False) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl``: by default what the run's history is (:func:`current_rows`: one row per stage,
    step and kind, abandoned steps of interrupted attempts left out); ``all_attempts=True``: every row as written."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows if all_attempts else current_rows(rows)


def current_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows as the run's history: a resume marker (``{"stage", "step", "resumed": true}``) drops the earlier rows of
    its stage after its step (written before an interruption, then redone); of rows with the same stage, step and
    kind (``loss`` / ``eval`` / other) the last is kept. A restart marker (``{"restarted": true}``) drops every
    earlier row. Markers themselves are left out; file order is kept."""
    kept: list[dict[str, Any]] = []
    for r in rows:
        if r.get("restarted") is True:
            kept = []
        elif r.get("resumed") is True:
            kept = [x for x in kept if x.get("stage") != r.get("stage") or x.get("step", 0) <= r.get("step", 0)]
        else:
            kept.append(r)
    last = {_row_key(r): i for i, r in enumerate(kept)}
    return [r for i, r in enumerate(kept) if last[_row_key(r)] == i]


def _row_key(row: dict[str, Any]) -> tuple[Any, ...]:
    kind = "loss" if "loss" in row else "eval" if "eval" in row else ",".join(sorted(set(row) - {"attempt"}))
    return row.get("stage"), row.get("step"), kind
