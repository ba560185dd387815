"""Training strategies over ``torch.distributed``: ``single`` (one process), ``ddp`` and ``fsdp`` (FSDP2).

One interface for the loop: ``setup`` (process group, device), ``wrap`` (DDP / ``fully_shard``), ``no_sync`` for
gradient accumulation, ``clip_grad_norm``, full (rank-0, CPU) state dicts for checkpoints and ``load_*`` to put them
back. Launch N processes with ``torchrun --nproc_per_node N -m vlm.train trainer.strategy=ddp|fsdp``; without
torchrun, ``ddp``/``fsdp`` run as a world of one (the same code path).
"""
from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from vlm.devices import resolve_device
from vlm.registry import Registry
from vlm.train.policy import layer_stack

STRATEGIES: Registry["Strategy"] = Registry("strategy")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on CUDA when supported (else fp16), fp32 on CPU."""
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision not in DTYPES:
        raise ValueError(f"trainer.precision={precision!r}; expected auto, fp32, bf16 or fp16")
    return DTYPES[precision]


class Strategy:
    """Single process. Subclasses add the process group and the wrapper.

    Capabilities (class attributes): ``distributed`` (a process group), ``shards_parameters`` (``wrap`` shards the
    parameters and places each shard on the device itself; every component trained must allow it, e.g.
    ``Objective.shardable``), ``collective_forward`` (every forward is a collective: all ranks run the same number
    of forward passes, so generation runs in lockstep).
    """

    distributed = False
    shards_parameters = False
    collective_forward = False

    def __init__(self, trainer_cfg: Any) -> None:
        self.cfg = trainer_cfg
        self.rank, self.world_size, self.local_rank = 0, 1, 0
        self.device = torch.device("cpu")
        self._own_group = False

    # -- lifecycle -------------------------------------------------------------------------------------------
    def setup(self) -> None:
        self.device = resolve_device(self.cfg.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def teardown(self) -> None:
        if self._own_group and dist.is_initialized():
            dist.destroy_process_group()
            self._own_group = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- model -----------------------------------------------------------------------------------------------
    def wrap(self, module: nn.Module, precision: torch.dtype) -> nn.Module:
        """``module``: a ``vlm.objectives.TrainModule`` (the model and the stage's objective)."""
        return module

    def no_sync(self, wrapped: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's backward: gradients are synchronized only when ``sync``."""
        return contextlib.nullcontext()

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float | None) -> float:
        """Clip (when ``max_norm``) and return the global gradient norm."""
        grads = [p for p in params if p.grad is not None]
        if not grads:
            return 0.0
        norm = torch.nn.utils.clip_grad_norm_(grads, float("inf") if max_norm is None else max_norm)
        if hasattr(norm, "full_tensor"):  # DTensor under FSDP
            norm = norm.full_tensor()
        return float(norm)

    @contextlib.contextmanager
    def inference(self, wrapped: nn.Module) -> Iterator[nn.Module]:
        """The module to call ``generate`` on (all ranks enter together)."""
        yield getattr(wrapped, "module", wrapped)

    # -- state -----------------------------------------------------------------------------------------------
    def model_state_dict(self, wrapped: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
        """Full (unsharded) CPU state dict on rank 0 (``{}`` on other ranks), keyed like the unwrapped model."""
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
        sd = get_model_state_dict(wrapped, options=opts)
        return sd if self.is_main else {}

    def load_model_state_dict(self, wrapped: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load a full state dict (needed on rank 0 only; other ranks may pass ``{}``). Keys may be a subset."""
        opts = StateDictOptions(full_state_dict=True, strict=False, broadcast_from_rank0=self.distributed)
        set_model_state_dict(wrapped, state, options=opts)

    def optimizer_state_dict(self, wrapped: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        sd = get_optimizer_state_dict(wrapped, optimizer, options=opts)
        return sd if self.is_main else {}

    def load_optimizer_state_dict(self, wrapped: nn.Module, optimizer: torch.optim.Optimizer,
                                  state: dict[str, Any]) -> None:
        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=self.distributed)
        set_optimizer_state_dict(wrapped, optimizer, state, options=opts)

    # -- collectives -----------------------------------------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.distributed:
            t = tensor.to(self.comm_device)
            dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
            return t.to(tensor.device)
        return tensor

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    @property
    def comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


STRATEGIES.register("single")(Strategy)


class DistributedStrategy(Strategy):
    """Shared process-group setup: env:// under torchrun, else a world of one."""

    distributed = True

    def setup(self) -> None:
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            self.rank, self.world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        super().setup()
        if not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            if "RANK" in os.environ:
                dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
            else:
                dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            self._own_group = True
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()


@STRATEGIES.register("ddp")
class DDPStrategy(DistributedStrategy):
    def wrap(self, module: nn.Module, precision: torch.dtype) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(module, device_ids=ids, find_unused_parameters=bool(self.cfg.ddp.find_unused_parameters))

    def no_sync(self, wrapped: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if sync else wrapped.no_sync()


@STRATEGIES.register("fsdp")
class FSDPStrategy(DistributedStrategy):
    """FSDP2: ``fully_shard`` each LLM decoder layer (and vision-tower layer), then the root (model + objective)."""

    shards_parameters = True
    collective_forward = True

    def wrap(self, module: nn.Module, precision: torch.dtype) -> nn.Module:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        fcfg = self.cfg.fsdp
        param_dtype = DTYPES[fcfg.param_dtype] if fcfg.param_dtype else precision
        mp = MixedPrecisionPolicy(param_dtype=None if param_dtype == torch.float32 else param_dtype,
                                  reduce_dtype=DTYPES[fcfg.reduce_dtype])
        kw = {"reshard_after_forward": bool(fcfg.reshard_after_forward), "mp_policy": mp}
        model = module.model
        stacks = [layer_stack(model.llm)[1]]  # the stack the LLM states (decoder_layers()), else the generic guess
        if fcfg.shard_encoder:
            stacks.append(layer_stack(model.encoder)[1])
        for stack in stacks:
            for layer in stack:
                fully_shard(layer, **kw)
        fully_shard(module, **kw)
        return module

    def no_sync(self, wrapped: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        wrapped.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def inference(self, wrapped: nn.Module) -> Iterator[nn.Module]:
        # generate() enters through submodules, which skips the root's pre-forward unshard: do it by hand
        wrapped.unshard()
        try:
            yield wrapped
        finally:
            wrapped.reshard()


def build_strategy(trainer_cfg: Any) -> Strategy:
    return STRATEGIES.get(trainer_cfg.strategy)(trainer_cfg)
