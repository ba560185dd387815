"""Processor files for an exported directory (LLaVA, BLIP-2: what ``AutoProcessor`` and serving engines read).

Written in the long-standing hub layout, which transformers 4.x and 5.x both load:
``preprocessor_config.json`` (the image processor), tokenizer files, and a flat ``processor_config.json``
(``processor_class`` and the processor's options: LLaVA's ``patch_size``, ``vision_feature_select_strategy``,
``num_additional_image_tokens``, ``image_token``; BLIP-2's ``num_query_tokens``).

The image processor follows the model's record of its preprocessing (``VLM.image_preprocessing``), not the encoder
family: its PIL backend gives vlm's pixels exactly (transformers' torchvision backend rounds bicubic differently).
"""
from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import transformers
from transformers import CLIPImageProcessor, LlavaImageProcessor
from transformers.image_utils import PILImageResampling

from vlm.interop.chat_template import tokenizer_for_export
from vlm.persistence import DEFAULT_IMAGE_PREPROCESSING
from vlm.pretrained import IMAGE_PROCESSOR_CONFIG, PROCESSOR_CONFIG

BICUBIC = int(PILImageResampling.BICUBIC)


def _squash(size: int, **common: Any) -> Any:
    """``resize``: squash to ``size x size``, no crop (``crop_size`` only states the output size)."""
    square = {"height": size, "width": size}
    return CLIPImageProcessor(size=square, crop_size=square, do_center_crop=False, **common)


def _crop(size: int, **common: Any) -> Any:
    """``crop``: shortest edge to ``size`` (long side floored), then a centred ``size x size`` crop (CLIP)."""
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              do_center_crop=True, **common)


def _pad(size: int, **common: Any) -> Any:
    """``pad``: pad to a centred square filled with ``int(255 * image_mean)``, then resize (LLaVA's
    ``expand2square``, ``LlavaImageProcessor(do_pad=True)``)."""
    square = {"height": size, "width": size}
    return LlavaImageProcessor(do_pad=True, size=square, crop_size=square, do_center_crop=False, **common)


# vlm ImageProcessor resize_mode -> the transformers image processor computing the same pixels (PIL backend)
HF_IMAGE_PROCESSORS: dict[str, Callable[..., Any]] = {"resize": _squash, "crop": _crop, "pad": _pad}


def pixel_options(encoder: Any) -> dict[str, Any]:
    """The transformers image-processor options that give vlm's pixel values once an image is resized: bicubic
    resampling, RGB, ``/ 255``, then the encoder's ``image_mean`` / ``image_std`` (every exported processor)."""
    return {"image_mean": [float(m) for m in encoder.image_mean], "image_std": [float(s) for s in encoder.image_std],
            "resample": BICUBIC, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "do_convert_rgb": True}


def hf_image_processor(model: Any) -> Any:
    """The transformers image processor giving the pixels vlm's ``Processor.for_model(model, ...)`` gives: geometry
    from ``model.image_preprocessing`` (``resize_mode``, ``pad_color``), size and mean/std from the encoder. Warns
    when a ``pad_color`` differs from LLaVA's fixed ``int(255 * image_mean)`` (the padding then differs)."""
    encoder = model.encoder
    record = getattr(model, "image_preprocessing", None) or DEFAULT_IMAGE_PREPROCESSING
    mode = record.get("resize_mode", DEFAULT_IMAGE_PREPROCESSING["resize_mode"])
    if mode not in HF_IMAGE_PROCESSORS:
        raise ValueError(f"to_hf: model.image_preprocessing has resize_mode={mode!r}; expected one of "
                         f"{sorted(HF_IMAGE_PROCESSORS)}")
    size = encoder.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    options = pixel_options(encoder)
    pad_color = record.get("pad_color")
    llava_color = [int(m * 255) for m in options["image_mean"]]
    if mode == "pad" and pad_color is not None and [int(c) for c in pad_color] != llava_color:
        warnings.warn(f"to_hf: the model pads images with pad_color={list(pad_color)}, but LlavaImageProcessor "
                      f"always pads with int(255 * image_mean) = {llava_color}; the exported processor's padding "
                      f"differs from vlm's (retrain with the default pad_color for exact parity)", stacklevel=3)
    return HF_IMAGE_PROCESSORS[mode](size, **options)


def processor_problem(tokenizer: Any, image_token: str, image_token_id: int) -> str | None:
    """Why ``LlavaProcessor`` / ``Blip2Processor`` cannot use this tokenizer (``None`` when it can): they encode
    ``image_token`` (the tokenizer's own ``image_token`` attribute when it has one) and take the ids as they come,
    so the token must be a single id equal to the model's ``image_token_id``."""
    if not hasattr(tokenizer, "encode"):
        return f"the tokenizer ({type(tokenizer).__name__}) has no encode()"
    token = tokenizer.image_token if hasattr(tokenizer, "image_token") else image_token
    if not isinstance(token, str):
        return f"the tokenizer's image_token attribute is {token!r}, not a string"
    ids = tokenizer.encode(token, add_special_tokens=False)
    if list(ids) != [image_token_id]:
        return (f"the tokenizer encodes the image token {token!r} as {list(ids)}, not as the single id "
                f"{image_token_id} (the model's image_token_id); add it as a special token first")
    return None


def save_processor(model: Any, path: Path, *, processor_class: type, options: dict[str, Any],
                   image_token: str, image_processor: Any = None, parts: dict[str, Any] | None = None) -> bool:
    """Write the image processor, the tokenizer (if ``model.tokenizer``) and, when the tokenizer allows it, a flat
    ``processor_config.json`` naming ``processor_class`` (e.g. ``LlavaProcessor``, ``Blip2Processor``) with its
    ``options``. The processor class must find ``image_token`` as the single id ``model.image_token_id`` in the
    tokenizer; it is constructed once (on a copy of the tokenizer) to validate the combination exactly as
    ``AutoProcessor`` will on load. ``parts``: the processor's other sub-processors (e.g. ``video_processor``),
    saved by the caller, passed to that construction. For a model that takes videos, the chat template written
    renders a ``{"type": "video"}`` part as ``model.video_token`` (``vlm.interop.chat_template``). Returns whether
    the full processor was written; warns saying why when not."""
    import copy

    image_processor = image_processor if image_processor is not None else hf_image_processor(model)
    image_processor.save_pretrained(str(path))
    tokenizer = tokenizer_for_export(model)  # a video-taking model's template writes its video parts
    if tokenizer is None:
        warnings.warn(f"to_hf: model.tokenizer is not set, so {str(path)!r} gets no tokenizer and no "
                      f"{PROCESSOR_CONFIG} (only {IMAGE_PROCESSOR_CONFIG}); AutoProcessor and serving engines need "
                      f"both: attach a tokenizer and export again", stacklevel=3)
        return False
    tokenizer.save_pretrained(str(path))
    problem = processor_problem(tokenizer, image_token, model.image_token_id)
    if problem is not None:
        warnings.warn(f"to_hf: no {PROCESSOR_CONFIG} written to {str(path)!r}: {problem}", stacklevel=3)
        return False
    try:
        processor_class(image_processor=image_processor, tokenizer=copy.deepcopy(tokenizer), **(parts or {}),
                        **options)
    except (TypeError, ValueError, AttributeError) as e:
        warnings.warn(f"to_hf: no {PROCESSOR_CONFIG} written to {str(path)!r}: transformers' "
                      f"{processor_class.__name__} rejects this tokenizer / image processor: {e}", stacklevel=3)
        return False
    config = {"processor_class": processor_class.__name__, **options}
    (path / PROCESSOR_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return True


def save_llava_processor(model: Any, path: Path, *, strategy: str) -> bool:
    """``save_processor`` for ``LlavaProcessor``: ``image_token``, ``patch_size``, ``num_additional_image_tokens``
    (1 for a tower with CLS) and ``vision_feature_select_strategy``."""
    from transformers import LlavaProcessor

    encoder = model.encoder
    options = {"image_token": model.image_token, "patch_size": int(encoder.patch_size),
               "num_additional_image_tokens": int(encoder.has_cls), "vision_feature_select_strategy": strategy}
    return save_processor(model, path, processor_class=LlavaProcessor, options=options,
                          image_token=model.image_token)


def save_llava_next_processor(model: Any, path: Path, *, strategy: str) -> bool:
    """``save_processor`` for ``LlavaNextProcessor``: ``LlavaNextImageProcessorPil`` (the ``anyres`` tiles of the
    model's arrangement's pinpoints: a base view squashed to ``S x S``, then the image resized keeping its aspect
    ratio, padded centred in black and cut into ``S x S`` tiles; vlm's pixels), and LLaVA's processor options."""
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    encoder = model.encoder
    size = encoder.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, do_center_crop=True, do_pad=True,
        image_grid_pinpoints=[list(p) for p in model.arrangement.options["pinpoints"]], **pixel_options(encoder))
    options = {"image_token": model.image_token, "patch_size": int(encoder.patch_size),
               "num_additional_image_tokens": int(encoder.has_cls), "vision_feature_select_strategy": strategy}
    return save_processor(model, path, processor_class=LlavaNextProcessor, options=options,
                          image_token=model.image_token, image_processor=image_processor)


def save_llava_onevision_processor(model: Any, path: Path, *, strategy: str, vision_aspect_ratio: str) -> bool:
    """``save_processor`` for ``LlavaOnevisionProcessor``: ``LlavaOnevisionImageProcessorPil`` (the ``anyres``
    tiles of the arrangement's pinpoints for an image alone in its sample; one view padded to a square with the
    mean colour for each image of a multi-image sample), ``LlavaOnevisionVideoProcessor`` (frames resized to ``S x
    S``), and the processor's options: ``num_image_tokens`` (one view's tokens as the tower returns them, the CLS
    token counted under 'default'), ``vision_feature_select_strategy``, ``vision_aspect_ratio``, the image and
    video tokens."""
    from transformers import LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )
    from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

    encoder, arr = model.encoder, model.arrangement
    size = int(arr.tile_size)
    square = {"height": size, "width": size}
    pixels = pixel_options(encoder)
    image_processor = LlavaOnevisionImageProcessorPil(
        size=square, do_pad=True, image_grid_pinpoints=[list(p) for p in arr.options["pinpoints"]], **pixels)
    video_processor = LlavaOnevisionVideoProcessor(size=square, **{k: v for k, v in pixels.items()
                                                                   if k != "resample"}, resample=pixels["resample"])
    video_processor.save_pretrained(str(path))
    gh, gw = arr.tile_grid
    options = {"image_token": model.image_token, "video_token": model.video_token,
               "num_image_tokens": gh * gw + int(strategy == "default"),
               "vision_feature_select_strategy": strategy, "vision_aspect_ratio": vision_aspect_ratio}
    return save_processor(model, path, processor_class=LlavaOnevisionProcessor, options=options,
                          image_token=model.image_token, image_processor=image_processor,
                          parts={"video_processor": video_processor})


def _square(d: Any) -> int | None:
    """``n`` for a ``{"height": n, "width": n}`` size (or a bare int), else ``None``."""
    if isinstance(d, int):
        return d
    if isinstance(d, dict) and d.get("height") is not None and d.get("height") == d.get("width"):
        return int(d["height"])
    return None


def read_preprocessing(config: dict[str, Any] | None, image_size: int, where: str) -> dict[str, Any]:
    """The ``image_preprocessing`` record (``resize_mode``) whose vlm pixels equal those of the transformers
    image-processor ``config`` for a ``image_size`` encoder: ``do_pad`` on a processor that pads to a square
    (``pad_to_square``, LLaVA) -> ``pad``; shortest edge + center crop -> ``crop``; a square ``height``/``width``
    resize -> ``resize``. Unset keys take the class defaults. Warns (naming ``where``) when vlm's processor can
    only approximate it (other sizes, a non-bicubic resample, no resize) and records the closest mode."""
    if not config:
        return dict(DEFAULT_IMAGE_PREPROCESSING)
    name = str(config.get("image_processor_type") or "")
    cls = getattr(transformers, name, None) if name.isidentifier() else None

    def get(key: str) -> Any:
        return config[key] if key in config else getattr(cls, key, None)

    size, crop_size = get("size"), get("crop_size")
    shortest = size.get("shortest_edge") if isinstance(size, dict) else size if isinstance(size, int) else None
    crops = bool(get("do_center_crop"))
    problems = []
    if get("do_pad") and hasattr(cls, "pad_to_square"):
        mode, out = "pad", [shortest if shortest is not None else _square(size)]
    elif crops and shortest is not None:
        mode, out = "crop", [shortest]
    else:
        mode, out = "resize", [_square(size)]
        if shortest is not None:
            problems.append(f"size={size} keeps the aspect ratio without a crop (non-square pixels)")
    if crops:
        out.append(_square(crop_size))
    if any(o != image_size for o in out):
        problems.append(f"size={size}, crop_size={crop_size if crops else None} differ from the encoder's "
                        f"{image_size} x {image_size}")
    resample = get("resample")
    if resample is not None and int(resample) != BICUBIC:
        problems.append(f"resample={resample} is not bicubic ({BICUBIC})")
    if get("do_resize") is False:
        problems.append("do_resize=False")
    if problems:
        warnings.warn(f"from_hf: vlm's image processor approximates {where} with resize_mode={mode!r}: "
                      + "; ".join(problems), stacklevel=3)
    return {"resize_mode": mode}
