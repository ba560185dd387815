"""Processor files for an exported LLaVA directory (what ``AutoProcessor`` and serving engines read).

Written in the long-standing llava-hf layout, which transformers 4.x and 5.x both load:
``preprocessor_config.json`` (the image processor), tokenizer files, and a flat ``processor_config.json``
(``processor_class``, ``patch_size``, ``vision_feature_select_strategy``, ``num_additional_image_tokens``,
``image_token``).
"""
from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import CLIPImageProcessor, SiglipImageProcessor

from vlm.encoders.base import VisionEncoder
from vlm.pretrained import IMAGE_PROCESSOR_CONFIG, PROCESSOR_CONFIG


def clip_image_processor(encoder: VisionEncoder) -> CLIPImageProcessor:
    """Resize the shortest edge to ``image_size`` (bicubic) then center-crop the square, as CLIP / LLaVA-1.5 do."""
    s = int(encoder.image_size)
    return CLIPImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s}, do_center_crop=True,
                              image_mean=list(encoder.image_mean), image_std=list(encoder.image_std),
                              do_convert_rgb=True)


def siglip_image_processor(encoder: VisionEncoder) -> SiglipImageProcessor:
    """Resize to ``image_size`` x ``image_size`` (bicubic, no crop), as SigLIP does."""
    s = int(encoder.image_size)
    return SiglipImageProcessor(size={"height": s, "width": s}, image_mean=list(encoder.image_mean),
                                image_std=list(encoder.image_std), do_convert_rgb=True)


# our encoder registry name -> the family's transformers image processor
IMAGE_PROCESSORS: dict[str, Callable[[VisionEncoder], Any]] = {
    "clip": clip_image_processor,
    "siglip": siglip_image_processor,
}


def processor_problem(tokenizer: Any, image_token: str, image_token_id: int) -> str | None:
    """Why ``LlavaProcessor`` cannot use this tokenizer (``None`` when it can): it encodes ``image_token`` and
    takes the first id, so the token must be a single id equal to the model's ``image_token_id``."""
    if not hasattr(tokenizer, "encode"):
        return f"the tokenizer ({type(tokenizer).__name__}) has no encode()"
    # LlavaProcessor prefers the tokenizer's own ``image_token`` attribute when it has one
    token = tokenizer.image_token if hasattr(tokenizer, "image_token") else image_token
    if not isinstance(token, str):
        return f"the tokenizer's image_token attribute is {token!r}, not a string"
    ids = tokenizer.encode(token, add_special_tokens=False)
    if list(ids) != [image_token_id]:
        return (f"the tokenizer encodes the image token {token!r} as {list(ids)}, not as the single id "
                f"{image_token_id} (the model's image_token_id); add it as a special token first")
    return None


def save_processor(model: Any, path: Path, *, strategy: str) -> bool:
    """Write the image processor, the tokenizer (if ``model.tokenizer``) and, when the tokenizer allows it, the
    ``LlavaProcessor`` config. Returns whether the full processor was written; warns saying why when it was not."""
    encoder = model.encoder
    image_processor = IMAGE_PROCESSORS[encoder.registry_name](encoder)
    image_processor.save_pretrained(str(path))
    tokenizer = model.tokenizer
    if tokenizer is None:
        warnings.warn(f"to_hf: model.tokenizer is not set, so {str(path)!r} gets no tokenizer and no "
                      f"{PROCESSOR_CONFIG} (only {IMAGE_PROCESSOR_CONFIG}); AutoProcessor and serving engines need "
                      f"both: attach a tokenizer and export again", stacklevel=3)
        return False
    tokenizer.save_pretrained(str(path))
    problem = processor_problem(tokenizer, model.image_token, model.image_token_id)
    if problem is not None:
        warnings.warn(f"to_hf: no {PROCESSOR_CONFIG} written to {str(path)!r}: {problem}", stacklevel=3)
        return False
    from transformers import LlavaProcessor

    # constructing it validates the combination exactly as AutoProcessor will on load
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=encoder.patch_size,
                   vision_feature_select_strategy=strategy, image_token=model.image_token,
                   num_additional_image_tokens=int(encoder.has_cls))
    config = {
        "processor_class": "LlavaProcessor",
        "image_token": model.image_token,
        "patch_size": int(encoder.patch_size),
        "num_additional_image_tokens": int(encoder.has_cls),
        "vision_feature_select_strategy": strategy,
    }
    (path / PROCESSOR_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return True
