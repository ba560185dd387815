"""BLIP-2's vision tower (transformers ``Blip2VisionModel``: EVA ViT-g/14 in the published checkpoints). Has a CLS
token; BLIP-2's Q-Former reads every token (``select: all``) of the last layer.

Features are ``hidden_states[feature_layer]``, taken *before* the tower's ``post_layernorm`` as for every transformers
tower here: BLIP-2 applies that LayerNorm (LAVIS's ``ln_vision``) to what the Q-Former reads, and the ``qformer``
connector owns it as its ``input_norm`` (``vlm.interop.blip2`` maps the weights both ways). The tower's own
``post_layernorm`` is then unused by the features (frozen in training, like CLIP's).

Differences from the base class: a tower built from dimensions initializes with std 0.02 (``Blip2VisionConfig``'s
default ``initializer_range`` of 1e-10 would start a tower trained from scratch with near-zero weights); image
mean/std are OpenAI CLIP's, as BLIP-2's image processor uses.
"""
from __future__ import annotations

from transformers import Blip2VisionConfig, Blip2VisionModel

from vlm.encoders.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from vlm.encoders.hf_vision import HFVisionEncoder
from vlm.encoders.registry import ENCODERS


@ENCODERS.register("blip2")
class Blip2Encoder(HFVisionEncoder):
    model_class = Blip2VisionModel
    config_class = Blip2VisionConfig
    has_cls = True
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    # Blip2VisionModel.from_pretrained finds nothing in a full BLIP-2 directory (its tower is under vision_model.)
    pretrained_hint = ("; for a full BLIP-2 checkpoint save its tower first: python -c \"from vlm.interop import "
                       "from_hf; from_hf('BLIP2_DIR').encoder.model.save_pretrained('TOWER_DIR')\"")

    @staticmethod
    def dims_config(**dims: int) -> dict[str, int | float]:
        return {**dims, "initializer_range": 0.02}
