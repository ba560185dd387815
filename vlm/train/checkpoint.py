"""Checkpoints: written atomically, the last K kept, loaded without pickle.

``<stage dir>/checkpoints/step_000123/`` holds

- ``model.safetensors``: the trainable parameters (every parameter with ``trainer.save_full=true``), keyed like the
  unwrapped model (LoRA adapters under their peft names),
- ``optimizer.pt`` / ``scheduler.pt``: state dicts of plain tensors and numbers (``torch.load(weights_only=True)``),
- ``rng_rank{r}.pt``: each process's torch / CUDA / python / numpy RNG states, as tensors,
- ``trainer_state.json``: step, data position, model fingerprint (parameter names/shapes), losses so far.

A checkpoint is assembled in a hidden temporary directory and renamed into place (``os.replace``), so a crash
mid-write leaves the previous checkpoint as the latest complete one; stale temporary directories are removed.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vlm.objectives.base import TrainModule
from vlm.train.distributed import Strategy
from vlm.train.rng import rng_state, set_rng_state

STEP_RE = re.compile(r"^step_(\d+)$")
WEIGHTS = "model.safetensors"
STATE = "trainer_state.json"


def step_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    dirs = [d for d in step_dirs(root) if (d / STATE).is_file()]
    return dirs[-1] if dirs else None


def save_tensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors refuses tensors that share memory (tied weights): give each key its own contiguous copy."""
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        v = v.detach().cpu()
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        out[k] = v.clone().contiguous() if ptr in seen or not v.is_contiguous() else v
        seen.add(ptr)
    save_file(out, str(path), metadata=metadata or {"format": "pt"})


class CheckpointManager:
    """Save / find / load the checkpoints of one stage under ``root`` (``<stage dir>/checkpoints``)."""

    def __init__(self, root: Path, strategy: Strategy, keep_last: int = 2, save_full: bool = False) -> None:
        self.root, self.strategy, self.keep_last, self.save_full = Path(root), strategy, keep_last, save_full

    def latest(self) -> Path | None:
        return latest_checkpoint(self.root)

    def save(self, step: int, wrapped: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
             state: dict[str, Any]) -> Path:
        """Collective: every rank calls it. Returns the checkpoint directory."""
        s = self.strategy
        to_ckpt = key_map(wrapped, outward=True)
        weights = rename(s.model_state_dict(wrapped, trainable_only=not self.save_full), to_ckpt)
        optim = rename_optimizer(s.optimizer_state_dict(wrapped, optimizer), to_ckpt)
        final = self.root / f"step_{step:06d}"
        tmp = self.root / f".tmp-step_{step:06d}"
        if s.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        s.barrier()
        torch.save(rng_state(), tmp / f"rng_rank{s.rank}.pt")
        s.barrier()
        if s.is_main:
            save_tensors(weights, tmp / WEIGHTS)
            torch.save(optim, tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            (tmp / STATE).write_text(json.dumps({**state, "step": step, "world_size": s.world_size,
                                                 "trainable_only": not self.save_full}, indent=1))
            if final.exists():  # re-saving the same step (e.g. end of stage right after a periodic save)
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in step_dirs(self.root)[:-self.keep_last] if self.keep_last > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        s.barrier()
        return final

    def load(self, path: Path, wrapped: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
             restore_rng: bool = True) -> dict[str, Any]:
        """Restore model weights, optimizer, scheduler and (``restore_rng``) this rank's RNG; returns
        ``trainer_state.json``. The training loop restores the RNG itself (:meth:`read_rng`), after everything else
        that might draw."""
        s = self.strategy
        state = json.loads((path / STATE).read_text())
        to_module = key_map(wrapped, outward=False)
        weights = rename(load_file(str(path / WEIGHTS)), to_module) if s.is_main else {}
        check_keys(weights, wrapped, str(path / WEIGHTS))
        s.load_model_state_dict(wrapped, weights)
        optim = rename_optimizer(torch.load(path / "optimizer.pt", weights_only=True), to_module) \
            if s.is_main else {}
        s.load_optimizer_state_dict(wrapped, optimizer, optim)
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        if restore_rng:
            set_rng_state(self.read_rng(path))
        return state

    def read_rng(self, path: Path) -> dict[str, Any]:
        """This rank's RNG state saved in checkpoint ``path`` (rank 0's when resumed with more processes)."""
        rng_file = path / f"rng_rank{self.strategy.rank}.pt"
        if not rng_file.is_file():
            rng_file = path / "rng_rank0.pt"
        return torch.load(rng_file, weights_only=True)


def unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)


def key_map(wrapped: nn.Module, outward: bool) -> Any:
    """Parameter name -> checkpoint name (``outward``) or back, for a wrapped ``TrainModule``; else identity."""
    module = unwrap(wrapped)
    if not isinstance(module, TrainModule):
        return None
    return module.checkpoint_key if outward else module.module_key


def rename(state: dict[str, Any], key: Any) -> dict[str, Any]:
    return state if key is None else {key(k): v for k, v in state.items()}


def rename_optimizer(state: dict[str, Any], key: Any) -> dict[str, Any]:
    """A full optimizer state dict (``state`` and ``param_groups`` keyed by parameter name) with names mapped."""
    if key is None or not state:
        return state
    groups = [{**g, "params": [key(p) for p in g["params"]]} for g in state.get("param_groups", [])]
    return {**state, "state": rename(state.get("state", {}), key), "param_groups": groups}


def check_keys(weights: dict[str, torch.Tensor], model: nn.Module, source: str) -> None:
    """Every key of ``weights`` must be a parameter/buffer of ``model`` (a subset is fine)."""
    if not weights:
        return
    known = set(unwrap(model).state_dict().keys())
    unknown = sorted(set(weights) - known)
    if unknown:
        raise ValueError(f"{source} holds {len(unknown)} tensor(s) this model does not have, e.g. {unknown[:5]}; "
                         f"it was written by a different model or policy")


# ----------------------------------------------------------------------------------------------- finished stages
DONE = "DONE.json"  # written into a stage's folder when it finished (its result), read by resume
STAGE_WEIGHTS = "weights.safetensors"  # a finished stage's trained weights, in its folder


def stage_done(stage_dir: Path) -> dict[str, Any] | None:
    """The result a finished stage recorded in ``stage_dir`` (its ``DONE.json``), or ``None``."""
    f = stage_dir / DONE
    return json.loads(f.read_text()) if f.is_file() else None


def last_checkpoint(run_dir: Path, stages: Sequence[str]) -> str | None:
    """The most advanced resumable point of ``run_dir``: the latest checkpoint of the last stage that has one, or
    the last finished stage's weights; ``None`` if there is neither."""
    found = None
    for name in stages:
        d = run_dir / name
        if stage_done(d) is not None:
            found = f"{d / STAGE_WEIGHTS} (stage {name!r} finished)"
        elif (ckpt := latest_checkpoint(d / "checkpoints")) is not None:
            found = str(ckpt)
    return found
