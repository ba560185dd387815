"""transformers ``InternVLForConditionalGeneration`` <-> ``vlm.VLM``, weight for weight.

| InternVL (transformers)                              | vlm                                                    |
| ---------------------------------------------------- | ------------------------------------------------------ |
| ``model.vision_tower`` (``InternVLVisionModel``)     | ``encoder.model`` (``internvit``; keys: ``HF_KEYS``)   |
| ``vision_config`` (norm_type, use_qk_norm, ...)      | ``internvit`` arguments (``dims_from_hf``)             |
| ``vision_feature_layer`` (int)                       | ``encoder.feature_layer``                              |
| ``vision_feature_select_strategy="default"``         | ``encoder.select="patch"`` (drops CLS)                 |
| ``downsample_ratio``                                 | ``connector.scale`` (``pixel_shuffle_mlp``)            |
| ``model.multi_modal_projector.layer_norm``           | ``connector.layers.0``                                 |
| ``model.multi_modal_projector.linear_1 / linear_2``  | ``connector.layers.1 / layers.3`` (GELU between)       |
| ``model.language_model`` + ``lm_head``               | ``llm.model.base_model`` + output embeddings           |
| ``image_token_id``, ``image_seq_length``             | ``image_token_id``, ``num_image_tokens()`` per tile    |

The original OpenGVLab checkpoints name the same tensors ``vision_model.*`` (fused ``attn.qkv``), ``mlp1.0/1/3`` and
``language_model.*``; see docs/interop.md. Only local directories are read; no remote code is ever run.
"""
from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any

import torch

from vlm import connectors
from vlm.connectors.pixel_shuffle_mlp import PixelShuffleMLP
from vlm.encoders.internvit import InternViTEncoder, dims_from_hf, dims_to_hf
from vlm.encoders.internvit_keys import hf_to_ours, ours_to_hf
from vlm.interop import common
from vlm.interop.formats import FORMATS, HFFormat
from vlm.model import VLM
from vlm.pretrained import CONFIG_FILE

INTERNVL_MODEL_TYPE = "internvl"
#: our ``pixel_shuffle_mlp`` layer (InternVL's original ``mlp1`` indices) -> transformers' projector layer
PROJECTOR_LAYERS = {"layers.0": "layer_norm", "layers.1": "linear_1", "layers.3": "linear_2"}
PROJECTOR_ACT = "gelu"  # the only activation ``pixel_shuffle_mlp`` has (exact GELU)
IMAGE_TOKEN = "<IMG_CONTEXT>"  # the image token's string when the directory has no tokenizer


def from_hf(path: str | os.PathLike, *, dtype: str | torch.dtype | None = None, tokenizer: bool = True,
            attn_implementation: str = "sdpa") -> VLM:
    """Import a local transformers ``InternVLForConditionalGeneration`` directory as a ``vlm.VLM`` (eval mode).

    The encoder is our ``internvit`` (weights renamed, ``dims_from_hf``), the connector ``pixel_shuffle_mlp``
    (``scale = downsample_ratio``), the LLM the directory's text model. Image mean/std and the tiling settings
    (``crop_to_patches``, ``min_patches``, ``max_patches``) come from the directory's image-processor config.
    """
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    path = Path(path)
    where = f"from_hf: {str(path / CONFIG_FILE)!r}"
    config = common.read_hf_config(path, InternVLConfig, INTERNVL_MODEL_TYPE, InternVLForConditionalGeneration)
    if config.vision_feature_select_strategy != "default":
        raise ValueError(f"{where}: vision_feature_select_strategy={config.vision_feature_select_strategy!r}; "
                         f"InternVL's pixel shuffle needs the CLS token dropped ('default')")
    if not isinstance(config.vision_feature_layer, int):
        raise ValueError(f"{where}: vision_feature_layer={config.vision_feature_layer!r}; expected one int")
    if config.projector_hidden_act != PROJECTOR_ACT:
        raise ValueError(f"{where}: projector_hidden_act={config.projector_hidden_act!r}; pixel_shuffle_mlp has "
                         f"{PROJECTOR_ACT!r} only")
    hf, torch_dtype = common.load_checkpoint(InternVLForConditionalGeneration, path, dtype)

    encoder, image_processor, image_processor_file = common.import_encoder(path, None, {
        "name": "internvit", **dims_from_hf(common.arch_config(config.vision_config), where),
        "feature_layer": config.vision_feature_layer, "select": "patch", "dtype": common.dtype_name(torch_dtype)})
    lm = common.import_llm(config.text_config, common.is_tied(hf), attn_implementation, torch_dtype)
    connector = connectors.build({"name": "pixel_shuffle_mlp", "scale": float(config.downsample_ratio)},
                                 in_dim=encoder.hidden_size, out_dim=lm.hidden_size).to(torch_dtype)
    with torch.no_grad():
        common.copy_state(encoder.model, hf_to_ours(hf.model.vision_tower.state_dict()), "from_hf: vision tower")
        common.copy_projector(connector, hf.model.multi_modal_projector, PROJECTOR_LAYERS, to_hf=False)
        common.copy_language_model(lm, hf, to_hf=False)
    del hf

    from vlm.interop.internvl_processor import (
        PROCESSOR_CLASS,
        check_image_seq_length,
        import_chat_template,
        processor_class,
        read_tiling,
    )

    def prepare(model: VLM) -> None:
        if model.num_image_tokens() != config.image_seq_length:
            raise ValueError(f"{where}: image_seq_length={config.image_seq_length}, but a {encoder.image_size} px "
                             f"tile gives {model.num_image_tokens()} tokens after the pixel shuffle")
        check_image_seq_length(path, model.num_image_tokens())
        # images written as the directory's InternVLProcessor serves them
        import_chat_template(path, model.tokenizer, model.image_token)

    tiling = partial(read_tiling, always_crops=processor_class(path) == PROCESSOR_CLASS)
    return common.assemble(path, config, encoder, connector, lm, image_token_id=int(config.image_token_id),
                           tokenizer=tokenizer, image_processor=image_processor,
                           image_processor_file=image_processor_file, image_token=IMAGE_TOKEN, prepare=prepare,
                           preprocessing=tiling)


# ----------------------------------------------------------------------------------------------------- export
def internvl_problems(model: VLM) -> list[str]:
    """Why ``model`` cannot be written as a transformers InternVL checkpoint (empty when it can)."""
    problems = []
    enc, conn, lm = model.encoder, model.connector, model.llm
    if not isinstance(enc, InternViTEncoder):
        problems.append(f"the encoder is {common.part_name(enc)!r}; InternVL's vision tower is 'internvit'")
    elif not enc.drops_first:
        problems.append(f"the encoder select={enc.select!r} keeps the CLS token; InternVL drops it ('patch')")
    if not isinstance(conn, PixelShuffleMLP):
        problems.append(f"the connector is {common.part_name(conn)!r}; InternVL's projector is 'pixel_shuffle_mlp'")
    elif conn.options.get("head", "mlp") != "mlp" or conn.options.get("bias") not in (None, True) \
            or conn.options.get("reducer", "shuffle") != "shuffle":
        problems.append(f"the pixel_shuffle_mlp connector has head={conn.options.get('head')!r}, bias="
                        f"{conn.options.get('bias')!r}, reducer={conn.options.get('reducer')!r}; InternVL's projector "
                        f"is a shuffle + LayerNorm + 2-layer MLP with bias (head='mlp')")
    elif conn.options.get("hidden_dim") not in (None, conn.out_dim):
        problems.append(f"the connector hidden_dim={conn.options['hidden_dim']} differs from the LLM width "
                        f"{conn.out_dim}; InternVL's projector is LayerNorm -> Linear(in, D) -> GELU -> Linear(D, D)")
    return problems + common.lm_problems(lm, "InternVL", "InternVLForConditionalGeneration")


def internvl_config(model: VLM) -> Any:
    """The ``InternVLConfig`` describing ``model`` (``ValueError`` listing what InternVL cannot express)."""
    from vlm.interop.formats import all_problems

    common.refuse_export(all_problems(InternVLFormat, model), "InternVL")
    from transformers import InternVLConfig

    enc, conn = model.encoder, model.connector
    return InternVLConfig(
        vision_config=dims_to_hf(enc.dims), text_config=common.text_config_for_export(model.llm, model),
        image_token_id=model.image_token_id, image_seq_length=model.num_image_tokens(),
        downsample_ratio=float(conn.scale), projector_hidden_act=PROJECTOR_ACT,
        vision_feature_layer=enc.feature_layer, vision_feature_select_strategy="default",
        tie_word_embeddings=common.is_tied(model.llm.model))


def to_hf(model: VLM, path: str | os.PathLike, *, dtype: str | torch.dtype | None = None,
          processor: bool = True) -> Path:
    """Write ``model`` as a transformers ``InternVLForConditionalGeneration`` directory (safetensors).

    ``dtype``: dtype of the written weights (default: the LLM's). With ``processor`` (default) also writes the
    ``InternVLProcessor`` files (image processor with the tiling settings, tokenizer with the named image tokens,
    chat template; see ``vlm.interop.internvl_processor``)."""
    from transformers import InternVLForConditionalGeneration

    config = internvl_config(model)
    enc, conn, lm = model.encoder, model.connector, model.llm
    hf = common.new_hf_model(config, InternVLForConditionalGeneration, common.export_dtype(lm, dtype))
    with torch.no_grad():
        common.copy_state(hf.model.vision_tower, ours_to_hf(enc.model.state_dict()), "to_hf: vision tower")
        common.copy_projector(conn, hf.model.multi_modal_projector, PROJECTOR_LAYERS, to_hf=True)
        common.copy_language_model(lm, hf, to_hf=True)
    common.check_tying(lm, hf, "InternVL")
    out = Path(path)
    common.save_hf(hf, model, out)
    del hf
    if processor:
        from vlm.interop.internvl_processor import save_processor

        save_processor(model, out)
    return out


@FORMATS.register("internvl")
class InternVLFormat(HFFormat):
    """transformers ``InternVLForConditionalGeneration`` (InternVL 1.5 / 2 / 2.5 / 3 layout)."""

    model_type = INTERNVL_MODEL_TYPE
    hf_class = "InternVLForConditionalGeneration"
    from_hf = staticmethod(from_hf)
    to_hf = staticmethod(to_hf)
    problems = staticmethod(internvl_problems)
