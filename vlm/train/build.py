"""Build a run's tokenizer and model from its config.

The tokenizer comes from ``vlm.data.tokenizer.TOKENIZERS`` (``tokenizer.name``); special tokens the stages'
templates emit are added too; ``vlm.build`` then grows the embeddings. A run that starts from ``init_from`` uses the
tokenizer saved with that checkpoint instead (``saved_tokenizer``): the weights' vocabulary is that tokenizer's,
whatever the recipe's own tokenizer would be (``byte_bpe`` trains on the run's data, so its vocabulary depends on
the data sizes).
"""
from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

import vlm
from vlm.data.tokenizer import TOKENIZERS
from vlm.recompute import mode as recompute_mode
from vlm.registry import plain
from vlm.train.config import model_config


def saved_tokenizer(init_from: str | Path | None) -> Path | None:
    """The directory of the tokenizer saved with the checkpoint ``init_from`` names, or ``None`` when it has none:
    a ``vlm.load`` directory (``final/``) holding ``tokenizer_config.json``; a run directory's ``final/``; a stage
    directory's (or its ``weights.safetensors``') run's ``final/`` (a run's stages share one tokenizer); a
    ``.safetensors`` file inside such a directory. Checkpoints of other formats (transformers directories) keep the
    recipe's tokenizer (``tokenizer.name=hf``)."""
    from vlm.persistence import FORMAT
    from vlm.train.checkpoint import STAGE_WEIGHTS

    if init_from is None:
        return None
    source = Path(init_from)
    here = source.parent if source.is_file() else source
    candidates = [here, here / "final"]
    if (here / STAGE_WEIGHTS).is_file():  # a stage of a run: the run's export holds the run's tokenizer
        candidates.append(here.parent / "final")
    for d in candidates:
        try:
            is_vlm = json.loads((d / "config.json").read_text()).get("format") == FORMAT
        except (OSError, ValueError, AttributeError):
            continue
        if is_vlm and (d / "tokenizer_config.json").is_file():
            return d
    return None


def build_tokenizer(cfg: DictConfig, templates: Iterable[Any] = (), tilings: Iterable[Any] = ()) -> Any:
    """The run's tokenizer, with every special token of ``templates`` (names or configs) and of the image layouts
    ``tilings`` (``tiling`` configs or ``None``; ``Layout.special_tokens``: Idefics3's ``<row_1_col_1>``, ...)
    present: the one saved with ``init_from`` (``saved_tokenizer``) when there is one, else the recipe's
    (``tokenizer``). A saved tokenizer lacking one of those special tokens is a ``ConfigError`` (adding it would
    change the vocabulary the weights were trained with)."""
    from vlm.data.images import check_tiling
    from vlm.data.layouts import LAYOUTS
    from vlm.data.templates import build_template
    from vlm.data.tokenizer import load_tokenizer
    from vlm.train.errors import ConfigError

    saved = saved_tokenizer(cfg.get("init_from"))
    if saved is not None:
        tok = load_tokenizer(saved)
    else:
        factory = TOKENIZERS.get(cfg.tokenizer.name)
        extra = {"data": cfg.data} if "data" in inspect.signature(factory).parameters else {}
        tok = TOKENIZERS.build(cfg.tokenizer, **extra)
    wanted = [t for spec in templates for t in build_template(plain(spec)).special_tokens(tok)]
    for tiling in tilings:
        options = check_tiling(plain(tiling))
        if options is not None:
            wanted += LAYOUTS.get(options["kind"]).special_tokens(options)
    missing: list[str] = []
    for t in wanted:
        if t not in tok.get_vocab() and t not in missing:
            missing.append(t)
    if missing and saved is not None:
        raise ConfigError(f"init_from={cfg.init_from!r}: the tokenizer saved with it ({saved}) has no special token "
                          f"{missing} that the stages' templates {[plain(t) for t in templates]} or image layouts "
                          f"emit; expected the template and layout the model was trained with (adding tokens would "
                          f"change the vocabulary of its weights)")
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    return tok


def build_model(cfg: DictConfig, tokenizer: Any, *, gradient_checkpointing: bool | str = False) -> vlm.VLM:
    """``vlm.build`` on the run's ``{encoder, connector, llm}`` (random init seeded by the caller);
    ``gradient_checkpointing``: a ``vlm.recompute`` mode for the LLM's decoder layers and the tower's blocks."""
    model_cfg = model_config(cfg)
    mode = recompute_mode(gradient_checkpointing)
    if mode != "none":
        model_cfg["llm"]["gradient_checkpointing"] = mode
    model = vlm.build(model_cfg, tokenizer)
    if mode != "none":
        model.encoder.enable_gradient_checkpointing(mode)  # towers that cannot (timm CNNs) keep their activations
    return model


def fingerprint(model: nn.Module, name: Callable[[str], str] | None = None) -> tuple[str, dict[str, list[int]]]:
    """A hash of the model's parameter names (as ``name`` maps them, e.g. to checkpoint names), shapes and
    trainability (what a checkpoint must match)."""
    shapes = {(name(n) if name else n): [*p.shape, int(p.requires_grad)] for n, p in model.named_parameters()}
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

    resolved = plain(cfg)
    model = strip({k: resolved.get(k) for k in MODEL_KEYS})
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


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
