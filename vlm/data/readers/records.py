"""Record collections: where records come from before a reader converts them.

``load_records(source)`` returns a random-access sequence of mappings, without converting anything:

- a ``list`` of dicts, an HF ``datasets.Dataset`` (or ``DatasetDict`` -> ``split``);
- ``*.json`` (a JSON array, or an object whose ``data`` is one, parsed with ``json``: records may differ in schema;
  a single object that is not is refused, naming the file: a record alone is written ``[{...}]``);
- ``*.jsonl`` (indexed by line offsets, each line parsed on access: lazy and cheap in memory);
- ``*.parquet``, and ``*.json``/``*.jsonl`` with ``backend="datasets"``, through HF ``datasets`` (memory-mapped
  Arrow; note Arrow unifies schemas, filling absent keys with ``None``, which the readers ignore);
- a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``.

Rows of an HF dataset are only materialized (and ``Image`` columns decoded) on ``__getitem__``, i.e. in the
DataLoader workers.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from vlm.data.readers.base import SampleError


class JsonlRecords(Sequence):
    """A JSON Lines file as a lazy sequence: line offsets are indexed once, each record parsed on access."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self._offsets: list[int] = []
        self._lines: list[int] = []
        with open(self.path, "rb") as f:
            pos = 0
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    self._offsets.append(pos)
                    self._lines.append(lineno)
                pos += len(line)

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, i: int) -> Any:  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        with open(self.path, "rb") as f:
            f.seek(self._offsets[i])
            line = f.readline()
        try:
            return json.loads(line)
        except json.JSONDecodeError as e:
            raise SampleError(f"invalid JSON on line {self._lines[i]}: {e}", reason="format", index=i,
                            source=self.path) from e


def _hf_split(ds: Any, split: str, where: str) -> Any:
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise KeyError(f"{where}: no split {split!r}; available: {sorted(ds)}")
        return ds[split]
    return ds


def load_records(source: Any, *, split: str = "train", backend: str = "auto") -> Sequence[Mapping[str, Any]]:
    """A random-access sequence of raw records from ``source`` (see the module docstring).

    Args:
        source: path (file or ``save_to_disk`` directory), list of dicts, or an HF ``Dataset``/``DatasetDict``.
        split: which split of a ``DatasetDict``.
        backend: ``"auto"`` (json/jsonl natively, parquet/directories via ``datasets``) or ``"datasets"``.
    """
    if backend not in ("auto", "datasets"):
        raise ValueError(f"backend must be 'auto' or 'datasets', got {backend!r}")
    if isinstance(source, (list, tuple)):
        return source
    if not isinstance(source, (str, os.PathLike)):
        if hasattr(source, "__getitem__") and hasattr(source, "__len__"):
            return _hf_split(source, split, type(source).__name__)
        raise TypeError(f"cannot read records from a {type(source).__name__}")
    path = os.fspath(source)
    if not os.path.exists(path):
        raise FileNotFoundError(f"data source not found: {path}")
    import datasets

    if os.path.isdir(path):
        markers = ("dataset_info.json", "state.json", "dataset_dict.json")
        if not any(os.path.exists(os.path.join(path, m)) for m in markers):
            raise ValueError(f"{path} is a directory but not a datasets.save_to_disk() output (no {markers})")
        return _hf_split(datasets.load_from_disk(path), split, path)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".parquet" or backend == "datasets":
        kind = {".parquet": "parquet", ".json": "json", ".jsonl": "json"}.get(ext)
        if kind is None:
            raise ValueError(f"{path}: unsupported extension {ext!r} for backend 'datasets' "
                             f"(expected .json, .jsonl or .parquet)")
        return datasets.load_dataset(kind, data_files=path, split="train")
    if ext == ".jsonl":
        return JsonlRecords(path)
    if ext == ".json":
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise SampleError(f"invalid JSON: {e}", reason="format", source=path) from e
        if isinstance(data, Mapping) and isinstance(data.get("data"), list):  # {"data": [...]}
            data = data["data"]
        elif isinstance(data, Mapping):
            raise SampleError(f"holds a single JSON object (keys {sorted(map(str, data))[:6]}), not a list of "
                              f"records; expected a JSON array of records ([{{...}}, {{...}}]; one record: [{{...}}]),"
                              f" an object whose 'data' is that array, or a .jsonl file (one record per line)",
                              reason="format", source=path)
        if not isinstance(data, list):
            raise SampleError(f"expected a JSON array of records, got {type(data).__name__}", reason="format",
                            source=path)
        return data
    raise ValueError(f"{path}: unsupported data file extension {ext!r} (expected .json, .jsonl, .parquet or a "
                     f"save_to_disk directory)")
