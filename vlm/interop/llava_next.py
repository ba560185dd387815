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

from vlm import arrangements
from vlm.interop import common
from vlm.interop.formats import FORMATS, HFFormat
from vlm.interop.llava import export_parts, import_parts, parts_problems
from vlm.interop.mapping import ACT_TO_HF, SELECT_TO_LLAVA
from vlm.model import VLM
from vlm.pretrained import CONFIG_FILE

LLAVA_NEXT_MODEL_TYPE = "llava_next"
#: the arrangement a LLaVA-NeXT model has (its options: transformers always unpads and adds image_newline)
ARRANGEMENT = {"name": "anyres_grid", "unpad": True, "newline": True}


def from_hf(path: str | os.PathLike, *, dtype: str | torch.dtype | None = None, tokenizer: bool = True,
            attn_implementation: str = "sdpa") -> VLM:
    """Import a local transformers ``LlavaNextForConditionalGeneration`` directory as a ``vlm.VLM`` (eval mode):
    LLaVA's parts (``vlm.interop.llava.import_parts``) + the ``anyres_grid`` arrangement of the config's
    ``image_grid_pinpoints`` holding ``image_newline``; ``model.image_preprocessing`` records the ``anyres`` tiling,
    so ``Processor.for_model`` (and ``model.chat``) lays images out as ``LlavaNextProcessor`` does. ``ValueError``
    naming the config key when a pinpoint is not a whole number of tiles or the selected features have no grid
    (``vision_feature_select_strategy='full'`` on a tower with a CLS token, which transformers cannot run either)."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    path = Path(path)
    config = common.read_hf_config(path, LlavaNextConfig, LLAVA_NEXT_MODEL_TYPE, LlavaNextForConditionalGeneration)
    where = f"from_hf: {str(path / CONFIG_FILE)!r}"
    parts = import_parts(path, config, LlavaNextForConditionalGeneration, dtype, attn_implementation)
    arrangement = arrangements.build({**ARRANGEMENT, "pinpoints": config.image_grid_pinpoints},
                                     dim=parts.lm.hidden_size).to(parts.dtype)
    try:
        arrangement.attach(parts.encoder, parts.connector)
    except ValueError as e:
        raise ValueError(f"{where} (image_grid_pinpoints={config.image_grid_pinpoints}, vision_config.image_size="
                         f"{config.vision_config.image_size}, vision_feature_select_strategy="
                         f"{config.vision_feature_select_strategy!r}): {e}") from None
    with torch.no_grad():
        arrangement.image_newline.copy_(parts.hf.model.image_newline)
    hf_processor = parts.image_processor
    parts = parts._replace(hf=None)
    tiling = arrangement.layout()

    def preprocessing(image_processor: Any, image_size: int, where: str) -> dict[str, Any]:
        return {"resize_mode": "resize", "tiling": tiling}

    return common.assemble(path, config, parts.encoder, parts.connector, parts.lm,
                           image_token_id=int(config.image_token_id), tokenizer=tokenizer,
                           image_processor=hf_processor, image_processor_file=parts.image_processor_file,
                           preprocessing=preprocessing, arrangement=arrangement)


def llava_next_problems(model: VLM) -> list[str]:
    """Why ``model`` cannot be written as a LLaVA-NeXT checkpoint (empty when it can)."""
    problems = []
    arr = getattr(model, "arrangement", None)
    if arr is None or getattr(arr, "registry_name", None) != ARRANGEMENT["name"]:
        pass  # vlm.interop.formats.all_problems names it
    elif not (arr.options["unpad"] and arr.options["newline"]) or arr.options.get("max_tiles") is not None:
        problems.append(f"the anyres_grid arrangement has unpad={arr.options['unpad']}, newline="
                        f"{arr.options['newline']}, max_tiles={arr.options.get('max_tiles')}; LLaVA-NeXT always "
                        f"unpads and adds image_newline, and never pools (max_tiles: null)")
    elif getattr(model.encoder, "has_cls", False) and not model.encoder.drops_first:
        problems.append("the encoder keeps its CLS token (select='all'); LLaVA-NeXT arranges the patch grid only "
                        "(select='patch')")
    return problems + parts_problems(model, "LLaVA-NeXT", "LlavaNextForConditionalGeneration")


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

    config = llava_next_config(model)
    common.warn_fixed_size(model.encoder, "LlavaNextConfig")
    out = Path(path)
    hf = common.new_hf_model(config, LlavaNextForConditionalGeneration, common.export_dtype(model.llm, dtype))
    export_parts(model, hf, "LLaVA-NeXT")
    with torch.no_grad():
        hf.model.image_newline.copy_(model.arrangement.image_newline)
    common.save_hf(hf, model, out)
    del hf
    if processor:
        from vlm.interop.processor import save_llava_next_processor

        save_llava_next_processor(model, out, strategy=config.vision_feature_select_strategy)
    return out


@FORMATS.register("llava_next")
class LlavaNextFormat(HFFormat):
    """transformers ``LlavaNextForConditionalGeneration`` (LLaVA-NeXT / LLaVA-1.6: anyres tiles)."""

    model_type = LLAVA_NEXT_MODEL_TYPE
    hf_class = "LlavaNextForConditionalGeneration"
    arrangement = ARRANGEMENT["name"]
    from_hf = staticmethod(from_hf)
    to_hf = staticmethod(to_hf)
    problems = staticmethod(llava_next_problems)
