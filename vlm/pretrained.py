"""Checks on a local transformers directory before ``from_pretrained`` reads it.

Each failure names the directory or file, what is wrong, and what was expected, instead of transformers' generic
"no file named ..." error (and nothing is ever fetched from a hub).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

CONFIG_FILE = "config.json"
# Weight files a transformers directory may hold, in the order ``from_pretrained`` prefers them.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


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
