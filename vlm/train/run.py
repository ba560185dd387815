"""``run(cfg)``: a whole training run (its stages in order), from a composed config to a run directory.

Run directory (``output_dir``, default ``runs/<name>/<timestamp>``):

    config.yaml        the resolved config            run.json       git commit, seeds, world size, versions
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

from vlm.train.build import build_tokenizer, config_fingerprint, describe_config_change
from vlm.train.config import ConfigError, check, compose, to_yaml
from vlm.train.config_check import check_runnable
from vlm.train.data import build_dataset, data_seed
from vlm.train.distributed import build_strategy
from vlm.train.evaluate import format_table
from vlm.train.export import STAGE_WEIGHTS, resolve_weights
from vlm.train.loggers import RunLogger
from vlm.train.policy import check_policies
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


def find_resumable(name: str) -> Path | None:
    """The newest ``runs/<name>/*`` run that has not finished."""
    root = Path("runs") / name
    runs = sorted((p for p in root.glob("*") if (p / "config.yaml").is_file() and not (p / "result.json").is_file()),
                  key=lambda p: p.stat().st_mtime)
    return runs[-1] if runs else None


def resolve_run_dir(cfg: DictConfig) -> tuple[Path, bool]:
    """``(run dir, resuming)`` from ``output_dir`` and ``resume``."""
    if cfg.resume not in (None, "auto"):
        p = Path(cfg.resume)
        if p.name.startswith("step_") and p.parent.name == "checkpoints":
            p = p.parents[2]
        if not (p / "config.yaml").is_file():
            raise ConfigError(f"resume={cfg.resume!r}: not a run directory (no config.yaml)")
        if cfg.output_dir and Path(cfg.output_dir).resolve() != p.resolve():
            raise ConfigError(f"resume={cfg.resume!r} and output_dir={cfg.output_dir!r} name different runs")
        return p, True
    if cfg.resume == "auto":
        if cfg.output_dir:
            p = Path(cfg.output_dir)
            return p, (p / "config.yaml").is_file()
        found = find_resumable(cfg.name)
        return (found, True) if found else (default_run_dir(cfg.name), False)
    p = Path(cfg.output_dir) if cfg.output_dir else default_run_dir(cfg.name)
    if any(p.glob("*/checkpoints/step_*")):
        raise ConfigError(f"output_dir {str(p)!r} already holds a run with checkpoints; pass resume=auto to "
                          f"continue it, or choose another output_dir")
    return p, False


def preflight(cfg: DictConfig, device: torch.device) -> None:
    """Everything that can be checked before a model is built (names and arguments: ``check``, already done)."""
    check_runnable(cfg)
    for name in cfg.stages:
        try:
            check_policies(cfg.stage[name], device)
        except (KeyError, ValueError, RuntimeError) as e:  # unknown name, qlora without CUDA, ...
            raise ConfigError(f"stage.{name}.policy: {e.args[0] if e.args else e}") from e
    if cfg.init_from is not None:
        resolve_weights(Path(cfg.init_from))


def check_same_model(cfg: DictConfig, run_dir: Path) -> None:
    """A run may only be resumed by the same architecture (encoder, connector, LLM, tokenizer)."""
    saved_cfg = OmegaConf.load(run_dir / "config.yaml")
    old_fp, old = config_fingerprint(saved_cfg)
    new_fp, new = config_fingerprint(cfg)
    if old_fp != new_fp:
        changes = describe_config_change(old, new)
        raise ConfigError(f"cannot resume {run_dir}: it was written by a different model (config fingerprint "
                          f"{old_fp} vs {new_fp}): " + "; ".join(changes[:6]))


def write_run_info(cfg: DictConfig, run_dir: Path, resuming: bool, world_size: int) -> None:
    """``config.yaml`` (fresh runs) and ``run.json``: git commit, seeds, command line, versions; resumes appended."""
    run_dir.mkdir(parents=True, exist_ok=True)
    info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    if not resuming:
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        info = {"name": cfg.name, "git": git_info(), "seed": cfg.seed,
                "stage_seeds": {n: {"model": cfg.seed, "data": data_seed(cfg.seed, n)} for n in cfg.stages},
                "argv": sys.argv, "world_size": world_size, "started": datetime.now().isoformat(),
                "versions": {"python": platform.python_version(), "torch": torch.__version__,
                             "transformers": _version("transformers"), "peft": _version("peft")}}
    else:
        info.setdefault("resumed", []).append({"at": datetime.now().isoformat(), "git": git_info(),
                                               "world_size": world_size})
    (run_dir / "run.json").write_text(json.dumps(info, indent=1))


def plot_run(run_dir: Path) -> Path | None:
    from vlm.train.plot import plot_metrics

    try:
        return plot_metrics(run_dir / "metrics.jsonl", run_dir / "plot.png")
    except Exception as e:  # a plot must never fail a finished run
        print(f"[vlm.train] could not write the plot: {e}", file=sys.stderr)
        return None


def run(cfg: DictConfig | None = None, *, recipe: str | None = None, overrides: list[str] | tuple = ()) -> RunResult:
    """Train every stage of ``cfg`` (or of ``compose(recipe, overrides)``) and return where everything went."""
    cfg = compose(recipe, overrides) if cfg is None else check(cfg)  # (re)checked: notebooks may edit it
    t0 = time.perf_counter()
    strategy = build_strategy(cfg.trainer)
    strategy.setup()
    try:
        return _run(cfg, strategy, t0)
    finally:
        strategy.teardown()


def _run(cfg: DictConfig, strategy: Any, t0: float) -> RunResult:
    if cfg.trainer.threads:
        torch.set_num_threads(int(cfg.trainer.threads))
    if strategy.device.type == "cuda" and cfg.trainer.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    preflight(cfg, strategy.device)
    run_dir, resuming = strategy.broadcast_object(resolve_run_dir(cfg) if strategy.is_main else None)
    if resuming:
        check_same_model(cfg, run_dir)
    if strategy.is_main:
        write_run_info(cfg, run_dir, resuming, strategy.world_size)
    strategy.barrier()
    log = RunLogger(run_dir, cfg, strategy.is_main)
    log.info(f"[vlm.train] recipe {cfg.name!r}: stages {list(cfg.stages)} -> {run_dir}"
             + (" (resuming)" if resuming else ""))
    tokenizer = build_tokenizer(cfg, [cfg.stage[n].template for n in cfg.stages])
    eval_samples = None
    if cfg.eval.enabled and cfg.eval.data is not None:
        eval_samples = build_dataset(cfg.data[cfg.eval.data])

    result = RunResult(run_dir)
    init_files = [Path(p) for p in resolve_weights(Path(cfg.init_from))] if cfg.init_from else []
    carried: set[str] = set()
    offset = 0
    base_model = json.loads((run_dir / "run.json").read_text()).get("model") if resuming else None
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
                                     global_step_offset=offset, expected_base=base_model)
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
