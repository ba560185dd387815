"""``vlm.load``: the one loader for inference, of vlm directories (``load_vlm_directory``: the architecture by
``vlm.compose.from_config``, then the weights and tokenizer) and transformers ones. It sits above ``vlm.compose`` and
``vlm.interop`` (which import ``vlm.model``), so that loading a transformers directory adds no import cycle."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model

from vlm.compose import from_config
from vlm.generation import generation_settings
from vlm.model import VLM
from vlm.persistence import FORMAT
from vlm.pretrained import CONFIG_FILE, WEIGHTS_FILE


def load(directory: str | os.PathLike, *, tokenizer: bool = True, device: str | torch.device | None = None,
         quantize: str | None = None, quantize_vision: bool = False, quantize_head: bool = False) -> VLM:
    """Load a model directory for inference, in eval mode (as transformers' ``from_pretrained``): one written by
    ``VLM.save_pretrained``, or a transformers directory of a format ``vlm.interop`` imports (LLaVA, BLIP-2,
    InternVL; imported on the fly with ``vlm.interop.from_hf``). Raises naming any missing or foreign file, and
    for a transformers directory its ``model_type`` and the formats vlm imports. Call ``model.train()`` to train.

    ``quantize``: ``None`` (the saved dtype), or a weight-only scheme of ``vlm.quantize.SCHEMES`` (``"int8"``,
    ``"int4"``: CPU and CUDA; ``"nf4"``: CUDA) applied to the LLM's linear layers (the output head with
    ``quantize_head``, the vision tower's with ``quantize_vision``) once the weights are on ``device``. Any other
    value is a ``ValueError`` naming the accepted ones, checked before anything is read."""
    if quantize is not None:
        from vlm.quantize import scheme_for

        scheme_for(quantize, device)  # a bad name or device fails before the weights are read
    model = _load(directory, tokenizer=tokenizer, device=device)
    if quantize is not None:
        from vlm.quantize import quantize_model

        quantize_model(model, quantize, vision=quantize_vision, head=quantize_head, device=device)
    return model


def _load(directory: str | os.PathLike, *, tokenizer: bool, device: str | torch.device | None) -> VLM:
    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"vlm.load: {str(path)!r} is not a directory")
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise FileNotFoundError(f"vlm.load: {str(path)!r} is missing {CONFIG_FILE} (expected {CONFIG_FILE} and "
                                f"{WEIGHTS_FILE} written by VLM.save_pretrained)")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"vlm.load: {str(cfg_file)!r} is not valid JSON: {e}") from e
    if config.get("format") == FORMAT:
        return load_vlm_directory(path, config, tokenizer=tokenizer, device=device)
    return load_transformers_directory(path, config, tokenizer=tokenizer, device=device)


def load_transformers_directory(path: Path, config: dict[str, Any], *, tokenizer: bool,
                                device: str | torch.device | None) -> VLM:
    """A transformers directory (``config.json`` without ``"format": "vlm"``) imported by the ``vlm.interop``
    format of its ``model_type``; ``ValueError`` naming the ``model_type`` and the supported formats otherwise."""
    from vlm.interop import from_hf  # imported when needed: vlm.interop loads transformers' VLM classes
    from vlm.interop.formats import format_for_model_type

    if "model_type" not in config:
        raise ValueError(f"vlm.load: {str(path / CONFIG_FILE)!r} is neither a vlm config (format="
                         f"{config.get('format')!r}, expected 'vlm') nor a transformers config (no model_type)")
    format_for_model_type(config["model_type"], f"vlm.load: {str(path / CONFIG_FILE)!r}")  # names the supported
    quantized = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
    if quantized:
        method = quantized.get("quant_method", "?") if isinstance(quantized, dict) else "?"
        raise ValueError(f"vlm.load: {str(path)!r} is a pre-quantized checkpoint (quantization_config.quant_method="
                         f"{method!r}); vlm does not import GPTQ / AWQ / bitsandbytes weights. Serve it with the "
                         f"engine it was made for (vLLM, LMDeploy, transformers on CUDA), or load the unquantized "
                         f"model with vlm.load(DIR, quantize='int8' | 'int4') (docs/deploy.md)")
    model = from_hf(path, tokenizer=tokenizer)
    if device is not None:
        model.to(device)
    return model.eval()


def load_vlm_directory(path: Path, config: dict[str, Any], *, tokenizer: bool = True,
                       device: str | torch.device | None = None) -> VLM:
    """The model of a directory written by ``VLM.save_pretrained`` (``config`` its parsed ``config.json``), in eval
    mode. ``vlm.load`` is the loader to call: it also imports transformers directories. Raises
    ``FileNotFoundError`` for a missing weights file and ``ValueError`` for weights that do not match the config."""
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"vlm.load: {str(path)!r} is missing {WEIGHTS_FILE} (expected {CONFIG_FILE} and "
                                f"{WEIGHTS_FILE} written by VLM.save_pretrained)")
    model = from_config(config)
    missing, unexpected = load_model(model, str(weights), strict=False, device=str(device or "cpu"))
    if missing or unexpected:
        raise ValueError(f"vlm.load: {str(weights)!r} does not match the config: missing {sorted(missing)[:8]}, "
                         f"unexpected {sorted(unexpected)[:8]}")
    if tokenizer and (path / "tokenizer_config.json").is_file():
        from vlm.data.tokenizer import load_tokenizer

        model.tokenizer = load_tokenizer(path)
    # directories written before generation settings were saved: the tokenizer's
    model.generation = dict(config.get("generation") or generation_settings(model.tokenizer))
    return model.eval()
