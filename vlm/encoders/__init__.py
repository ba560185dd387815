"""Vision encoders: ``build(cfg)`` with ``cfg = {"name": ..., **kwargs}``."""
from typing import Any

from vlm.encoders.base import VisionEncoder
from vlm.encoders.registry import ENCODERS
from vlm.encoders import (  # noqa: F401  (registration)
    blip2, clip, idefics3_vision, internvit, open_clip_tower, qwen2_vl_vit, siglip, siglip2, timm_tower)


def build(cfg: Any) -> VisionEncoder:
    return ENCODERS.build(cfg)


__all__ = ["ENCODERS", "VisionEncoder", "build"]
