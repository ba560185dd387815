"""Connectors: ``build(cfg, in_dim=..., out_dim=...)`` with ``cfg = {"name": ..., **kwargs}``.

Every connector also takes ``dtype`` (e.g. ``"bfloat16"``): its parameter dtype. Without one it gets ``default_dtype``
(``vlm.build`` passes the LLM's), else stays float32. ``VLM`` casts features at each boundary, so the encoder,
connector and LLM may each have their own dtype.
"""
from vlm.connectors import (  # noqa: F401  (registration)
    identity,
    linear,
    mlp,
    patch_merger,
    perceiver,
    pixel_shuffle_mlp,
    qformer,
    resampler,
    xattn,
)
from vlm.connectors.base import Connector
from vlm.connectors.registry import CONNECTORS, build

__all__ = ["CONNECTORS", "Connector", "build"]
