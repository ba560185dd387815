"""Optimizer parameter groups (per-module learning rates, no weight decay on norms / biases / embeddings),
optimizers and learning-rate schedules (linear warmup, then cosine / linear / constant)."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vlm.registry import Registry
from vlm.train.schema import MODULES, StageConfig

OPTIMIZERS: Registry[torch.optim.Optimizer] = Registry("optimizer")
SCHEDULES: Registry[Callable[..., float]] = Registry("scheduler")


# Normalization layers whose parameters are exempt from weight decay. torch's norm classes share no base class, nor
# do the families' own (transformers' ``*RMSNorm``, timm's ``LayerNorm2d``...), so this is a registry: a family whose
# norm has a multi-dimensional affine parameter adds its class with ``register_norm``. A norm's 1-D scale and shift
# need no entry: every parameter with fewer than 2 dimensions is exempt anyway (``no_decay_names``), which is what
# covers every RMSNorm-style class by what it holds rather than by its name.
NORM_TYPES: list[type[nn.Module]] = [nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm,
                                     nn.modules.batchnorm._NormBase]


def register_norm(cls: type[nn.Module]) -> type[nn.Module]:
    """Add a normalization class to ``NORM_TYPES`` (usable as a class decorator)."""
    if cls not in NORM_TYPES:
        NORM_TYPES.append(cls)
    return cls


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, tuple(NORM_TYPES))


def no_decay_names(module: nn.Module) -> set[str]:
    """Parameter names (relative to ``module``) exempt from weight decay: biases, norm weights, embedding tables,
    and any other parameter with fewer than 2 dimensions (CLS / position vectors, scales)."""
    out: set[str] = set()
    for mod_name, mod in module.named_modules():
        exempt = is_norm(mod) or isinstance(mod, nn.Embedding)
        for p_name, p in mod.named_parameters(recurse=False):
            if exempt or p_name == "bias" or p.ndim < 2 or "embedding" in p_name:
                out.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    return out


def param_groups(model: nn.Module, stage: StageConfig, objective: nn.Module | None = None) -> list[dict[str, Any]]:
    """One group per (module, decay / no-decay) holding that module's trainable parameters.

    Each group carries ``name`` (``"llm.decay"``, ``"connector.no_decay"``, ...), ``lr`` (``stage.module_lr.<module>``
    or ``stage.lr``), ``weight_decay`` (``stage.weight_decay`` or 0) and ``param_names``. Empty groups are dropped.
    The stage's ``objective`` (its own parameters, if any) trains at ``stage.lr`` in groups ``objective_head.*`` (the
    name its parameters have in checkpoints).
    """
    groups = []
    parts = [(m, getattr(model, m)) for m in MODULES]
    if getattr(model, "arrangement", None) is not None:  # trains with the connector (its lr)
        parts.append(("arrangement", model.arrangement))
    if objective is not None:
        parts.append(("objective_head", objective))
    for module_name, module in parts:
        exempt = no_decay_names(module)
        lr_of = "connector" if module_name == "arrangement" else module_name
        lr = getattr(stage.module_lr, lr_of) if lr_of in MODULES else None
        lr = float(stage.lr if lr is None else lr)
        buckets: dict[str, tuple[list[str], list[nn.Parameter]]] = {"decay": ([], []), "no_decay": ([], [])}
        for name, p in module.named_parameters():
            if p.requires_grad:
                names, params = buckets["no_decay" if name in exempt else "decay"]
                names.append(f"{module_name}.{name}")
                params.append(p)
        for kind, (names, params) in buckets.items():
            if params:
                groups.append({"name": f"{module_name}.{kind}", "params": params, "param_names": names, "lr": lr,
                               "weight_decay": float(stage.weight_decay) if kind == "decay" else 0.0})
    if not groups:
        raise ValueError("the stage's policies leave no trainable parameter (every module frozen?)")
    return groups


@OPTIMIZERS.register("adamw")
def adamw(groups: list[dict[str, Any]], stage: StageConfig, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=float(stage.lr), betas=tuple(stage.betas), eps=float(stage.eps),
                             foreach=device.type == "cuda")


@OPTIMIZERS.register("sgd")
def sgd(groups: list[dict[str, Any]], stage: StageConfig, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=float(stage.lr), momentum=float(stage.betas[0]))


def build_optimizer(model: nn.Module, stage: StageConfig, device: torch.device,
                    objective: nn.Module | None = None) -> torch.optim.Optimizer:
    groups = param_groups(model, stage, objective)
    optimizer = OPTIMIZERS.get(stage.optimizer)(
        [{k: v for k, v in g.items() if k != "param_names"} for g in groups], stage, device)
    optimizer.param_names = [g["param_names"] for g in groups]  # type: ignore[attr-defined]
    return optimizer


@SCHEDULES.register("cosine")
def cosine(progress: float, min_ratio: float) -> float:
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@SCHEDULES.register("linear")
def linear(progress: float, min_ratio: float) -> float:
    return min_ratio + (1.0 - min_ratio) * (1.0 - progress)


@SCHEDULES.register("constant")
def constant(progress: float, min_ratio: float) -> float:
    return 1.0


def warmup_steps(stage: StageConfig, total_steps: int) -> int:
    if stage.warmup_steps is not None:
        return int(stage.warmup_steps)
    return int(math.ceil(float(stage.warmup_ratio) * total_steps))


def lr_multiplier(step: int, total_steps: int, warmup: int, schedule: str, min_ratio: float = 0.0) -> float:
    """LR factor at optimizer step ``step`` (0-based): linear warmup to 1 over ``warmup`` steps, then decay."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    decay_steps = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    return SCHEDULES.get(schedule)(progress, min_ratio)


def build_scheduler(optimizer: torch.optim.Optimizer, stage: StageConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    SCHEDULES.get(stage.scheduler)  # fail early on an unknown name
    warm = warmup_steps(stage, total_steps)
    schedule, min_ratio = str(stage.scheduler), float(stage.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, total_steps, warm, schedule, min_ratio))
