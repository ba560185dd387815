"""Connectors: ``build(cfg, in_dim=..., out_dim=...)`` with ``cfg = {"name": ..., **kwargs}``.

Every connector also takes ``dtype`` (e.g. ``"bfloat16"``): its parameter dtype. Without one it gets ``default_dtype``
(``vlm.build`` passes the LLM's), else stays float32. ``VLM`` casts features at each boundary, so the encoder,
connector and LLM may each have their own dtype.
"""
from typing import Any

import torch

from vlm.connectors.base import Connector
from vlm.connectors.registry import CONNECTORS
from vlm.connectors import (  # noqa: F401  (registration)
    identity, linear, mlp, perceiver, pixel_shuffle_mlp, qformer, resampler, xattn)
from vlm.encoders.hf_vision import resolve_dtype
from vlm.registry import to_dict


def build(cfg: Any, *, default_dtype: torch.dtype | None = None, **dims: int) -> Connector:
    """Build ``cfg`` (``name`` + the connector's arguments + optional ``dtype``); ``dims`` fill ``in_dim`` /
    ``out_dim`` when ``cfg`` has none."""
    cfg = to_dict(cfg)
    dtype = resolve_dtype(cfg.pop("dtype", None)) or default_dtype
    connector = CONNECTORS.build(cfg, **dims)
    return connector.to(dtype) if dtype is not None else connector


__all__ = ["CONNECTORS", "Connector", "build"]
