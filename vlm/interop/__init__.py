"""Exact interop with transformers model formats (``vlm.interop.formats``: one module per family).

``from_hf(path)`` imports a local transformers directory (``LlavaForConditionalGeneration``,
``LlavaNextForConditionalGeneration``, ``LlavaOnevisionForConditionalGeneration``, ``Blip2ForConditionalGeneration``,
``InternVLForConditionalGeneration``, ``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``,
``Idefics3ForConditionalGeneration``, ``SmolVLMForConditionalGeneration``, original OpenGVLab InternVL and Qwen-VL
checkpoints) as a ``vlm.VLM``,
dispatching on its ``config.json``'s ``model_type``; ``to_hf(model, path)`` exports a ``VLM`` in the first format that
can hold it (or ``format=NAME``), e.g. a CLIP/SigLIP tower + ``mlp`` depth-2 connector + transformers causal LM as
LLaVA, a directory that transformers (and LLaVA-serving engines) load. Both directions keep logits identical for
identical ``input_ids`` / ``pixel_values``. CLI: ``python -m vlm.convert SRC DST``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from vlm.interop import (  # noqa: F401  (register the formats)
    blip2,
    idefics3,
    internvl,
    internvl_original,
    llava,
    llava_next,
    llava_onevision,
    qwen2_vl,
    qwen_vl,
)
from vlm.interop.formats import FORMATS, HFFormat, format_for_model, format_for_model_type

__all__ = ["FORMATS", "HFFormat", "from_hf", "supported_model_types", "to_hf"]


def supported_model_types() -> dict[str, str]:
    """``{config.json model_type: transformers class}`` of every format ``from_hf`` imports."""
    return {FORMATS.get(n).model_type: FORMATS.get(n).hf_class for n in FORMATS.names()}


def from_hf(path: str | os.PathLike, *, dtype: str | torch.dtype | None = None, tokenizer: bool = True,
            **kwargs: Any) -> Any:
    """Import a local transformers directory as a ``vlm.VLM`` (eval mode); its format comes from ``config.json``'s
    ``model_type``. Errors name the file, the ``model_type`` found and the supported ones."""
    from vlm.pretrained import WEIGHTS_FILE, read_config

    path = Path(path)
    expected = f"a transformers directory saved with save_pretrained, model_type one of {supported_model_types()}"
    cfg = read_config(path, "from_hf", expected)
    if cfg.get("format") == "vlm":
        raise ValueError(f"from_hf: {str(path / 'config.json')!r} is a vlm directory (format 'vlm'); load it with "
                         f"vlm.load, or export it with to_hf")
    fmt = format_for_model_type(cfg.get("model_type"), f"from_hf: {str(path / 'config.json')!r}")
    weights = path / WEIGHTS_FILE  # (each format checks its weights exist once its config is valid)
    if weights.is_file():  # before anything is built: a config beside the wrong weights builds a full-size model
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            roots = {k.split(".", 1)[0] for k in f.keys()}
        if roots and roots <= {"encoder", "connector", "llm"}:
            raise ValueError(f"from_hf: {str(weights)!r} holds vlm weights (encoder., connector., llm.), not a "
                             f"transformers model's: the config.json beside it (model_type "
                             f"{cfg.get('model_type')!r}) is not the one saved with them; load a vlm directory "
                             f"with its own config.json")
    model = fmt.from_hf(path, dtype=dtype, tokenizer=tokenizer, **kwargs)
    model.image_placement = None  # the directory's own chat template places images (vlm.data.image_placement)
    model.source_format = fmt.registry_name  # saved in config.json; to_hf prefers it (e.g. smolvlm, not idefics3)
    return model.eval()


def to_hf(model: Any, path: str | os.PathLike, *, format: str | None = None,
          dtype: str | torch.dtype | None = None, processor: bool = True) -> Path:
    """Write ``model`` as a transformers directory (safetensors) in ``format`` (a ``FORMATS`` name; default: the
    format the model was imported from, ``model.source_format``, when it can hold the model, else the first that
    can) and return the path. ``ValueError`` listing why when no format can, or for an unknown ``format``."""
    return format_for_model(model, format).to_hf(model, path, dtype=dtype, processor=processor)
