"""SigLIP vision tower (transformers ``SiglipVisionModel``). No CLS token: ``select=patch`` keeps every patch."""
from __future__ import annotations

from transformers import SiglipVisionConfig, SiglipVisionModel

from vlm.encoders.hf_vision import HFVisionEncoder
from vlm.encoders.registry import ENCODERS


@ENCODERS.register("siglip")
class SiglipEncoder(HFVisionEncoder):
    model_class = SiglipVisionModel
    config_class = SiglipVisionConfig
    has_cls = False
    image_mean = (0.5, 0.5, 0.5)
    image_std = (0.5, 0.5, 0.5)
    # the attention-pooling head only serves the contrastive objective; patch tokens never reach it
    config_overrides = {"vision_use_head": False}
