"""``run(cfg)``: a whole training run (its stages in order), from a composed config to a run directory.

Run directory (``output_dir``, default ``runs/<name>/<timestamp>``):

    config.yaml        the resolved config (of the latest attempt)
    run.json           state (started | failed + error | interrupted | finished), overrides, git commit, seeds,
                       world size, versions, and one entry per attempt (the first run, then each resume)
    metrics.jsonl      one row per step / eval        <stage>/       checkpoints/, weights.safetensors, DONE.json
    final/             vlm.load-able model (LoRA merged)               eval.json, predictions.jsonl, plot.png
    result.json        final losses, eval metrics, timings (what sweep summaries read)
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from vlm.data.datasets import build_dataset
from vlm.train.batch_plan import data_seed
from vlm.train.build import build_tokenizer, config_fingerprint, describe_config_change
from vlm.train.config import ConfigError, check, compose, to_yaml
from vlm.train.config_check import check_runnable
from vlm.train.distributed import build_strategy
from vlm.train.evaluate import format_table
from vlm.train.export import STAGE_WEIGHTS, resolve_weights
from vlm.train.interrupt import stop_on_sigterm, with_run
from vlm.train.loggers import RunLogger
from vlm.train.stage import StageResult, StageRunner, skipped_result, stage_done, weight_names


@dataclass
class RunResult:
    run_dir: Path
    stages: list[StageResult] = field(default_factory=list)
    eval: dict[str, float] = field(default_factory=dict)
    final_dir: Path | None = None
    plot: Path | None = None
    seconds: float = 0.0

    @property
    def losses(self) -> dict[str, list[float]]:
        return {s.name: s.losses for s in self.stages}

    def to_dict(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "final_dir": str(self.final_dir) if self.final_dir else None,
                "plot": str(self.plot) if self.plot else None, "seconds": self.seconds, "eval": self.eval,
                "stages": [{k: v for k, v in asdict(s).items() if k != "losses"} | {"final_loss": s.final_loss}
                           for s in self.stages]}


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


def plot_run(run_dir: Path) -> Path | None:
    from vlm.train.plot import plot_metrics

    try:
        return plot_metrics(run_dir / "metrics.jsonl", run_dir / "plot.png")
    except Exception as e:  # a plot must never fail a finished run
        print(f"[vlm.train] could not write the plot: {e}", file=sys.stderr)
        return None


def run(cfg: DictConfig | None = None, *, recipe: str | None = None,
        overrides: list[str] | tuple | None = None) -> RunResult:
    """Train every stage of ``cfg`` (or of ``compose(recipe, overrides)``) and return where everything went.

    ``overrides`` are recorded in ``run.json``; given with ``cfg``, they are the ones ``cfg`` was composed with (the
    command line). Resuming (``resume=auto|DIR``) continues with the run's saved config plus these overrides on top;
    a ``cfg`` without ``overrides`` is used as given. Either way the changes against the saved config are listed.
    """
    if cfg is None:
        overrides = ([f"recipe={recipe}"] if recipe else []) + list(overrides or [])
        cfg = compose(None, overrides)
    else:
        cfg = check(cfg)  # (re)checked: notebooks may edit it
        overrides = None if overrides is None else list(overrides)
    resume = None
    if cfg.resume is not None:
        run_dir, resuming = resolve_run_dir(cfg)
        if resuming:
            cfg, resume = resume_config(cfg, run_dir, overrides)
    t0 = time.perf_counter()
    strategy = build_strategy(cfg.trainer)
    strategy.setup()
    state = RunState()
    try:
        with stop_on_sigterm():  # SIGTERM: checkpoint, then stop (vlm.train.interrupt)
            result = _run(cfg, strategy, t0, overrides, resume, state)
        state.set("finished")
        return result
    except (KeyboardInterrupt, SystemExit) as e:
        state.set("interrupted", e)
        raise
    except BaseException as e:
        state.set("failed", e)
        raise
    finally:
        strategy.teardown()


@dataclass
class RunState:
    """Where a run's state is recorded once its directory exists (main process only)."""

    run_dir: Path | None = None

    def set(self, state: str, error: BaseException | None = None) -> None:
        if self.run_dir is not None:
            set_run_state(self.run_dir, state, error)


def _run(cfg: DictConfig, strategy: Any, t0: float, overrides: list[str] | None, resume: Resume | None,
         state: RunState) -> RunResult:
    if cfg.trainer.threads:
        torch.set_num_threads(int(cfg.trainer.threads))
    if strategy.device.type == "cuda" and cfg.trainer.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    check_runnable(cfg, strategy.device)  # files and devices; every name was checked by check()
    run_dir, resuming = strategy.broadcast_object(resolve_run_dir(cfg) if strategy.is_main else None)
    if resuming:
        check_same_model(cfg, run_dir)
    attempt = write_run_info(cfg, run_dir, resuming, strategy.world_size, overrides, resume) \
        if strategy.is_main else 0
    state.run_dir = run_dir if strategy.is_main else None
    strategy.barrier()
    log = RunLogger(run_dir, cfg, strategy.is_main, attempt=attempt)
    if attempt and not resuming:
        log.mark_restart()
    log.info(f"[vlm.train] recipe {cfg.name!r}: stages {list(cfg.stages)} -> {run_dir}"
             + (f" (resuming: attempt no. {attempt + 1} of this run)" if resuming else ""))
    if resume is not None:
        given = "its saved config" + (f" + overrides {resume.overrides}" if resume.overrides else "") \
            if resume.overrides is not None else "the config given"
        log.info(f"[vlm.train] resuming with {given}; changes against the saved config: "
                 + ("; ".join(resume.changes) if resume.changes else "none"))
    tokenizer = build_tokenizer(cfg, [cfg.stage[n].template for n in cfg.stages])
    eval_samples = None
    if cfg.eval.enabled and cfg.eval.data is not None:
        eval_samples = build_dataset(cfg.data[cfg.eval.data])
        if selection := getattr(eval_samples, "selection", None):  # data=files without data.eval: say so
            log.info(f"[vlm.train] data.{cfg.eval.data}: {selection}")
    else:
        periodic = [f"{n} every {cfg.stage[n].eval_every} steps" for n in cfg.stages if cfg.stage[n].eval_every]
        if periodic:
            why = "eval.enabled=false" if not cfg.eval.enabled else "eval.data=null"
            log.info(f"[vlm.train] {why}: no evaluation at the end and no periodic evaluation ({', '.join(periodic)})")

    result = RunResult(run_dir)
    init_files = [Path(p) for p in resolve_weights(Path(cfg.init_from))] if cfg.init_from else []
    carried: set[str] = set()
    offset = 0
    base_model = json.loads((run_dir / "run.json").read_text()).get("model") if resuming else None
    pending = [n for n in cfg.stages if not (resuming and stage_done(run_dir / n))]  # the stages still to train
    try:
        for i, name in enumerate(cfg.stages):
            stage_dir = run_dir / name
            is_last = i == len(cfg.stages) - 1
            if resuming and stage_done(stage_dir):
                log.info(f"[{name}] already done; carrying {stage_dir / STAGE_WEIGHTS}")
                res = skipped_result(name, stage_dir)
            else:
                runner = StageRunner(cfg, name, run_dir, strategy, tokenizer, log, list(init_files), set(carried),
                                     resume=resuming, is_last=is_last, eval_samples=eval_samples,
                                     global_step_offset=offset, expected_base=base_model,
                                     check_later=pending[1:] if name == pending[0] else [])
                res = runner.run()
                if base_model is None and strategy.is_main:
                    base_model = runner.base
                    info = json.loads((run_dir / "run.json").read_text())
                    (run_dir / "run.json").write_text(json.dumps({**info, "model": base_model}, indent=1))
            result.stages.append(res)
            weights = stage_dir / STAGE_WEIGHTS
            init_files = [weights]  # cumulative: replaces init_from and earlier stages
            carried = weight_names(weights)
            offset += res.steps
        last = result.stages[-1]
        result.eval = last.eval or _read_eval(run_dir)
        result.final_dir = run_dir / "final"
        if strategy.is_main:
            result.plot = plot_run(run_dir)
        result.seconds = time.perf_counter() - t0
        if strategy.is_main:
            (run_dir / "result.json").write_text(json.dumps(result.to_dict(), indent=1))
            log.summary({"seconds": result.seconds, **{f"eval/{k}": v for k, v in result.eval.items()}})
            report(result, log)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: say where the last checkpoint is
        raise with_run(e, run_dir, list(cfg.stages)) from e
    finally:
        log.close()
    return result


def report(result: RunResult, log: RunLogger) -> None:
    lines = ["", f"== done in {result.seconds / 60:.1f} min: {result.run_dir}"]
    for s in result.stages:
        loss = f"{s.final_loss:.4f}" if s.final_loss is not None else "-"
        lines.append(f"   {s.name}: {s.steps} steps, final loss {loss}, {s.seconds:.0f}s"
                     + (" (already done)" if s.skipped else ""))
    if result.eval:
        lines += ["", format_table(result.eval)]
    lines += ["", f"   model (vlm.load):  {result.final_dir}", f"   plot:              {result.plot}",
              f"   metrics:           {result.run_dir / 'metrics.jsonl'}"]
    log.info("\n".join(lines))


def _read_eval(run_dir: Path) -> dict[str, float]:
    f = run_dir / "eval.json"
    return json.loads(f.read_text())["metrics"] if f.is_file() else {}


def _version(pkg: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:
        return None


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
