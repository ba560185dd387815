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
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlm import connectors, encoders
from vlm import llm as llms
from vlm.connectors.pixel_shuffle_mlp import PixelShuffleMLP
from vlm.dtypes import resolve_dtype
from vlm.encoders.internvit import InternViTEncoder, dims_from_hf, dims_to_hf
from vlm.encoders.internvit_keys import hf_to_ours, ours_to_hf
from vlm.hf_config import unknown_config_keys
from vlm.interop.common import (
    arch_config,
    copy_language_model,
    copy_state,
    dtype_name,
    export_generation,
    is_tied,
    lm_problems,
    load_strict,
    load_tokenizer,
    read_generation,
    text_config_for_export,
)
from vlm.interop.formats import FORMATS, HFFormat
from vlm.model import VLM
from vlm.pretrained import CONFIG_FILE, check_weights, normalization, read_config, read_image_processor_config

INTERNVL_MODEL_TYPE = "internvl"
#: transformers' projector layer -> our ``pixel_shuffle_mlp`` layer (InternVL's original ``mlp1`` indices)
PROJECTOR_LAYERS = {"layer_norm": "layers.0", "linear_1": "layers.1", "linear_2": "layers.3"}
PROJECTOR_ACT = "gelu"  # the only activation ``pixel_shuffle_mlp`` has (exact GELU)


def read_internvl_config(path: Path, who: str = "from_hf") -> dict[str, Any]:
    cfg = read_config(path, who, "the config.json of a transformers InternVLForConditionalGeneration (model_type "
                                 "'internvl') saved with save_pretrained")
    if cfg.get("model_type") != INTERNVL_MODEL_TYPE:
        raise ValueError(f"{who}: {str(path / CONFIG_FILE)!r} has model_type={cfg.get('model_type')!r}; expected "
                         f"'internvl' (InternVLForConditionalGeneration)")
    return cfg


def _load(path: Path, dtype: torch.dtype) -> nn.Module:
    """``InternVLForConditionalGeneration.from_pretrained`` (local files, ``weights_only``); any missing or
    shape-mismatched weight is an error naming the keys (``common.load_strict``)."""
    from transformers import InternVLForConditionalGeneration

    return load_strict(InternVLForConditionalGeneration, path, dtype)


def from_hf(path: str | os.PathLike, *, dtype: str | torch.dtype | None = None, tokenizer: bool = True,
            attn_implementation: str = "sdpa") -> VLM:
    """Import a local transformers ``InternVLForConditionalGeneration`` directory as a ``vlm.VLM`` (eval mode).

    The encoder is our ``internvit`` (weights renamed, ``dims_from_hf``), the connector ``pixel_shuffle_mlp``
    (``scale = downsample_ratio``), the LLM the directory's text model. Image mean/std and the tiling settings
    (``crop_to_patches``, ``min_patches``, ``max_patches``) come from the directory's image-processor config.
    """
    from transformers import InternVLConfig

    path = Path(path)
    raw = read_internvl_config(path)
    where = f"from_hf: {str(path / CONFIG_FILE)!r}"
    try:
        config = InternVLConfig.from_dict(raw)
    except Exception as e:  # transformers' strict config validation has its own exception types
        raise ValueError(f"{where} is not a valid InternVLConfig: {e}") from e
    if config.vision_feature_select_strategy != "default":
        raise ValueError(f"{where}: vision_feature_select_strategy={config.vision_feature_select_strategy!r}; "
                         f"InternVL's pixel shuffle needs the CLS token dropped ('default')")
    if not isinstance(config.vision_feature_layer, int):
        raise ValueError(f"{where}: vision_feature_layer={config.vision_feature_layer!r}; expected one int")
    if config.projector_hidden_act != PROJECTOR_ACT:
        raise ValueError(f"{where}: projector_hidden_act={config.projector_hidden_act!r}; pixel_shuffle_mlp has "
                         f"{PROJECTOR_ACT!r} only")
    torch_dtype = resolve_dtype(dtype) or torch.float32
    check_weights(path, "from_hf")
    hf = _load(path, torch_dtype)
    tied = is_tied(hf)

    enc_cfg: dict[str, Any] = {"name": "internvit", **dims_from_hf(arch_config(config.vision_config), where),
                               "feature_layer": config.vision_feature_layer, "select": "patch",
                               "dtype": dtype_name(torch_dtype)}
    image_processor, image_processor_file = read_image_processor_config(path) or (None, path)
    norm = normalization(image_processor)
    if norm is not None:
        enc_cfg["image_mean"], enc_cfg["image_std"] = norm
    encoder = encoders.build(enc_cfg)
    text_cfg = arch_config(config.text_config)
    text_cfg["tie_word_embeddings"] = tied
    lm_cfg: dict[str, Any] = {"name": "hf_causal_lm", "config": text_cfg, "attn_implementation": attn_implementation,
                              "dtype": dtype_name(torch_dtype)}
    if unknown_config_keys(type(config.text_config), text_cfg):
        lm_cfg["strict_config"] = False
    lm = llms.build(lm_cfg)
    connector = connectors.build({"name": "pixel_shuffle_mlp", "scale": float(config.downsample_ratio)},
                                 in_dim=encoder.hidden_size, out_dim=lm.hidden_size).to(torch_dtype)
    with torch.no_grad():
        copy_state(encoder.model, hf_to_ours(hf.model.vision_tower.state_dict()), "from_hf: vision tower")
        proj = hf.model.multi_modal_projector
        copy_state(connector, {f"{ours}.{k}": v for theirs, ours in PROJECTOR_LAYERS.items()
                               for k, v in getattr(proj, theirs).state_dict().items()}, "from_hf: projector")
        copy_language_model(lm, hf, to_hf=False)
    del hf

    tok = load_tokenizer(path) if tokenizer else None
    image_token_id = int(config.image_token_id)
    image_token = "<IMG_CONTEXT>"
    if tok is not None and image_token_id < len(tok):
        image_token = tok.convert_ids_to_tokens(image_token_id) or image_token
    model = VLM(encoder, connector, lm, image_token_id=image_token_id, image_token=image_token)
    if model.num_image_tokens() != config.image_seq_length:
        raise ValueError(f"{where}: image_seq_length={config.image_seq_length}, but a {encoder.image_size} px tile "
                         f"gives {model.num_image_tokens()} tokens after the pixel shuffle")
    from vlm.interop.internvl_processor import (
        PROCESSOR_CLASS,
        check_image_seq_length,
        import_chat_template,
        processor_class,
        read_tiling,
    )

    check_image_seq_length(path, model.num_image_tokens())
    import_chat_template(path, tok, image_token)  # images written as the directory's InternVLProcessor serves them
    model.tokenizer = tok
    model.generation = read_generation(path, config, tok)
    model.image_preprocessing = read_tiling(image_processor, encoder.image_size, str(image_processor_file),
                                            always_crops=processor_class(path) == PROCESSOR_CLASS)
    return model.eval()


# ----------------------------------------------------------------------------------------------------- export
def internvl_problems(model: VLM) -> list[str]:
    """Why ``model`` cannot be written as a transformers InternVL checkpoint (empty when it can)."""
    problems = []
    enc, conn, lm = model.encoder, model.connector, model.llm
    if not isinstance(enc, InternViTEncoder):
        problems.append(f"the encoder is {enc.component_name!r}; InternVL's vision tower is 'internvit'")
    elif not enc.drops_first:
        problems.append(f"the encoder select={enc.select!r} keeps the CLS token; InternVL drops it ('patch')")
    if not isinstance(conn, PixelShuffleMLP):
        name = getattr(conn, "registry_name", type(conn).__name__)
        problems.append(f"the connector is {name!r}; InternVL's projector is 'pixel_shuffle_mlp'")
    elif conn.options.get("hidden_dim") not in (None, conn.out_dim):
        problems.append(f"the connector hidden_dim={conn.options['hidden_dim']} differs from the LLM width "
                        f"{conn.out_dim}; InternVL's projector is LayerNorm -> Linear(in, D) -> GELU -> Linear(D, D)")
    return problems + lm_problems(lm, "InternVL", "InternVLForConditionalGeneration")


def internvl_config(model: VLM) -> Any:
    """The ``InternVLConfig`` describing ``model`` (``ValueError`` listing what InternVL cannot express)."""
    problems = internvl_problems(model)
    if problems:
        raise ValueError("to_hf: this model cannot be exported as transformers InternVL: " + "; ".join(problems))
    from transformers import InternVLConfig

    enc, conn = model.encoder, model.connector
    return InternVLConfig(
        vision_config=dims_to_hf(enc.dims), text_config=text_config_for_export(model.llm, model),
        image_token_id=model.image_token_id, image_seq_length=model.num_image_tokens(),
        downsample_ratio=float(conn.scale), projector_hidden_act=PROJECTOR_ACT,
        vision_feature_layer=enc.feature_layer, vision_feature_select_strategy="default",
        tie_word_embeddings=is_tied(model.llm.model))


def to_hf(model: VLM, path: str | os.PathLike, *, dtype: str | torch.dtype | None = None,
          processor: bool = True) -> Path:
    """Write ``model`` as a transformers ``InternVLForConditionalGeneration`` directory (safetensors).

    ``dtype``: dtype of the written weights (default: the LLM's). With ``processor`` (default) also writes the
    ``InternVLProcessor`` files (image processor with the tiling settings, tokenizer with the named image tokens,
    chat template; see ``vlm.interop.internvl_processor``)."""
    from transformers import AutoModelForImageTextToText, InternVLForConditionalGeneration

    config = internvl_config(model)
    enc, conn, lm = model.encoder, model.connector, model.llm
    torch_dtype = resolve_dtype(dtype) or next(lm.parameters()).dtype
    hf = AutoModelForImageTextToText.from_config(config, dtype=torch_dtype)
    assert isinstance(hf, InternVLForConditionalGeneration), type(hf)
    with torch.no_grad():
        copy_state(hf.model.vision_tower, ours_to_hf(enc.model.state_dict()), "to_hf: vision tower")
        state = conn.state_dict()
        proj = {f"{theirs}.{k.removeprefix(ours + '.')}": v for theirs, ours in PROJECTOR_LAYERS.items()
                for k, v in state.items() if k.startswith(ours + ".")}
        copy_state(hf.model.multi_modal_projector, proj, "to_hf: projector")
        copy_language_model(lm, hf, to_hf=True)
    if is_tied(lm.model) != is_tied(hf):
        raise RuntimeError(f"to_hf: embedding tying differs after export (vlm tied={is_tied(lm.model)}, "
                           f"InternVL tied={is_tied(hf)})")
    for key, value in export_generation(model).items():
        setattr(hf.generation_config, key, value)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out), safe_serialization=True)
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
