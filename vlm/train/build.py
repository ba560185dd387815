"""Build a run's tokenizer and model from its config.

Tokenizers come from ``TOKENIZERS`` (``byte``: the file-free byte-level tokenizer; ``hf``: a local transformers
tokenizer directory). Each can add ``extra_tokens`` and ``number_tokens: N`` (the integers ``0..N-1`` as single
tokens, e.g. 1000 for Qwen-VL style ``[0, 1000)`` box coordinates, so a coordinate is one prediction instead of
three digits). Special tokens the stages' templates emit are added too; ``vlm.build`` then grows the embeddings.
"""
from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

import vlm
from vlm.registry import Registry, to_dict
from vlm.train.config import model_config

TOKENIZERS: Registry[Any] = Registry("tokenizer")


def _add_tokens(tok: Any, extra_tokens: Sequence[str], number_tokens: int) -> Any:
    from tokenizers import AddedToken

    if extra_tokens:
        tok.add_special_tokens({"additional_special_tokens": list(extra_tokens)},
                               replace_extra_special_tokens=False)
    if number_tokens:
        # plain (non-special) added tokens: matched longest-first before the model's own splitting, kept on decode
        tok.add_tokens([AddedToken(str(i), single_word=False, normalized=False, special=False)
                        for i in range(int(number_tokens))])
    return tok


@TOKENIZERS.register("byte")
def byte(chat_template: str = "chatml", extra_tokens: Sequence[str] = (), number_tokens: int = 0) -> Any:
    """``vlm.data.tokenizer.byte_tokenizer`` (ids 0..255 are bytes) plus optional tokens."""
    from vlm.data.tokenizer import byte_tokenizer

    return _add_tokens(byte_tokenizer(chat_template), extra_tokens, number_tokens)


@TOKENIZERS.register("hf")
def hf(path: str, extra_tokens: Sequence[str] = (), number_tokens: int = 0, pad_token: str | None = None,
       trust_remote_code: bool = False) -> Any:
    """A local tokenizer directory (``AutoTokenizer``, never the network). ``pad_token``: set one if missing
    (LLaVA uses ``<unk>`` for LLaMA/Vicuna); without one the eos token pads."""
    from vlm.data.tokenizer import load_tokenizer

    tok = load_tokenizer(path, trust_remote_code=trust_remote_code)
    if pad_token is not None:
        tok.pad_token = pad_token
    elif tok.pad_token is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    return _add_tokens(tok, extra_tokens, number_tokens)


@TOKENIZERS.register("byte_bpe")
def byte_bpe(vocab_size: int = 512, corpus: Sequence[str] = ("pretrain", "sft"), corpus_samples: int = 2000,
             split_digits: bool = True, chat_template: str = "chatml", extra_tokens: Sequence[str] = (),
             number_tokens: int = 0, data: Any = None) -> Any:
    """``vlm.data.tokenizer.byte_bpe_tokenizer`` trained (deterministically) on the message texts of the first
    ``corpus_samples`` samples of each ``data`` key in ``corpus``: every byte stays representable, frequent strings
    of the corpus become single tokens (much shorter sequences for a tiny model), digits stay single tokens."""
    from vlm.data.tokenizer import byte_bpe_tokenizer
    from vlm.train.data import build_dataset

    check_corpus(corpus, data)
    texts: list[str] = []
    for key in corpus:
        ds = build_dataset(data[key])
        for i in range(min(int(corpus_samples), len(ds))):
            texts += [f"{m.role}\n{m.text()}" for m in ds[i].messages]
    tok = byte_bpe_tokenizer(texts, vocab_size=int(vocab_size), chat_template=chat_template,
                             split_digits=split_digits)
    return _add_tokens(tok, extra_tokens, number_tokens)


def check_corpus(corpus: Sequence[str] = ("pretrain", "sft"), data: Any = None, **_: Any) -> None:
    """``byte_bpe``'s ``corpus`` names configured ``data`` keys (run by the config check, and before training)."""
    from vlm.registry import did_you_mean

    if data is None:
        raise ValueError("tokenizer byte_bpe needs the run's data config to train on")
    configured = [k for k in data if data[k] is not None]
    for key in corpus:
        if key not in configured:
            raise ValueError(f"corpus={list(corpus)}: names data.{key}, which is not configured; "
                             f"expected keys of data {configured} ({did_you_mean(key, configured)})")


byte_bpe.check_options = check_corpus  # type: ignore[attr-defined]


def build_tokenizer(cfg: DictConfig, templates: Iterable[Any] = ()) -> Any:
    """The run's tokenizer, with every special token of ``templates`` (names or configs) present."""
    from vlm.data.templates import build_template

    factory = TOKENIZERS.get(cfg.tokenizer.name)
    extra = {"data": cfg.data} if "data" in inspect.signature(factory).parameters else {}
    tok = TOKENIZERS.build(cfg.tokenizer, **extra)
    missing: list[str] = []
    for spec in templates:
        spec = OmegaConf.to_container(spec, resolve=True) if isinstance(spec, DictConfig) else spec
        for t in build_template(spec).special_tokens(tok):
            if t not in tok.get_vocab() and t not in missing:
                missing.append(t)
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    return tok


def build_model(cfg: DictConfig, tokenizer: Any, *, gradient_checkpointing: bool = False) -> vlm.VLM:
    """``vlm.build`` on the run's ``{encoder, connector, llm}`` (random init seeded by the caller)."""
    model_cfg = model_config(cfg)
    if gradient_checkpointing:
        model_cfg["llm"]["gradient_checkpointing"] = True
    model = vlm.build(model_cfg, tokenizer)
    tower = getattr(model.encoder, "model", None)
    if gradient_checkpointing and getattr(tower, "supports_gradient_checkpointing", False):
        kwargs = {"use_reentrant": False}
        if hasattr(tower, "activation_checkpointing_enable"):  # transformers >= 5 name
            tower.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def fingerprint(model: nn.Module) -> tuple[str, dict[str, list[int]]]:
    """A hash of the model's parameter names, shapes and trainability (what a checkpoint must match)."""
    shapes = {n: [*p.shape, int(p.requires_grad)] for n, p in model.named_parameters()}
    digest = hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest()[:16]
    return digest, shapes


MODEL_KEYS = ("encoder", "connector", "llm", "tokenizer")
LOCATION_KEYS = ("pretrained", "path")  # where weights live may differ between machines; what they are may not


def config_fingerprint(cfg: Any) -> tuple[str, dict[str, Any]]:
    """A hash of the architecture-defining config (``encoder``, ``connector``, ``llm``, ``tokenizer``), file
    locations left out."""
    def strip(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in LOCATION_KEYS}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    model = strip({k: plain.get(k) for k in MODEL_KEYS})
    return hashlib.sha256(json.dumps(model, sort_keys=True, default=str).encode()).hexdigest()[:16], model


def describe_config_change(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += describe_config_change(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def describe_mismatch(saved: dict[str, list[int]], current: dict[str, list[int]], limit: int = 6) -> str:
    only_saved = sorted(set(saved) - set(current))
    only_now = sorted(set(current) - set(saved))
    differ = sorted(k for k in set(saved) & set(current) if saved[k] != current[k])
    parts = []
    if only_saved:
        parts.append(f"only in the checkpoint: {only_saved[:limit]}{' ...' if len(only_saved) > limit else ''}")
    if only_now:
        parts.append(f"only in this model: {only_now[:limit]}{' ...' if len(only_now) > limit else ''}")
    if differ:
        parts.append("shape/trainable differ: " + ", ".join(f"{k} {saved[k]} vs {current[k]}" for k in differ[:limit]))
    return "; ".join(parts) or "same parameters"


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def component_config(cfg: DictConfig, key: str) -> dict[str, Any]:
    return to_dict(cfg[key])


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
