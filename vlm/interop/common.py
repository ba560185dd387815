"""Helpers every transformers format module shares (LLaVA, InternVL, ...): configs as plain dicts, strict weight
copies, embedding tying, generation settings, the directory's tokenizer."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlm.generation import GENERATION_KEYS, generation_settings, read_settings
from vlm.pretrained import FILE_KEYS, load_strict

GENERATION_FILE = "generation_config.json"
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")
LM_PREFIX = "model.language_model."


def arch_config(config: Any) -> dict[str, Any]:
    """A transformers (sub)config as a plain dict without file bookkeeping keys."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: v for k, v in d.items() if k not in FILE_KEYS}


def copy_state(dst: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``dst.load_state_dict(state)`` strictly; a mismatch names the component and the offending keys."""
    load_strict(dst, state, what)


def is_tied(model: nn.Module) -> bool:
    """Whether the output embeddings share storage with the input embeddings."""
    out = model.get_output_embeddings()
    return out is not None and out.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def has_parameter(module: nn.Module, name: str) -> bool:
    try:
        module.get_parameter(name)
    except AttributeError:
        return False
    return True


def tying_problems(lm: Any, hf_class: Any, family: str) -> list[str]:
    """Why a tied LLM cannot be written as ``hf_class``: its ``lm_head`` is tied to a fixed parameter name of the
    language model (``embed_tokens``) that the LLM may not have."""
    problems = []
    if is_tied(lm.model):
        for source in hf_class._tied_weights_keys.values():
            name = source.removeprefix(LM_PREFIX)
            if name != source and not has_parameter(lm.model.base_model, name):
                problems.append(f"the LLM ({lm.text_config.model_type}) ties its output embeddings, and transformers' "
                                f"{family} ties lm_head to language_model.{name}, which this model does not have; "
                                f"untie the embeddings (tie_word_embeddings=False) or use a Llama-style LLM")
    return problems


def lm_problems(lm: Any, family: str, hf_class_name: str) -> list[str]:
    """Why the LLM cannot be the language model of transformers' ``hf_class_name`` (``family`` names it in the
    messages): it must be a transformers causal LM (``hf_causal_lm``) whose tying the class can express."""
    from vlm.llm.hf_causal_lm import HFCausalLM

    if not isinstance(lm, HFCausalLM):
        return [f"the LLM is {type(lm).__name__}; {family} needs a transformers causal LM (hf_causal_lm)"]
    import transformers

    return tying_problems(lm, getattr(transformers, hf_class_name), family)


def read_tokenizer(path: Path) -> Any:
    """The directory's tokenizer (``AutoTokenizer``, local files only), or ``None`` when it holds none."""
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def read_generation(path: Path, config: Any, tokenizer: Any) -> dict[str, Any]:
    """The directory's generation settings: ``generation_config.json``, else the text config's ids, else the
    tokenizer's (``vlm.generation``); a source's missing keys are filled from the next one."""
    sources = []
    if (path / GENERATION_FILE).is_file():
        try:
            sources.append(read_settings(json.loads((path / GENERATION_FILE).read_text())))
        except json.JSONDecodeError as e:
            raise ValueError(f"from_hf: {str(path / GENERATION_FILE)!r} is not valid JSON ({e})") from e
    sources += [read_settings(config.text_config), generation_settings(tokenizer)]
    out: dict[str, Any] = {}
    for settings in sources:
        for key, value in settings.items():
            out.setdefault(key, value)
    return out


def export_generation(model: Any) -> dict[str, Any]:
    """The generation settings an export carries: ``model.generation`` (else the tokenizer's), every key present
    (``None`` where unknown, overriding the LLM config's own ids, which need not match the tokenizer)."""
    settings = model.generation or generation_settings(model.tokenizer)
    return {key: settings.get(key) for key in GENERATION_KEYS}


def text_config_for_export(model: Any) -> dict[str, Any]:
    """The LLM's transformers config as the text config of an export: vocabulary size, tying and generation ids."""
    lm = model.llm
    text_cfg = arch_config(lm.text_config)
    text_cfg["vocab_size"] = lm.vocab_size
    text_cfg["tie_word_embeddings"] = is_tied(lm.model)
    text_cfg.update(export_generation(model))  # where serving engines read eos / pad / bos
    return text_cfg


def copy_language_model(lm: Any, hf: nn.Module, to_hf: bool) -> None:
    """Copy the LLM's weights into (``to_hf``) or out of a transformers ``*ForConditionalGeneration`` ``hf`` whose
    language model is ``hf.model.language_model`` and output layer ``hf.lm_head``."""
    pairs = ((lm.model.base_model, hf.model.language_model, "language model"),
             (lm.model.get_output_embeddings(), hf.lm_head, "lm_head"))
    for ours, theirs, what in pairs:
        src, dst = (ours, theirs) if to_hf else (theirs, ours)
        copy_state(dst, src.state_dict(), f"{'to_hf' if to_hf else 'from_hf'}: {what}")
