"""Import an original OpenGVLab InternVL checkpoint (``model_type: internvl_chat``, the remote-code
``InternVLChatModel`` of InternVL 1.5 / 2 / 2.5 / 3) without running its code: the config is read as data and the
tensors are renamed.

| original                                            | vlm                                                  |
| --------------------------------------------------- | ---------------------------------------------------- |
| ``vision_config`` (``InternVisionConfig``)          | ``internvit`` arguments                              |
| ``vision_model.*`` (fused ``attn.qkv``, ``ls1``...) | ``encoder.model.*`` (``internvit_keys``)           |
| ``select_layer``, ``downsample_ratio``              | ``encoder.feature_layer``, ``connector.scale``       |
| ``mlp1.0`` / ``mlp1.1`` / ``mlp1.3``                | ``connector.layers.0`` / ``layers.1`` / ``layers.3`` |
| ``language_model.*`` (``llm_config``)               | ``llm.model.*`` (a transformers causal LM)           |
| ``<IMG_CONTEXT>`` (the tokenizer's id)              | ``image_token`` / ``image_token_id``                 |
| ``dynamic_image_size``, ``min/max_dynamic_patch``   | ``image_preprocessing.tiling``                       |

Only ``ps_version: v2`` (every InternVL >= 1.5) is the pixel shuffle ``pixel_shuffle_mlp`` computes; an LLM that
needs remote code (InternLM2) is refused with the way out. Export goes to the transformers layout (format
``internvl``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from vlm import connectors, encoders
from vlm import llm as llms
from vlm.dtypes import resolve_dtype
from vlm.encoders.internvit import IMAGENET_MEAN, IMAGENET_STD
from vlm.encoders.internvit_keys import original_to_ours
from vlm.interop.common import dtype_name, load_tokenizer
from vlm.interop.formats import FORMATS, HFFormat
from vlm.model import VLM
from vlm.pretrained import CONFIG_FILE, FILE_KEYS, load_strict, read_config, read_weights

MODEL_TYPE = "internvl_chat"
IMG_CONTEXT = "<IMG_CONTEXT>"
#: the original ``InternVisionConfig`` key -> ``internvit`` argument, and the original's default
VISION_KEYS = {"hidden_size": ("hidden_size", 3200), "num_hidden_layers": ("num_layers", 48),
               "num_attention_heads": ("num_heads", 25), "intermediate_size": ("intermediate_size", 12800),
               "image_size": ("image_size", 224), "patch_size": ("patch_size", 14),
               "norm_type": ("norm_type", "rms_norm"), "layer_norm_eps": ("norm_eps", 1e-6),
               "qkv_bias": ("qkv_bias", False), "qk_normalization": ("qk_norm", True),
               "initializer_factor": ("layer_scale", 0.1), "hidden_act": ("act", "gelu")}
PROJECTOR_LAYERS = {"mlp1.0.": "layers.0.", "mlp1.1.": "layers.1.", "mlp1.3.": "layers.3."}


def _split(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def from_original(path: str | os.PathLike, *, dtype: str | torch.dtype | None = None, tokenizer: bool = True,
                  attn_implementation: str = "sdpa") -> VLM:
    """Import a local original InternVL directory (``config.json`` with ``model_type: internvl_chat``, safetensors
    or ``pytorch_model.bin`` read with ``weights_only``, the tokenizer holding ``<IMG_CONTEXT>``) as a ``vlm.VLM``."""
    path = Path(path)
    where = f"from_hf: {str(path / CONFIG_FILE)!r}"
    cfg = read_config(path, "from_hf", "an original InternVL directory (model_type 'internvl_chat')")
    if cfg.get("ps_version", "v1") != "v2":
        raise ValueError(f"{where}: ps_version={cfg.get('ps_version', 'v1')!r}; pixel_shuffle_mlp is InternVL's "
                         f"'v2' pixel shuffle (v1 transposes the token grid)")
    vision, text = dict(cfg.get("vision_config") or {}), dict(cfg.get("llm_config") or {})
    dims = {ours: vision.get(theirs, default) for theirs, (ours, default) in VISION_KEYS.items()}
    tile = cfg.get("force_image_size") or dims["image_size"]
    if int(tile) != int(dims["image_size"]):
        raise ValueError(f"{where}: force_image_size={tile} differs from vision_config.image_size="
                         f"{dims['image_size']}; internvit's tile size is its position grid's image size")
    model_type = text.get("model_type")
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"{where}: llm_config.model_type={model_type!r} ({text.get('architectures')}) needs remote "
                         f"code, which vlm never runs; convert the LLM to a transformers architecture first (e.g. "
                         f"InternLM2 to Llama format) and set llm_config accordingly")
    if not tokenizer:
        raise ValueError(f"from_hf: an original InternVL directory names its image token only in its tokenizer "
                         f"({IMG_CONTEXT}); import it with tokenizer=True")
    tok = load_tokenizer(path)
    if tok is None or IMG_CONTEXT not in tok.get_vocab():
        raise ValueError(f"from_hf: {str(path)!r} has no tokenizer holding {IMG_CONTEXT!r} (the original InternVL "
                         f"image token); expected tokenizer.json / tokenizer_config.json next to config.json")
    torch_dtype = resolve_dtype(dtype) or torch.float32
    state = read_weights(path, "from_hf")
    encoder = encoders.build({"name": "internvit", **dims, "feature_layer": int(cfg.get("select_layer", -1)),
                              "select": "patch", "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD),
                              "dtype": dtype_name(torch_dtype)})
    text_cfg = {k: v for k, v in text.items() if k not in FILE_KEYS and k != "architectures"}
    lm = llms.build({"name": "hf_causal_lm", "config": text_cfg, "attn_implementation": attn_implementation,
                     "dtype": dtype_name(torch_dtype), "strict_config": False})
    connector = connectors.build({"name": "pixel_shuffle_mlp", "scale": float(cfg.get("downsample_ratio", 0.5))},
                                 in_dim=encoder.hidden_size, out_dim=lm.hidden_size).to(torch_dtype)
    with torch.no_grad():
        load_strict(encoder.model, original_to_ours(_split(state, "vision_model.")), "from_hf: vision_model")
        load_strict(connector, {PROJECTOR_LAYERS.get(k[:7], k) + k[7:]: v for k, v in _split(state, "").items()
                                if k.startswith("mlp1.")}, "from_hf: mlp1")
        lm_state = _split(state, "language_model.")
        if lm.model.get_output_embeddings() is not None and "lm_head.weight" not in lm_state:
            lm_state["lm_head.weight"] = lm_state.get("model.embed_tokens.weight")  # a tied LLM saves one copy
        load_strict(lm.model, {k: v for k, v in lm_state.items() if v is not None}, "from_hf: language_model")
    model = VLM(encoder, connector, lm, image_token_id=tok.convert_tokens_to_ids(IMG_CONTEXT), image_token=IMG_CONTEXT)
    model.tokenizer = tok
    if cfg.get("dynamic_image_size"):
        model.image_preprocessing = {"resize_mode": "resize", "tiling": {
            "kind": "dynamic", "min_tiles": int(cfg.get("min_dynamic_patch", 1)),
            "max_tiles": int(cfg.get("max_dynamic_patch", 6)), "thumbnail": bool(cfg.get("use_thumbnail", False))}}
    from vlm.generation import generation_settings

    model.generation = generation_settings(tok)
    return model.eval()


def no_export(model: Any, path: str | os.PathLike, **kwargs: Any) -> Path:
    raise ValueError("vlm writes InternVL in the transformers layout (format 'internvl'), not the remote-code one")


@FORMATS.register("internvl_chat")
class InternVLChatFormat(HFFormat):
    """Original OpenGVLab InternVL checkpoints (import only)."""

    model_type = MODEL_TYPE
    hf_class = "InternVLChatModel (original OpenGVLab checkpoint, imported without its remote code)"
    from_hf = staticmethod(from_original)
    to_hf = staticmethod(no_export)
    problems = staticmethod(lambda model: ["import only: vlm exports InternVL as format 'internvl'"])
