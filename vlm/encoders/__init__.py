"""Vision encoders: ``build(cfg)`` with ``cfg = {"name": ..., **kwargs}``."""
from typing import Any

from vlm.encoders.base import VisionEncoder
from vlm.encoders.registry import ENCODERS
from vlm.encoders import clip, internvit, siglip, siglip2, timm_tower  # noqa: F401  (registration)


def build(cfg: Any) -> VisionEncoder:
    return ENCODERS.build(cfg)


__all__ = ["ENCODERS", "VisionEncoder", "build"]
