"""A run's directory and its bookkeeping: where a run writes (``runs/<name>/<timestamp>`` or ``output_dir``),
finding one to resume, what a resume may change (``resume_config``: the same model, the same data order), and
``run.json`` (state, attempts, overrides, git commit, versions). ``vlm.train.run`` runs the stages in it."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from vlm.train.batch_plan import data_seed
from vlm.train.build import config_fingerprint, describe_config_change
from vlm.train.config import check, compose, to_yaml
from vlm.train.errors import ConfigError
def git_info() -> dict[str, Any]:
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"commit": commit, "dirty": dirty}


def default_run_dir(name: str) -> Path:
    base = Path("runs") / name / datetime.now().strftime("%Y%m%d-%H%M%S")
    path, k = base, 1
    while path.exists():
        path, k = base.with_name(f"{base.name}-{k}"), k + 1
    return path


RUN_STATES = ("started", "failed", "interrupted", "finished")
#: data spec keys that do not change which samples a step trains on (a resume may change them)
ORDER_FREE_KEYS = ("path", "image_root", "max_bad_fraction", "epochs")  # epochs: a stage's length, as max_steps


def has_checkpoint(run_dir: Path) -> bool:
    """Whether a run directory holds something to continue from: a stage checkpoint or a finished stage."""
    return any(run_dir.glob("*/checkpoints/step_*")) or any(run_dir.glob("*/DONE.json"))


def find_resumable(name: str) -> Path | None:
    """The newest ``runs/<name>/*`` run that has not finished and has a checkpoint (a run that failed before its
    first checkpoint has nothing to continue from)."""
    root = Path("runs") / name
    runs = sorted((p for p in root.glob("*") if (p / "config.yaml").is_file() and not (p / "result.json").is_file()
                   and has_checkpoint(p)), key=lambda p: p.stat().st_mtime)
    return runs[-1] if runs else None


def resolve_run_dir(cfg: DictConfig) -> tuple[Path, bool]:
    """``(run dir, resuming)`` from ``output_dir`` and ``resume``. Only a run with a checkpoint (or a finished stage)
    is resumed: ``resume=auto`` starts one without afresh, ``resume=DIR`` refuses it."""
    if cfg.resume not in (None, "auto"):
        p = Path(cfg.resume)
        if p.name.startswith("step_") and p.parent.name == "checkpoints":
            p = p.parents[2]
        if not (p / "config.yaml").is_file():
            raise ConfigError(f"resume={cfg.resume!r}: not a run directory (no config.yaml)")
        if cfg.output_dir and Path(cfg.output_dir).resolve() != p.resolve():
            raise ConfigError(f"resume={cfg.resume!r} and output_dir={cfg.output_dir!r} name different runs")
        if not has_checkpoint(p):
            state = _run_info(p).get("state", "unknown")
            error = _run_info(p).get("error")
            raise ConfigError(f"resume={cfg.resume!r}: the run has no checkpoint to continue from (state {state}"
                              + (f": {error}" if error else "") + "); start it again without resume")
        return p, True
    if cfg.resume == "auto":
        if cfg.output_dir:
            p = Path(cfg.output_dir)
            return p, (p / "config.yaml").is_file() and has_checkpoint(p)
        found = find_resumable(cfg.name)
        return (found, True) if found else (default_run_dir(cfg.name), False)
    p = Path(cfg.output_dir) if cfg.output_dir else default_run_dir(cfg.name)
    if any(p.glob("*/checkpoints/step_*")):
        raise ConfigError(f"output_dir {str(p)!r} already holds a run with checkpoints; pass resume=auto to "
                          f"continue it, or choose another output_dir")
    return p, False


def check_same_model(cfg: DictConfig, run_dir: Path) -> None:
    """A run may only be resumed by the same architecture (encoder, connector, LLM, tokenizer) and the same data
    order (seed, and each stage's data and global batch size)."""
    saved_cfg = OmegaConf.load(run_dir / "config.yaml")
    old_fp, old = config_fingerprint(saved_cfg)
    new_fp, new = config_fingerprint(cfg)
    if old_fp != new_fp:
        changes = describe_config_change(old, new)
        raise ConfigError(f"cannot resume {run_dir}: it was written by a different model (config fingerprint "
                          f"{old_fp} vs {new_fp}): " + "; ".join(changes[:6]))
    old, new = data_order(saved_cfg), data_order(cfg)
    changes = [f"{k}: {old[k]!r} -> {new[k]!r}" for k in sorted(set(old) & set(new)) if old[k] != new[k]]
    if changes:
        raise ConfigError(f"cannot resume {run_dir} with a different data order: " + "; ".join(changes[:6]))


def data_order(cfg: DictConfig) -> dict[str, Any]:
    """The flat ``{key: value}`` settings that decide which samples each step of each stage trains on."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    out: dict[str, Any] = {"seed": plain.get("seed")}
    for name in plain.get("stages") or []:
        st = (plain.get("stage") or {}).get(name) or {}
        key = st.get("data")
        out |= {f"stage.{name}.data": key, f"stage.{name}.global_batch_size": st.get("global_batch_size")}
        spec = (plain.get("data") or {}).get(key) or {}
        out |= {f"data.{key}.{k}": v for k, v in spec.items() if k not in ORDER_FREE_KEYS}
    return out


@dataclass
class Resume:
    """How a run is continued: its directory, the overrides given with the resume and the resulting changes."""

    run_dir: Path
    overrides: list[str] | None     # applied on top of the saved config (None: the config was given whole)
    changes: list[str]              # ``key: old -> new`` against the saved config


def resume_config(cfg: DictConfig, run_dir: Path, overrides: list[str] | None) -> tuple[DictConfig, Resume]:
    """The config to continue ``run_dir`` with: its saved ``config.yaml`` with ``overrides`` (the command line of the
    resume, ``resume=``/``output_dir=`` aside) applied on top. The overrides' effect is what they change when added
    to the run's recorded overrides (``run.json``), so group options (``trainer=ddp``) work too. With
    ``overrides=None`` (a composed config passed to :func:`run`) ``cfg`` is used as given."""
    saved = OmegaConf.load(run_dir / "config.yaml")
    if overrides is None:
        new = cfg
    else:
        recorded = _run_info(run_dir).get("overrides", [])
        overrides = [o for o in overrides if _override_key(o) not in ("resume", "output_dir") and o not in recorded]
        merged = OmegaConf.to_container(saved)
        if overrides:
            base, top = (OmegaConf.to_container(compose(None, list(recorded) + extra, validate=False), resolve=True)
                         for extra in ([], overrides))
            merged = _apply_changes(merged, base, top)
        new = OmegaConf.create(merged)
        new.resume, new.output_dir = cfg.resume, str(run_dir)
        new = check(new)
    old, now = OmegaConf.to_container(saved, resolve=True), OmegaConf.to_container(new, resolve=True)
    changes = [c for c in describe_config_change(old, now) if _override_key(c.split(":")[0]) not in
               ("resume", "output_dir")]
    return new, Resume(run_dir, overrides, changes)


def _override_key(o: str) -> str:
    return o.lstrip("+~").partition("=")[0].strip()


def _apply_changes(target: dict[str, Any], base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``target`` with what differs between ``base`` and ``top`` (keys added, removed, changed) applied."""
    out = dict(target)
    for k in set(base) | set(top):
        if k not in top:
            out.pop(k, None)
        elif isinstance(top[k], dict) and isinstance(base.get(k), dict) and isinstance(out.get(k), dict):
            out[k] = _apply_changes(out[k], base[k], top[k])
        elif k not in base or base[k] != top[k]:
            out[k] = top[k]
    return out


def _run_info(run_dir: Path) -> dict[str, Any]:
    f = run_dir / "run.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def write_run_info(cfg: DictConfig, run_dir: Path, resuming: bool, world_size: int,
                   overrides: list[str] | None = None, resume: Resume | None = None) -> int:
    """``config.yaml`` (the config this attempt runs with) and ``run.json``: state ``started``, the overrides that
    compose the config (cumulative over resumes), git commit, seeds, command line, versions, and an ``attempts``
    entry (first run, resume, or a start afresh in a directory without a checkpoint: its overrides and changes).
    Returns the attempt number (0 for a new directory)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    info = _run_info(run_dir)
    now = datetime.now().isoformat()
    attempt = {"started": now, "argv": sys.argv, "git": git_info(), "world_size": world_size, "state": "started"}
    if not resuming:
        earlier = info.get("attempts", [])
        info = {"name": cfg.name, "git": attempt["git"], "seed": cfg.seed,
                "stage_seeds": {n: {"model": cfg.seed, "data": data_seed(cfg.seed, n)} for n in cfg.stages},
                "argv": sys.argv, "world_size": world_size, "started": now, "overrides": list(overrides or []),
                "versions": {"python": platform.python_version(), "torch": torch.__version__,
                             "transformers": _version("transformers"), "peft": _version("peft")},
                "attempts": earlier + [{**attempt, "overrides": list(overrides or []),
                                        **({"restarted": True} if earlier else {})}]}
    else:
        attempts = info.setdefault("attempts", [{"started": info.get("started")}])  # runs from before attempts
        extra = list(resume.overrides or []) if resume else []
        info["overrides"] = list(info.get("overrides", [])) + extra
        attempts.append({**attempt, "resumed": True, "overrides": extra, "changes": resume.changes if resume else []})
    info["state"] = "started"
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    (run_dir / "run.json").write_text(json.dumps(info, indent=1))
    return len(info["attempts"]) - 1


def set_run_state(run_dir: Path, state: str, error: BaseException | None = None) -> None:
    """Record ``state`` (one of ``RUN_STATES``) in ``run.json``, for the run and its latest attempt, with the error
    (``"<type>: <message>"``) of a failed or interrupted run."""
    info = _run_info(run_dir)
    if not info:
        return
    rec = {"state": state, "ended": datetime.now().isoformat()}
    if error is not None:
        rec["error"] = f"{type(error).__name__}: {error}"
    info.pop("error", None)
    info.update(rec)
    if info.get("attempts"):
        info["attempts"][-1].update(rec)
    (run_dir / "run.json").write_text(json.dumps(info, indent=1))


def _version(pkg: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:
        return None


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
