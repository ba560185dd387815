"""transformers ``LlavaOnevisionForConditionalGeneration`` <-> ``vlm.VLM``, weight for weight.

LLaVA-OneVision is LLaVA-NeXT's layout (``vlm.interop.llava_arranged``: LLaVA's tower / projector / LLM +
``image_newline``) with the ``onevision`` arrangement (``vlm.arrangements.onevision``): an image alone in its sample
is anyres tiles unpadded and pooled past ``anyres_max_N``; each image of a multi-image sample is one view + a newline;
a video's frames are pooled 2x2 (bilinear), then one newline.

| LLaVA-OneVision                                      | vlm                                                  |
| ---------------------------------------------------- | ---------------------------------------------------- |
| LLaVA's tower / projector / language model           | as ``vlm.interop.llava``                             |
| ``image_grid_pinpoints``                             | ``arrangement.options["pinpoints"]`` (``anyres``)    |
| ``vision_aspect_ratio = "anyres_max_N"``             | ``arrangement.options["max_tiles"] = N``             |
| ``model.image_newline`` ``(D,)``                     | ``arrangement.image_newline``                        |
| ``image_token_id`` / ``video_token_id``              | ``model.image_token_id`` / ``model.video_token_id``  |
| processor ``pixel_values (N, max_views, 3, S, S)``   | taken whole, with ``image_sizes (N, 2)``             |
| processor ``batch_num_images (B,)``                  | taken (which images share their sample)              |
| video processor ``pixel_values_videos (M, F, 3, S, S)`` | taken whole (``VLM.arranged_video_features``)     |

Only local directories are read; weights come from safetensors (or ``torch.load(weights_only=True)``); no remote
code is ever run.
"""
from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import torch

from vlm.interop import common
from vlm.interop.formats import FORMATS, HFFormat
from vlm.interop.llava_arranged import arranged_problems, export_arranged, import_arranged
from vlm.interop.mapping import ACT_TO_HF, SELECT_TO_LLAVA
from vlm.model import VLM
from vlm.pretrained import CONFIG_FILE

LLAVA_ONEVISION_MODEL_TYPE = "llava_onevision"
#: the arrangement a LLaVA-OneVision model has (transformers always unpads, adds image_newline, pools frames 2x2)
ARRANGEMENT = {"name": "onevision", "unpad": True, "newline": True, "video_pool": 2}
#: ``vision_aspect_ratio``: transformers reads the budget N of ``anyres_max_N`` (and nothing else)
ASPECT_RATIO = re.compile(r"anyres_max_([1-9][0-9]*)")


def max_tiles_of(vision_aspect_ratio: Any, where: str) -> int:
    """``N`` of ``"anyres_max_N"``; ``ValueError`` naming ``where`` and the key for anything else."""
    match = ASPECT_RATIO.fullmatch(str(vision_aspect_ratio))
    if match is None:
        raise ValueError(f"{where}: vision_aspect_ratio={vision_aspect_ratio!r}; expected 'anyres_max_N' with N >= 1 "
                         f"tiles (LLaVA-OneVision's budget, e.g. 'anyres_max_9')")
    return int(match.group(1))


def from_hf(path: str | os.PathLike, *, dtype: str | torch.dtype | None = None, tokenizer: bool = True,
            attn_implementation: str = "sdpa") -> VLM:
    """Import a local transformers ``LlavaOnevisionForConditionalGeneration`` directory as a ``vlm.VLM`` (eval
    mode): LLaVA's parts + the ``onevision`` arrangement of the config's ``image_grid_pinpoints`` and
    ``vision_aspect_ratio`` holding ``image_newline``; ``video_token_id`` kept, so the model takes
    ``pixel_values_videos``. ``ValueError`` naming the config key for a pinpoint that is not a whole number of tiles,
    a ``vision_aspect_ratio`` other than ``anyres_max_N``, or selected features without a grid."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    path = Path(path)
    config = common.read_hf_config(path, LlavaOnevisionConfig, LLAVA_ONEVISION_MODEL_TYPE,
                                   LlavaOnevisionForConditionalGeneration)
    max_tiles = max_tiles_of(config.vision_aspect_ratio, f"from_hf: {str(path / CONFIG_FILE)!r}")
    arrangement = {**ARRANGEMENT, "pinpoints": config.image_grid_pinpoints, "max_tiles": max_tiles}
    return import_arranged(path, config, LlavaOnevisionForConditionalGeneration, arrangement, dtype=dtype,
                           tokenizer=tokenizer, attn_implementation=attn_implementation,
                           keys=f"image_grid_pinpoints={common.short_list(config.image_grid_pinpoints)}, "
                                f"vision_aspect_ratio="
                                f"{config.vision_aspect_ratio!r}",
                           video_token_id=int(config.video_token_id))


def llava_onevision_problems(model: VLM) -> list[str]:
    """Why ``model`` cannot be written as a LLaVA-OneVision checkpoint (empty when it can): the arrangement unpads,
    adds ``image_newline``, pools frames 2x2 and has a tile budget (``max_tiles``); the model has a video token."""
    problems = arranged_problems(model, "LLaVA-OneVision", "LlavaOnevisionForConditionalGeneration",
                                 {"unpad": True, "newline": True, "video_pool": 2})
    arr = getattr(model, "arrangement", None)
    if arr is not None and getattr(arr, "registry_name", None) == ARRANGEMENT["name"] \
            and arr.options.get("max_tiles") is None:
        problems.append("the onevision arrangement has max_tiles=null; LLaVA-OneVision states a budget "
                        "(vision_aspect_ratio='anyres_max_N')")
    if getattr(model, "video_token_id", None) is None:
        problems.append("the model has no video_token_id; LLaVA-OneVision has one (build it with the onevision "
                        "arrangement, which adds <video>)")
    return problems


def llava_onevision_config(model: VLM) -> Any:
    """The ``LlavaOnevisionConfig`` describing ``model`` (``ValueError`` listing what OneVision cannot express)."""
    from vlm.interop.formats import all_problems

    common.refuse_export(all_problems(LlavaOnevisionFormat, model), "LLaVA-OneVision")
    from transformers import LlavaOnevisionConfig

    enc, conn, lm, arr = model.encoder, model.connector, model.llm, model.arrangement
    return LlavaOnevisionConfig(
        vision_config=common.arch_config(enc.hf_config), text_config=common.text_config_for_export(lm, model),
        image_token_id=model.image_token_id, video_token_id=model.video_token_id,
        vision_feature_layer=enc.feature_layer, vision_feature_select_strategy=SELECT_TO_LLAVA[enc.drops_first],
        projector_hidden_act=ACT_TO_HF[conn.options["act"]], multimodal_projector_bias=bool(conn.options["bias"]),
        image_grid_pinpoints=copy.deepcopy(arr.options["pinpoints"]),
        vision_aspect_ratio=f"anyres_max_{arr.options['max_tiles']}", tie_word_embeddings=common.is_tied(lm.model))


def to_hf(model: VLM, path: str | os.PathLike, *, dtype: str | torch.dtype | None = None,
          processor: bool = True) -> Path:
    """Write ``model`` as a transformers ``LlavaOnevisionForConditionalGeneration`` directory (safetensors) and
    return it. ``dtype``: of the written weights (default: the LLM's). With ``processor`` (default) also writes
    the image processor (vlm's anyres pixels: written from ``LlavaOnevisionImageProcessorPil``; transformers 5
    records it as ``LlavaOnevisionImageProcessor``, so load it with ``backend="pil"`` for vlm's pixels exactly),
    ``LlavaOnevisionVideoProcessor``, the tokenizer (if
    ``model.tokenizer``; its chat template) and the ``LlavaOnevisionProcessor`` config (when the tokenizer encodes
    the image token as the single ``image_token_id``; otherwise it warns and skips just that file)."""
    from transformers import LlavaOnevisionForConditionalGeneration

    from vlm.interop.processor import save_llava_onevision_processor

    config = llava_onevision_config(model)
    save = (lambda m, out: save_llava_onevision_processor(m, out, strategy=config.vision_feature_select_strategy,
                                                          vision_aspect_ratio=config.vision_aspect_ratio)) \
        if processor else None
    return export_arranged(model, Path(path), config, LlavaOnevisionForConditionalGeneration, "LLaVA-OneVision",
                           dtype, save)


@FORMATS.register("llava_onevision")
class LlavaOnevisionFormat(HFFormat):
    """transformers ``LlavaOnevisionForConditionalGeneration`` (LLaVA-OneVision: anyres_max tiles, multi-image,
    video)."""

    model_type = LLAVA_ONEVISION_MODEL_TYPE
    hf_class = "LlavaOnevisionForConditionalGeneration"
    arrangement = ARRANGEMENT["name"]
    from_hf = staticmethod(from_hf)
    to_hf = staticmethod(to_hf)
    problems = staticmethod(llava_onevision_problems)
