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

Only ``ps_version: v2`` (every InternVL >= 1.5) is the pixel shuffle ``pixel_shuffle_mlp`` computes. A remote-code
LLM listed in ``vlm.interop.internlm2.REMOTE_LLMS`` (InternLM2, the LLM of InternVL2 / InternVL2.5) becomes its exact
transformers counterpart (Llama); any other remote-code LLM is refused. Export goes to the transformers layout (format
``internvl``, the default) or, with ``format="internvl_chat"``, back to this layout (a Llama LLM written as InternLM2).
"""
from __future__ import annotations

import json
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
from vlm.interop.internlm2 import REMOTE_LLMS
from vlm.interop.internvl_templates import ORIGINAL_TEMPLATES, chat_template
from vlm.model import VLM
from vlm.pretrained import CONFIG_FILE, FILE_KEYS, check_weights, load_strict, read_config, read_weights

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

    remote = REMOTE_LLMS.get(model_type)
    if remote is None and model_type not in CONFIG_MAPPING:
        raise ValueError(f"{where}: llm_config.model_type={model_type!r} ({text.get('architectures')}) needs remote "
                         f"code, which vlm never runs, and is not one vlm maps to a transformers architecture "
                         f"({sorted(REMOTE_LLMS)}); convert the LLM to a transformers architecture first and set "
                         f"llm_config accordingly")
    text_cfg = {k: v for k, v in text.items() if k not in FILE_KEYS and k != "architectures"}
    if remote is not None:  # before anything is read or built: a bad llm_config stops here
        text_cfg = remote.to_config(text, f"{where} llm_config")
    if not tokenizer:
        raise ValueError(f"from_hf: an original InternVL directory names its image token only in its tokenizer "
                         f"({IMG_CONTEXT}); import it with tokenizer=True")
    tok = load_tokenizer(path)
    if tok is None or IMG_CONTEXT not in tok.get_vocab():
        raise ValueError(f"from_hf: {str(path)!r} has no tokenizer holding {IMG_CONTEXT!r} (the original InternVL "
                         f"image token); expected tokenizer.json / tokenizer_config.json next to config.json")
    torch_dtype = resolve_dtype(dtype) or torch.float32
    weights = f"from_hf: {str(check_weights(path, 'from_hf'))!r}"
    state = read_weights(path, "from_hf")
    lm_state = _split(state, "language_model.")
    if remote is not None:  # renamed and unpacked before anything is built (shape errors name the file and key)
        lm_state = remote.to_state(lm_state, text_cfg, weights)
    encoder = encoders.build({"name": "internvit", **dims, "feature_layer": int(cfg.get("select_layer", -1)),
                              "select": "patch", "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD),
                              "dtype": dtype_name(torch_dtype)})
    lm = llms.build({"name": "hf_causal_lm", "config": text_cfg, "attn_implementation": attn_implementation,
                     "dtype": dtype_name(torch_dtype), "strict_config": False})
    connector = connectors.build({"name": "pixel_shuffle_mlp", "scale": float(cfg.get("downsample_ratio", 0.5))},
                                 in_dim=encoder.hidden_size, out_dim=lm.hidden_size).to(torch_dtype)
    with torch.no_grad():
        load_strict(encoder.model, original_to_ours(_split(state, "vision_model.")), f"{weights} vision_model")
        load_strict(connector, {PROJECTOR_LAYERS.get(k[:7], k) + k[7:]: v for k, v in _split(state, "").items()
                                if k.startswith("mlp1.")}, f"{weights} mlp1")
        if lm.model.get_output_embeddings() is not None and "lm_head.weight" not in lm_state:
            lm_state["lm_head.weight"] = lm_state.get("model.embed_tokens.weight")  # a tied LLM saves one copy
        load_strict(lm.model, {k: v for k, v in lm_state.items() if v is not None}, f"{weights} language_model")
    conv = ORIGINAL_TEMPLATES.get(str(cfg.get("template")))
    if conv is not None:  # the prompt original chat() builds (vlm.interop.internvl_templates)
        tok.chat_template = chat_template(conv, IMG_CONTEXT)
    model = VLM(encoder, connector, lm, image_token_id=tok.convert_tokens_to_ids(IMG_CONTEXT), image_token=IMG_CONTEXT)
    model.tokenizer = tok
    model.original_template = cfg.get("template")
    if cfg.get("dynamic_image_size"):
        model.image_preprocessing = {"resize_mode": "resize", "tiling": {
            "kind": "dynamic", "min_tiles": int(cfg.get("min_dynamic_patch", 1)),
            "max_tiles": int(cfg.get("max_dynamic_patch", 6)), "thumbnail": bool(cfg.get("use_thumbnail", False))}}
    from vlm.generation import generation_settings

    model.generation = generation_settings(tok)
    if conv is not None and conv.end_of_turn in tok.get_vocab():  # original chat() stops at the separator too
        stop = tok.convert_tokens_to_ids(conv.end_of_turn)
        eos = list(model.generation.get("eos_token_id") or [])
        model.generation["eos_token_id"] = eos + [stop] * (stop not in eos)
    return model.eval()


#: the remote-code files a published original directory names (written as data; vlm writes no code)
AUTO_MAP = {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
            "AutoModel": "modeling_internvl_chat.InternVLChatModel",
            "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel"}
#: the tokenizer class the original InternLM2 tokenizer files name (``vlm.data.sentencepiece_tokenizer`` reads it)
INTERNLM2_TOKENIZER = {"tokenizer_class": "InternLM2Tokenizer",
                       "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]}}
DEFAULT_TEMPLATE = "internlm2-chat"


def original_problems(model: Any) -> list[str]:
    """Why ``model`` cannot be written as an original InternVL directory (empty when it can): InternVL's parts
    (``vlm.interop.internvl.internvl_problems``), a tokenizer holding the image token, and an LLM the original
    layout holds (a Llama is written as InternLM2: ``vlm.interop.internlm2.llama_problems``)."""
    from vlm.interop.internlm2 import EXPORT_AS
    from vlm.interop.internvl import internvl_problems

    problems = internvl_problems(model)
    if problems:
        return problems
    if model.tokenizer is None or model.image_token not in model.tokenizer.get_vocab():
        problems.append(f"the original layout names its image token only in the tokenizer; model.tokenizer must "
                        f"hold {model.image_token!r}")
    text = model.llm.text_config
    remote = REMOTE_LLMS.get(EXPORT_AS.get(text.model_type, ""))
    if remote is not None:
        problems += [f"the LLM cannot be written as {remote.architectures[0]}: {p}"
                     for p in remote.problems(text.to_dict())]
    return problems


def to_original(model: Any, path: str | os.PathLike, *, dtype: str | torch.dtype | None = None,
                processor: bool = True) -> Path:
    """Write ``model`` as an original OpenGVLab InternVL directory (``model_type: internvl_chat``, safetensors):
    ``vision_model.*`` (fused qkv), ``mlp1.*``, ``language_model.*`` (a Llama LLM as InternLM2, packed ``wqkv``;
    another transformers LLM under its own names), the config with ``vision_config`` / ``llm_config`` and the
    tiling, and the tokenizer (an InternLM2 one naming ``InternLM2Tokenizer``). The remote-code ``.py`` files the
    config's ``auto_map`` names are not written (vlm writes no code): an engine that runs that code needs the
    release's own ``.py`` files placed in the directory. ``processor`` is accepted for the ``HFFormat`` signature; the tokenizer is always written."""
    from safetensors.torch import save_file

    from vlm.encoders.internvit_keys import ours_to_original
    from vlm.interop import common
    from vlm.interop.internlm2 import EXPORT_AS

    problems = original_problems(model)
    if problems:
        raise ValueError("to_hf: this model cannot be written as an original InternVL directory (internvl_chat): "
                         + "; ".join(problems))
    enc, conn, lm = model.encoder, model.connector, model.llm
    out_dtype = common.export_dtype(lm, dtype)
    text = common.text_config_for_export(lm, model)
    remote_name = EXPORT_AS.get(text["model_type"])
    lm_state = {k: v for k, v in lm.model.state_dict().items()}
    if common.is_tied(lm.model):
        lm_state.pop("lm_head.weight", None)  # one copy, as a tied original saves it
    if remote_name is not None:
        llm_config = REMOTE_LLMS[remote_name].from_config(text)
        lm_state = REMOTE_LLMS[remote_name].from_state(lm_state, text)
    else:
        llm_config = {**text, "architectures": [type(lm.model).__name__]}
    dims = enc.dims
    vision = {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
              **{theirs: dims[ours] for theirs, (ours, _) in VISION_KEYS.items() if ours in dims}}
    tiling = (model.image_preprocessing or {}).get("tiling") or {}
    dynamic = tiling.get("kind") == "dynamic"
    cfg = {"architectures": ["InternVLChatModel"], "model_type": MODEL_TYPE, "auto_map": dict(AUTO_MAP),
           "vision_config": vision, "llm_config": llm_config, "select_layer": enc.feature_layer,
           "force_image_size": dims["image_size"], "downsample_ratio": float(conn.scale), "ps_version": "v2",
           "template": getattr(model, "original_template", None) or DEFAULT_TEMPLATE,
           "dynamic_image_size": dynamic, "use_thumbnail": bool(tiling.get("thumbnail", False)),
           "min_dynamic_patch": int(tiling.get("min_tiles", 1)), "max_dynamic_patch": int(tiling.get("max_tiles", 1)),
           "use_backbone_lora": 0, "use_llm_lora": 0, "torch_dtype": dtype_name(out_dtype)}
    state = {f"vision_model.{k}": v for k, v in ours_to_original(enc.model.state_dict()).items()}
    state.update({f"mlp1.{k.removeprefix('layers.')}": v for k, v in conn.state_dict().items()})
    state.update({f"language_model.{k}": v for k, v in lm_state.items()})
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to(out_dtype).contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    model.tokenizer.save_pretrained(str(out))
    if remote_name is not None:
        tok_file = out / "tokenizer_config.json"
        tok_cfg = json.loads(tok_file.read_text())
        if tok_cfg.get("tokenizer_class") == "SentencePieceTokenizer":  # InternLM2's own tokenizer, as published
            tok_file.write_text(json.dumps({**tok_cfg, **INTERNLM2_TOKENIZER}, indent=2, ensure_ascii=False) + "\n")
    return out


@FORMATS.register("internvl_chat")
class InternVLChatFormat(HFFormat):
    """Original OpenGVLab InternVL checkpoints (remote-code ``InternVLChatModel``), read and written as data."""

    model_type = MODEL_TYPE
    hf_class = "InternVLChatModel (original OpenGVLab checkpoint, imported without its remote code)"
    loads_in_transformers = False
    from_hf = staticmethod(from_original)
    to_hf = staticmethod(to_original)
    problems = staticmethod(original_problems)
