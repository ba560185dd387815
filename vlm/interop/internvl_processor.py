"""Processor files of an exported InternVL directory: ``InternVLProcessor`` = ``GotOcr2ImageProcessorPil`` (squash
to the tile size; with tiling, InternVL's dynamic tiles + thumbnail: ``crop_to_patches``, ``min_patches``,
``max_patches``), the tokenizer with its named image tokens (``start_image_token`` ``<img>``, ``end_image_token``
``</img>``, ``context_image_token`` = the model's image token), and the chat template.

``InternVLProcessor`` writes ``<img>`` + context token x (``image_seq_length`` x tiles) + ``</img>`` where the prompt
holds the context token once; vlm's ``Processor`` does the same when its template has ``image_start="<img>"``,
``image_end="</img>"`` (both single tokens). The exported chat template therefore writes each image as the context
token alone. Its PIL backend gives vlm's pixels exactly: load it with ``AutoProcessor.from_pretrained(dir,
backend="pil")`` (transformers' default torchvision backend rounds bicubic resizes differently).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from vlm.interop.processor import BICUBIC
from vlm.model import DEFAULT_IMAGE_PREPROCESSING

START, END, VIDEO = "<img>", "</img>", "<video>"
#: the named tokens ``InternVLProcessor`` reads from the tokenizer (written into ``tokenizer_config.json``)
NAMED_TOKENS = ("start_image_token", "end_image_token", "context_image_token", "video_token")


def read_tiling(config: dict[str, Any] | None, image_size: int, where: str) -> dict[str, Any]:
    """The ``image_preprocessing`` record of a GotOcr2 / InternVL image-processor ``config``: ``resize`` to the tile
    size, plus ``tiling`` (dynamic, thumbnail on) when ``crop_to_patches`` and ``max_patches > 1``. Warns (naming
    ``where``) about a size other than the tower's or a non-bicubic resample."""
    if not config:
        return dict(DEFAULT_IMAGE_PREPROCESSING)
    size = config.get("size") or {}
    side = size.get("height") if isinstance(size, dict) else size
    if side is not None and (int(side) != image_size or (isinstance(size, dict) and size.get("width") != side)):
        warnings.warn(f"from_hf: {where} resizes to {size}, not the tower's {image_size} x {image_size}; vlm "
                      f"uses {image_size}", stacklevel=3)
    if config.get("resample") is not None and int(config["resample"]) != BICUBIC:
        warnings.warn(f"from_hf: {where} has resample={config['resample']}; vlm resizes bicubic", stacklevel=3)
    record: dict[str, Any] = dict(DEFAULT_IMAGE_PREPROCESSING)
    lo, hi = int(config.get("min_patches", 1)), int(config.get("max_patches", 12))
    if config.get("crop_to_patches") and hi > 1:
        record["tiling"] = {"kind": "dynamic", "min_tiles": lo, "max_tiles": hi, "thumbnail": True}
    return record


def processor_problems(model: Any) -> list[str]:
    """Why the exported ``InternVLProcessor`` could not preprocess as vlm does (empty when it can)."""
    problems = []
    record = getattr(model, "image_preprocessing", None) or DEFAULT_IMAGE_PREPROCESSING
    if record.get("resize_mode", "resize") != "resize":
        problems.append(f"resize_mode={record['resize_mode']!r}: InternVL's image processor squashes ('resize')")
    tiling = record.get("tiling")
    if tiling is not None and (tiling.get("kind") != "dynamic" or not tiling.get("thumbnail", True)):
        problems.append(f"tiling={tiling}: InternVL's image processor does dynamic tiling with a thumbnail only")
    tok = model.tokenizer
    if tok is None:
        return problems + ["model.tokenizer is not set"]
    for token in (START, END, model.image_token):
        ids = tok.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            problems.append(f"the tokenizer encodes {token!r} as {ids}, not one token")
    template = tok.chat_template or ""
    if f"{START}{model.image_token}{END}" not in template:
        problems.append(f"the chat template does not write images as {START}{model.image_token}{END} (train with "
                        f"a template whose image_start/image_end are {START}/{END})")
    return problems


def hf_image_processor(model: Any) -> Any:
    """The ``GotOcr2ImageProcessorPil`` computing vlm's pixels for ``model`` (tile size, mean/std, tiling)."""
    from transformers import GotOcr2ImageProcessorPil

    enc = model.encoder
    size = int(enc.image_size)
    tiling = (getattr(model, "image_preprocessing", None) or {}).get("tiling")
    extra = {"crop_to_patches": False}
    if tiling is not None:
        extra = {"crop_to_patches": True, "min_patches": int(tiling.get("min_tiles", 1)),
                 "max_patches": int(tiling.get("max_tiles", 12))}
    return GotOcr2ImageProcessorPil(size={"height": size, "width": size}, image_mean=list(enc.image_mean),
                                    image_std=list(enc.image_std), resample=BICUBIC, do_resize=True,
                                    do_rescale=True, rescale_factor=1 / 255, do_normalize=True, do_convert_rgb=True,
                                    **extra)


def save_processor(model: Any, path: Path) -> bool:
    """Write the ``InternVLProcessor`` files (or, when ``processor_problems`` finds any, only the image processor
    and the tokenizer, with a warning saying why). Returns whether the full processor was written."""
    image_processor = hf_image_processor(model)
    problems = processor_problems(model)
    if problems:
        image_processor.save_pretrained(str(path))
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(str(path))
        warnings.warn(f"to_hf: no InternVLProcessor written to {str(path)!r}: " + "; ".join(problems), stacklevel=3)
        return False
    from transformers import AutoTokenizer, InternVLProcessor
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor

    model.tokenizer.save_pretrained(str(path))
    cfg_file = path / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(dict(zip(NAMED_TOKENS, (START, END, model.image_token, VIDEO))))
    cfg_file.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    # each image is the context token alone: InternVLProcessor adds <img> ... </img> itself
    template = model.tokenizer.chat_template.replace(f"{START}{model.image_token}{END}", model.image_token)
    processor = InternVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                  video_processor=InternVLVideoProcessor(), image_seq_length=model.num_image_tokens(),
                                  chat_template=template)
    processor.save_pretrained(str(path))
    return True
