"""dtype names shared by every component (encoders, connectors, LLMs, interop): no component imports another
to parse ``dtype: bfloat16``; and a module's own dtype (``param_dtype``)."""
from __future__ import annotations

import torch
from torch import nn


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"`` -> ``torch.bfloat16``; a ``torch.dtype`` or ``None`` passes through.

    Raises:
        ValueError: the name is not a torch dtype (names the value and gives examples).
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        value = getattr(torch, dtype)
    except AttributeError:
        value = None
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; expected e.g. 'float32', 'bfloat16', 'float16'")
    return value


def param_dtype(module: nn.Module, default: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype of ``module``'s first floating-point parameter (``default`` when it has none)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), default)
