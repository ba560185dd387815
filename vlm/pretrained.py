"""Local transformers-style directories: their file names, checks before ``from_pretrained`` reads one, and readers
of the JSON files they hold.

Each failure names the directory or file, what is wrong, and what was expected, instead of transformers' generic
"no file named ..." error (and nothing is ever fetched from a hub).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.json"
#: the single-file safetensors weights of a directory (what ``VLM.save_pretrained`` and transformers write)
WEIGHTS_FILE = "model.safetensors"
# Weight files a transformers directory may hold, in the order ``from_pretrained`` prefers them.
WEIGHT_FILES = (WEIGHTS_FILE, "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
#: image-processor settings (``image_mean`` / ``image_std``): the flat file, and the v5 processor file that nests them
IMAGE_PROCESSOR_CONFIG = "preprocessor_config.json"
PROCESSOR_CONFIG = "processor_config.json"
#: keys ``save_pretrained`` writes into a config that describe the file, not the architecture
FILE_KEYS = ("architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype")


def check_weights(path: Path, who: str) -> Path:
    """The weights file (or shard index) ``from_pretrained`` will read in ``path``; every shard an index names must
    exist. ``who`` prefixes the error (e.g. ``"clip encoder"``)."""
    found = [path / name for name in WEIGHT_FILES if (path / name).is_file()]
    if not found:
        raise FileNotFoundError(f"{who}: no weights in {str(path)!r}: expected one of {', '.join(WEIGHT_FILES)} "
                                f"(config.json is there but the weights file is missing)")
    weights = found[0]
    if weights.name.endswith(".index.json"):
        try:
            index = json.loads(weights.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{who}: {str(weights)!r} is not valid JSON ({e}); expected a shard index with a "
                             f"'weight_map'") from e
        shards = sorted(set(index.get("weight_map", {}).values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{who}: {str(weights)!r} names shard(s) missing from {str(path)!r}: {missing}")
    return weights


def check_pretrained_dir(path: str | os.PathLike, who: str) -> Path:
    """``path`` as a ``Path`` if it is a directory holding ``config.json`` and weights (see ``check_weights``);
    otherwise ``FileNotFoundError`` naming the missing piece."""
    path = Path(path)
    expected = "a local directory written by transformers' save_pretrained (config.json + model.safetensors)"
    if not path.is_dir():
        raise FileNotFoundError(f"{who}: pretrained directory {str(path)!r} does not exist; expected {expected}")
    if not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{who}: no {CONFIG_FILE} in pretrained directory {str(path)!r}; expected {expected}")
    check_weights(path, who)
    return path


def read_config(path: Path, who: str, expected: str) -> dict[str, Any]:
    """``path/config.json`` as a dict. Errors (``FileNotFoundError`` for a missing directory or file, ``ValueError``
    for invalid JSON or a non-object) name ``who``, the path and ``expected`` (what the directory should be)."""
    cfg_file = path / CONFIG_FILE
    if not path.is_dir():
        raise FileNotFoundError(f"{who}: {str(path)!r} is not a directory; expected {expected}")
    if not cfg_file.is_file():
        final = path / "final"  # a training run's directory: its model is final/ (vlm.train.export)
        hint = f" (a training run? its model is {str(final)!r})" if (final / CONFIG_FILE).is_file() else ""
        raise FileNotFoundError(f"{who}: {str(cfg_file)!r} does not exist; expected {expected}{hint}")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{who}: {str(cfg_file)!r} is not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{who}: {str(cfg_file)!r} holds a JSON {type(cfg).__name__}; expected an object "
                         f"({expected})")
    return cfg


def read_image_processor_config(path: Path) -> tuple[dict[str, Any], Path] | None:
    """``(config, file)``: the directory's image-processor config (flat ``preprocessor_config.json``, else the
    ``image_processor`` entry of a v5 nested ``processor_config.json``), or ``None``."""
    for name, key in ((IMAGE_PROCESSOR_CONFIG, None), (PROCESSOR_CONFIG, "image_processor")):
        f = path / name
        if not f.is_file():
            continue
        try:
            d = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"from_hf: {str(f)!r} is not valid JSON ({e})") from e
        d = d.get(key) if key and isinstance(d, dict) else d
        if isinstance(d, dict) and d:
            return d, f
    return None


def normalization(config: dict[str, Any] | None) -> tuple[list[float], list[float]] | None:
    """``(image_mean, image_std)`` of an image-processor config, or ``None``."""
    if config and "image_mean" in config and "image_std" in config:
        return list(config["image_mean"]), list(config["image_std"])
    return None


def read_normalization(path: Path) -> tuple[list[float], list[float]] | None:
    """``(image_mean, image_std)`` from the directory's image-processor config (see
    :func:`read_image_processor_config`), or ``None`` when it has none."""
    found = read_image_processor_config(path)
    return normalization(found[0]) if found else None


def read_weights(path: Path, who: str) -> dict[str, Any]:
    """Every tensor of the directory's weights (see ``check_weights``): safetensors, or ``pytorch_model.bin`` through
    ``torch.load(weights_only=True)``; a shard index reads all its shards."""
    import torch
    from safetensors.torch import load_file

    weights = check_weights(path, who)
    files = [weights]
    if weights.name.endswith(".index.json"):
        files = [path / s for s in sorted(set(json.loads(weights.read_text())["weight_map"].values()))]
    state: dict[str, Any] = {}
    for f in files:
        state.update(load_file(str(f)) if f.suffix == ".safetensors" else torch.load(f, weights_only=True))
    return state


def load_strict(module: Any, state: dict[str, Any], what: str) -> None:
    """``module.load_state_dict(state)`` strictly; a mismatch is a ``ValueError`` naming ``what`` and every missing /
    unexpected key and shape mismatch."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(set(own) & set(state))
              if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{what}: weights do not match the architecture: missing keys {missing}, unexpected keys "
                         f"{unexpected}, shape mismatches (file vs model) {shapes}")
    module.load_state_dict(state, strict=True)
