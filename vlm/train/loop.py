"""The training loop of one stage: gradient accumulation, AMP, clipping, schedule, eval/save hooks, progress bar.

Loss normalization: the stage's objective (``vlm.objectives``) gives each micro-batch a ``weight`` (for ``lm`` under
``token`` weighting: its target tokens); the loop sums them over the *whole* optimizer step (all micro-batches, all
processes) and the objective returns each micro-batch's share of the step loss (``lm``/``token``: sum of token
losses / the step's target count, passed to the model as ``num_items_in_batch``). Summed over micro-batches (and
averaged over processes by DDP/FSDP, hence the ``* world``), the gradient is that of the global batch's loss:
independent of how it is split.
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vlm.loss import shifted_targets
from vlm.metrics import score_keys
from vlm.objectives import Objective
from vlm.train.distributed import Strategy
from vlm.train.interrupt import STOP, Interrupted, kill_point
from vlm.train.rng import set_rng_state
from vlm.train.schema import StageConfig, TrainerConfig


OOM_ERRORS: tuple[type[BaseException], ...] = (torch.OutOfMemoryError, MemoryError)


def samples_in(meta: dict[str, Any], batch: dict[str, Any]) -> int:
    """Samples in a micro-batch: its collated ``meta["samples"]`` (a packed row holds several), else its rows."""
    return len(meta["samples"]) if meta.get("samples") else int(batch["input_ids"].shape[0])


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became NaN/inf; names the step and the samples of the offending batch."""


class BatchTooLargeError(RuntimeError):
    """Out of memory on the first step."""


def count_targets(batch: dict[str, Any]) -> int:
    """Target tokens of a batch as the model counts them: labels shifted by one, segment starts ignored."""
    return int(shifted_targets(batch["labels"], batch.get("segment_ids"))[0].sum())


def flat_ids(meta: dict[str, Any]) -> list[Any]:
    """Sample ids of a batch (rows of packed batches hold lists)."""
    out: list[Any] = []
    for row in meta.get("ids", []):
        out += row if isinstance(row, list) else [row]
    return out


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def is_oom(err: BaseException) -> bool:
    """An allocation failure by type: ``torch.OutOfMemoryError`` (CUDA/accelerators; ``torch.cuda.OutOfMemoryError``
    is the same class) or Python's ``MemoryError``. torch's CPU allocator raises a plain ``RuntimeError``, which is
    left as it is (its message names the allocation)."""
    return isinstance(err, OOM_ERRORS)


@dataclass
class StepStats:
    loss: float
    grad_norm: float
    tokens: int
    targets: int
    samples: int
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)  # the objective's, mean over this process's micro-batches


@dataclass
class LoopState:
    """What the loop reports back (and what a checkpoint stores in ``trainer_state.json``)."""

    losses: list[float] = field(default_factory=list)
    last_eval: dict[str, float] = field(default_factory=dict)
    step_seconds: list[float] = field(default_factory=list)  # this attempt's steps (not checkpointed)


@dataclass
class StageLoop:
    """Everything one stage's loop needs; built by :mod:`vlm.train.stage`."""

    name: str
    stage: StageConfig
    trainer: TrainerConfig
    strategy: Strategy
    model: nn.Module            # unwrapped: the TrainModule (model + objective)
    wrapped: nn.Module          # what forward is called on (DDP / FSDP / the TrainModule)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: Any
    total_steps: int
    accumulation: int
    precision: torch.dtype
    log: Any                    # RunLogger
    save: Callable[[int, LoopState], None]
    evaluate: Callable[[int], dict[str, float]] | None = None
    global_step_offset: int = 0
    scaler: Any = None
    params: list[nn.Parameter] = field(default_factory=list)
    rng: dict[str, Any] | None = None  # the model's RNG state to continue from (a resumed checkpoint's)
    run_dir: str = "."          # where trainer.kill_at records that it fired

    def __post_init__(self) -> None:
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        fp16 = self.precision == torch.float16 and self.strategy.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16)

    # ---------------------------------------------------------------------------------------------------- step
    def autocast(self) -> Any:
        device = self.strategy.device
        enabled = self.precision != torch.float32
        return torch.autocast(device.type, dtype=self.precision, enabled=enabled)

    def step(self, step: int, micro: list[dict[str, Any]]) -> StepStats:
        s, t0 = self.strategy, time.perf_counter()
        self.wrapped.train()
        metas = [b.pop("meta", {}) for b in micro]
        objective: Objective = self.model.objective
        weights = [objective.weight(b) for b in micro]
        local = torch.tensor([sum(count_targets(b) for b in micro),
                              sum(int(b["attention_mask"].sum()) for b in micro),
                              sum(samples_in(m, b) for m, b in zip(metas, micro)), sum(weights)], dtype=torch.float64)
        total = s.all_reduce(local)
        n_targets, n_tokens, n_samples = (int(x) for x in total[:3])
        total_weight = float(total[3])
        loss_sum = torch.zeros((), dtype=torch.float64, device=s.device)
        bad_ids: list[Any] = []
        sums: dict[str, float] = {}
        for i, batch in enumerate(micro):
            batch = to_device(batch, s.device)
            with s.no_sync(self.wrapped, sync=i == len(micro) - 1):
                with self.autocast():  # this micro-batch's share of the step's loss (vlm.objectives.base)
                    out = self.wrapped(batch, weight=weights[i], total=total_weight)
                loss = out.loss * s.world_size
                if not bool(torch.isfinite(loss.detach())):
                    bad_ids += flat_ids(metas[i]) or ["<no ids>"]
                self.scaler.scale(loss).backward()
            loss_sum += out.loss.detach().double()
            for k, v in out.metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) / len(micro)
        if s.all_reduce(torch.tensor([float(bool(bad_ids))]), op="max").item():
            named = [i for rank_ids in s.all_gather_object(bad_ids) for i in rank_ids]
            raise NonFiniteLossError(f"non-finite loss at stage {self.name!r} step {step + 1}; the offending "
                                     f"micro-batch held samples {named[:32]}{' ...' if len(named) > 32 else ''}. "
                                     f"Check those samples, lower the learning rate, or use bf16/fp32 over fp16.")
        self.scaler.unscale_(self.optimizer)
        grad_norm = s.clip_grad_norm(self.params, self.stage.max_grad_norm)
        if not math.isfinite(grad_norm) and not self.scaler.is_enabled():
            ids = s.all_gather_object([i for m in metas for i in flat_ids(m)])
            raise NonFiniteLossError(f"non-finite gradient norm at stage {self.name!r} step {step + 1}; the batch "
                                     f"held samples {[i for r in ids for i in r][:32]}")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        loss = float(s.all_reduce(loss_sum.cpu()))
        return StepStats(loss=loss, grad_norm=grad_norm, tokens=n_tokens, targets=n_targets, samples=n_samples,
                         seconds=time.perf_counter() - t0, metrics=sums)

    # ---------------------------------------------------------------------------------------------------- loop
    def run(self, start_step: int, state: LoopState) -> LoopState:
        s = self.strategy
        bar = None
        if s.is_main and self.trainer.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=start_step, desc=self.name, unit="step", dynamic_ncols=True,
                       file=sys.stderr, leave=True)
        it = iter(self.loader)
        if self.rng is not None:  # after everything else that might draw: the next draw is the next step's dropout
            set_rng_state(self.rng)
        if start_step == 0:
            kill_point(self.trainer, self.name, 0, self.run_dir, self.strategy.rank)
        self.stop_if_requested(start_step, state, saved=True)
        ema_tps = None
        for step in range(start_step, self.total_steps):
            t_data = time.perf_counter()
            micro = [next(it) for _ in range(self.accumulation)]
            data_s = time.perf_counter() - t_data  # waiting for the loader (logged; vlm.bench dataloader reads it)
            lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}
            try:
                stats = self.step(step, micro)
            except Exception as e:
                if step == start_step and is_oom(e):
                    raise BatchTooLargeError(
                        f"out of memory on the first step of stage {self.name!r} with micro_batch_size="
                        f"{self.stage.micro_batch_size}. Lower it (e.g. stage.{self.name}.micro_batch_size="
                        f"{max(1, self.stage.micro_batch_size // 2)}): global_batch_size="
                        f"{self.stage.global_batch_size} is kept by gradient accumulation. "
                        f"trainer.gradient_checkpointing=selective (or true) also saves memory.") from e
                raise
            state.losses.append(stats.loss)
            state.step_seconds.append(stats.seconds)
            tps = stats.tokens / max(stats.seconds, 1e-9)
            ema_tps = tps if ema_tps is None else 0.9 * ema_tps + 0.1 * tps
            row = {"stage": self.name, "step": step + 1, "loss": stats.loss, "grad_norm": stats.grad_norm,
                   "lr": lrs, "tokens_per_s": tps, "samples": stats.samples, "targets": stats.targets,
                   "step_s": stats.seconds, "data_s": data_s}
            if stats.metrics:
                row["objective"] = stats.metrics
            self.log.log(row, self.global_step_offset + step + 1)
            if bar is not None:
                bar.set_postfix(loss=f"{stats.loss:.4f}", tok_s=f"{ema_tps:,.0f}", refresh=False)
                bar.update(1)
            done = step + 1
            if (done % self.trainer.log_every == 0 or done == self.total_steps) and bar is None:
                extra = "".join(f" {k} {v:.3f}" for k, v in stats.metrics.items())
                self.log.info(f"[{self.name}] step {done}/{self.total_steps} loss {stats.loss:.4f} "
                              f"grad_norm {stats.grad_norm:.3f} tok/s {ema_tps:,.0f}{extra}")
            if self.evaluate and self.stage.eval_every and done % self.stage.eval_every == 0 \
                    and done != self.total_steps:
                metrics = self.evaluate(done)
                state.last_eval = metrics
                self.log.log({"stage": self.name, "step": done, "eval": metrics}, self.global_step_offset + done)
                line = f"[{self.name}] step {done} eval: " + ", ".join(
                    f"{k} {metrics[k]:.3f}" for k in score_keys(metrics))
                if bar is not None:
                    bar.write(line)
                else:
                    self.log.info(line)
            saved = bool(self.stage.save_every) and done % self.stage.save_every == 0 and done != self.total_steps
            if saved:
                self.save(done, state)
            kill_point(self.trainer, self.name, done, self.run_dir, self.strategy.rank)
            self.stop_if_requested(done, state, saved)
        if bar is not None:
            bar.close()
        return state

    def stop_if_requested(self, done: int, state: LoopState, saved: bool) -> None:
        """After SIGTERM on any process (``vlm.train.interrupt``): checkpoint step ``done`` unless ``saved``, stop."""
        if not self.strategy.all_reduce(torch.tensor([float(STOP.requested)]), op="max").item():
            return
        if not saved:
            self.save(done, state)
        raise Interrupted("TERM", f"in stage {self.name!r} after step {done}/{self.total_steps}")
