"""CLIP vision tower (transformers ``CLIPVisionModel``). Has a CLS token: ``select=patch`` drops it."""
from __future__ import annotations

from transformers import CLIPVisionConfig, CLIPVisionModel

from vlm.encoders.hf_vision import HFVisionEncoder
from vlm.encoders.registry import ENCODERS

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@ENCODERS.register("clip")
class CLIPEncoder(HFVisionEncoder):
    model_class = CLIPVisionModel
    config_class = CLIPVisionConfig
    has_cls = True
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    # CLIPVisionEmbeddings raises on any input other than image_size x image_size unless interpolating
    native_size_only = True
