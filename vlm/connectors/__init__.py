"""Connectors: ``build(cfg, in_dim=..., out_dim=...)`` with ``cfg = {"name": ..., **kwargs}``."""
from typing import Any

from vlm.connectors.base import Connector
from vlm.connectors.registry import CONNECTORS
from vlm.connectors import identity, linear, mlp, pixel_shuffle_mlp  # noqa: F401  (registration)


def build(cfg: Any, **dims: int) -> Connector:
    return CONNECTORS.build(cfg, **dims)


__all__ = ["CONNECTORS", "Connector", "build"]
