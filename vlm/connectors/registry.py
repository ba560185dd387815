"""The connector registry and ``build``: kept apart from ``vlm.connectors`` so that a connector built from other
connectors (``xattn``'s reducer) imports it without an import cycle."""
from typing import Any

import torch

from vlm.connectors.base import Connector
from vlm.dtypes import resolve_dtype
from vlm.registry import Registry, to_dict

CONNECTORS: Registry = Registry("connector", common_args=("dtype",))  # dtype: see build


def build(cfg: Any, *, default_dtype: torch.dtype | None = None, **dims: int) -> Connector:
    """Build ``cfg`` (``name`` + the connector's arguments + optional ``dtype``); ``dims`` fill ``in_dim`` /
    ``out_dim`` when ``cfg`` has none. Every connector takes ``dtype`` (e.g. ``"bfloat16"``): its parameter dtype;
    without one it gets ``default_dtype`` (``vlm.build`` passes the LLM's), else stays float32.

    Raises:
        KeyError: unknown connector name (lists the known ones).
        TypeError: an argument the connector does not take (names it and the accepted ones).
    """
    cfg = to_dict(cfg)
    dtype = resolve_dtype(cfg.pop("dtype", None)) or default_dtype
    connector = CONNECTORS.build(cfg, **dims)
    return connector.to(dtype) if dtype is not None else connector
