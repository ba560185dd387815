"""``FeatureCache``: a frozen vision encoder's outputs stored on disk once and reused across epochs and runs.

``stage.<name>.cache_features: true`` (a stage whose encoder policy is ``frozen``) sets ``model.feature_cache``;
``VLM.image_features`` then asks the cache instead of running the frozen encoder. Layout::

    <trainer.feature_cache_dir>/<encoder fingerprint>/shard-<rank>-<pid>-<n>.safetensors

- the folder is named by a hash of the encoder's config (``export_config``) and every weight: another encoder, other
  weights or another feature layer / token selection use another folder, never stale features;
- each image's entry is keyed by a hash of its preprocessed pixels (shape, dtype and bytes): changing the
  preprocessing (size, resize mode, normalization, tiling) changes the key; the same image in two samples or two
  runs is encoded once;
- shards are safetensors files of ``shard_size`` entries, written when full and at ``flush()`` (the end of the
  stage); readers open them lazily (memory-mapped), so the cache may be larger than memory.

Features are stored in the encoder's output dtype, so a cached feature equals the one the encoder produced.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn


def encoder_fingerprint(encoder: nn.Module) -> str:
    """A hex digest of ``encoder``'s config and weights (names, shapes, dtypes, values)."""
    h = hashlib.sha256()
    config = encoder.export_config() if hasattr(encoder, "export_config") else {"class": type(encoder).__name__}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(encoder.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


def pixel_key(pixels: torch.Tensor) -> str:
    """The cache key of one preprocessed image ``(3, H, W)``: a hash of its shape, dtype and values."""
    t = pixels.detach().cpu().contiguous()
    h = hashlib.blake2b(f"{tuple(t.shape)}:{t.dtype}".encode(), digest_size=16)
    h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class FeatureCache:
    """Encoder outputs keyed by pixels, under a folder named by the encoder's fingerprint.

    ``__call__(encoder, pixel_values (N, 3, H, W)) -> (N, T, C)``: cached rows are read, the others are encoded in one
    batch and stored. ``hits`` / ``misses`` count images. Raises ``ValueError`` if the encoder is not the one the
    cache was opened for (its fingerprint is checked when ``check`` is called, e.g. at the start of a stage).
    """

    def __init__(self, directory: str | os.PathLike, encoder: nn.Module, shard_size: int = 1024,
                 rank: int = 0) -> None:
        if shard_size < 1:
            raise ValueError(f"FeatureCache: shard_size must be >= 1; got {shard_size}")
        self.fingerprint = encoder_fingerprint(encoder)
        self.dir = Path(directory) / self.fingerprint
        self.dir.mkdir(parents=True, exist_ok=True)
        self.shard_size, self.rank = int(shard_size), int(rank)
        self.index: dict[str, Path] = {}
        self._open: dict[Path, Any] = {}
        self.pending: dict[str, torch.Tensor] = {}
        self.hits = self.misses = self._written = 0
        for shard in sorted(self.dir.glob("shard-*.safetensors")):
            with safe_open(str(shard), "pt") as f:
                for key in f.keys():
                    self.index.setdefault(key, shard)

    def __len__(self) -> int:
        return len(self.index) + len(self.pending)

    def _read(self, key: str) -> torch.Tensor:
        if key in self.pending:
            return self.pending[key]
        shard = self.index[key]
        if shard not in self._open:
            self._open[shard] = safe_open(str(shard), "pt")
        return self._open[shard].get_tensor(key)

    def __call__(self, encoder: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        keys = [pixel_key(p) for p in pixel_values]
        missing = [i for i, k in enumerate(keys) if k not in self.index and k not in self.pending]
        fresh: dict[int, torch.Tensor] = {}
        if missing:
            with torch.no_grad():
                feats = encoder(pixel_values[missing])
            for j, i in enumerate(missing):
                fresh[i] = feats[j]
                if keys[i] not in self.pending:
                    self.pending[keys[i]] = feats[j].detach().to("cpu", copy=True).contiguous()
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        rows = [fresh[i] if i in fresh else self._read(k).to(pixel_values.device) for i, k in enumerate(keys)]
        if len(self.pending) >= self.shard_size:
            self.flush()
        return torch.stack(rows)

    def flush(self) -> None:
        """Write the pending entries as one shard (atomically: a temporary name, then renamed)."""
        if not self.pending:
            return
        name = f"shard-{self.rank}-{os.getpid()}-{self._written:05d}.safetensors"
        tmp = self.dir / f".{name}.tmp"
        save_file(self.pending, str(tmp), metadata={"encoder": self.fingerprint})
        os.replace(tmp, self.dir / name)
        for key in self.pending:
            self.index[key] = self.dir / name
        self.pending, self._written = {}, self._written + 1
