"""transformers ``LlavaNextForConditionalGeneration`` <-> ``vlm.VLM``, weight for weight.

LLaVA-NeXT is LLaVA's parts (``vlm.interop.llava``: tower, ``mlp`` projector, LLM) with the ``anyres`` image layout
(``vlm.data.layouts.anyres``: a base view + the best pinpoint's tiles) and the ``anyres_grid`` arrangement
(``vlm.arrangements.anyres_grid``: tile tokens on their spatial grid, unpadded, ``image_newline`` after each row).

| LLaVA-NeXT                                          | vlm                                                   |
| --------------------------------------------------- | ----------------------------------------------------- |
| LLaVA's tower / projector / language model          | as ``vlm.interop.llava``                              |
| ``image_grid_pinpoints``                            | ``arrangement.pinpoints`` (and the ``anyres`` layout) |
| ``model.image_newline`` ``(D,)``                    | ``arrangement.image_newline``                         |
| processor ``pixel_values (N, max_views, 3, S, S)``  | taken whole, with ``image_sizes (N, 2)``              |

The imported model takes what ``LlavaNextProcessor`` returns (``pixel_values`` padded per image, ``image_sizes``)
and what vlm's processor returns (every image's views concatenated, ``image_sizes``). Only local directories are
read; weights come from safetensors (or ``torch.load(weights_only=True)``); no remote code is ever run.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch

from vlm.interop import common
from vlm.interop.formats import FORMATS, HFFormat
from vlm.interop.llava_arranged import arranged_problems, export_arranged, import_arranged
from vlm.interop.mapping import ACT_TO_HF, SELECT_TO_LLAVA
from vlm.model import VLM

LLAVA_NEXT_MODEL_TYPE = "llava_next"
#: the arrangement a LLaVA-NeXT model has (its options: transformers always unpads and adds image_newline)
ARRANGEMENT = {"name": "anyres_grid", "unpad": True, "newline": True}


def from_hf(path: str | os.PathLike, *, dtype: str | torch.dtype | None = None, tokenizer: bool = True,
            attn_implementation: str = "sdpa") -> VLM:
    """Import a local transformers ``LlavaNextForConditionalGeneration`` directory as a ``vlm.VLM`` (eval mode):
    LLaVA's parts (``vlm.interop.llava.import_parts``) + the ``anyres_grid`` arrangement of the config's
    ``image_grid_pinpoints`` holding ``image_newline`` (``vlm.interop.llava_arranged.import_arranged``);
    ``model.image_preprocessing`` records the ``anyres`` tiling, so ``Processor.for_model`` (and ``model.chat``)
    lays images out as ``LlavaNextProcessor`` does. ``ValueError`` naming the config key when a pinpoint is not a
    whole number of tiles or the selected features have no grid (``vision_feature_select_strategy='full'`` on a
    tower with a CLS token, which transformers cannot run either)."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    path = Path(path)
    config = common.read_hf_config(path, LlavaNextConfig, LLAVA_NEXT_MODEL_TYPE, LlavaNextForConditionalGeneration)
    return import_arranged(path, config, LlavaNextForConditionalGeneration,
                           {**ARRANGEMENT, "pinpoints": config.image_grid_pinpoints}, dtype=dtype,
                           tokenizer=tokenizer, attn_implementation=attn_implementation,
                           keys=f"image_grid_pinpoints={common.short_list(config.image_grid_pinpoints)}")


def llava_next_problems(model: VLM) -> list[str]:
    """Why ``model`` cannot be written as a LLaVA-NeXT checkpoint (empty when it can): LLaVA-NeXT always unpads and
    adds image_newline, and never pools (``max_tiles: null``)."""
    return arranged_problems(model, "LLaVA-NeXT", "LlavaNextForConditionalGeneration",
                             {"unpad": True, "newline": True, "max_tiles": None})


def llava_next_config(model: VLM) -> Any:
    """The ``LlavaNextConfig`` describing ``model`` (``ValueError`` listing what LLaVA-NeXT cannot express)."""
    from vlm.interop.formats import all_problems

    common.refuse_export(all_problems(LlavaNextFormat, model), "LLaVA-NeXT")
    from transformers import LlavaNextConfig

    enc, conn, lm, arr = model.encoder, model.connector, model.llm, model.arrangement
    return LlavaNextConfig(
        vision_config=common.arch_config(enc.hf_config), text_config=common.text_config_for_export(lm, model),
        image_token_id=model.image_token_id, vision_feature_layer=enc.feature_layer,
        vision_feature_select_strategy=SELECT_TO_LLAVA[enc.drops_first],
        projector_hidden_act=ACT_TO_HF[conn.options["act"]], multimodal_projector_bias=bool(conn.options["bias"]),
        image_grid_pinpoints=copy.deepcopy(arr.options["pinpoints"]), image_seq_length=model.num_image_tokens(),
        tie_word_embeddings=common.is_tied(lm.model))


def to_hf(model: VLM, path: str | os.PathLike, *, dtype: str | torch.dtype | None = None,
          processor: bool = True) -> Path:
    """Write ``model`` as a transformers ``LlavaNextForConditionalGeneration`` directory (safetensors) and return
    it. ``dtype``: of the written weights (default: the LLM's). With ``processor`` (default) also writes
    ``LlavaNextImageProcessorPil`` (vlm's anyres pixels), the tokenizer (if ``model.tokenizer``) and the
    ``LlavaNextProcessor`` config (when the tokenizer encodes the image token as the single ``image_token_id``;
    otherwise it warns and skips just that file)."""
    from transformers import LlavaNextForConditionalGeneration

    from vlm.interop.processor import save_llava_next_processor

    config = llava_next_config(model)
    save = (lambda m, out: save_llava_next_processor(m, out, strategy=config.vision_feature_select_strategy)) \
        if processor else None
    return export_arranged(model, Path(path), config, LlavaNextForConditionalGeneration, "LLaVA-NeXT", dtype, save)


@FORMATS.register("llava_next")
class LlavaNextFormat(HFFormat):
    """transformers ``LlavaNextForConditionalGeneration`` (LLaVA-NeXT / LLaVA-1.6: anyres tiles)."""

    model_type = LLAVA_NEXT_MODEL_TYPE
    hf_class = "LlavaNextForConditionalGeneration"
    arrangement = ARRANGEMENT["name"]
    from_hf = staticmethod(from_hf)
    to_hf = staticmethod(to_hf)
    problems = staticmethod(llava_next_problems)
