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
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from vlm.data.datasets import build_dataset
from vlm.train.build import build_tokenizer, saved_tokenizer
from vlm.train.config import check, compose
from vlm.train.config_check import check_runnable
from vlm.train.distributed import build_strategy
from vlm.eval.evaluator import format_table
from vlm.train.export import STAGE_WEIGHTS, resolve_weights
from vlm.train.interrupt import stop_on_sigterm, with_run
from vlm.train.loggers import RunLogger
from vlm.train.checkpoint import stage_done
from vlm.train.run_dir import (  # noqa: F401  (find_resumable: part of this module's API)
    Resume,
    check_same_model,
    find_resumable,
    resolve_run_dir,
    resume_config,
    set_run_state,
    write_run_info,
)
from vlm.train.stage import StageResult, StageRunner, skipped_result, weight_names


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
    tokenizer = build_tokenizer(cfg, [cfg.stage[n].template for n in cfg.stages],
                                [cfg.stage[n].get("tiling") for n in cfg.stages])
    if (saved := saved_tokenizer(cfg.init_from)) is not None:
        log.info(f"[vlm.train] tokenizer: the one saved with init_from ({saved}; {len(tokenizer)} tokens), not the "
                 f"recipe's tokenizer.{cfg.tokenizer.name}")
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
    init_files = ([Path(p) for p in resolve_weights(Path(cfg.init_from), import_dir=run_dir / "init_from")]
                  if cfg.init_from else [])
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
