"""Datasets: records -> ``Sample`` (reader) -> processed tensors (processor), lazily in ``__getitem__``.

``SampleDataset`` converts a row only when it is asked for, so with a ``DataLoader`` the reading, image decoding and
tiling happen in the workers. Bad samples raise a ``SampleError`` naming the data file, the index/id, the image file
and the problem; with ``skip_bad=True`` they are skipped instead (the next index is tried), counted by reason in
``dataset.bad`` and listed in the returned item's ``meta["skipped"]`` (so a training loop can aggregate counts over
DataLoader workers: collators merge them into ``batch["meta"]["skipped"]``). Samples the processor drops by policy
(too long to truncate, over the tile budget) are always skipped and counted.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from torch.utils.data import Dataset

from vlm.data.errors import DataError
from vlm.data.processor import Processor, SampleDropped
from vlm.data.readers import detect_format, load_records, make_reader, reason_of
from vlm.data.readers.base import Reader, locate
from vlm.data.sample import Sample

log = logging.getLogger(__name__)


class BadSamples:
    """Counts skipped samples by reason and keeps the first ``keep`` messages as examples."""

    def __init__(self, keep: int = 5) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: list[str] = []
        self.keep = keep

    def add(self, err: BaseException) -> dict[str, Any]:
        reason = reason_of(err)
        self.counts[reason] += 1
        if len(self.examples) < self.keep:
            self.examples.append(str(err))
        return {"index": getattr(err, "index", None), "id": getattr(err, "sample_id", None), "reason": reason,
                "message": str(err)}

    def update(self, skipped: Sequence[Mapping[str, Any]]) -> None:
        """Merge ``batch["meta"]["skipped"]`` entries (e.g. counts made in DataLoader workers)."""
        for s in skipped:
            self.counts[s["reason"]] += 1
            if len(self.examples) < self.keep:
                self.examples.append(s.get("message", ""))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.total:
            return "no bad samples"
        by = ", ".join(f"{r}: {n}" for r, n in self.counts.most_common())
        ex = "".join(f"\n  e.g. {e}" for e in self.examples)
        return f"skipped {self.total} bad sample(s) ({by}){ex}"


class SampleDataset(Dataset):
    """A map-style dataset over records of one format.

    Args:
        source: data file (``.json``/``.jsonl``/``.parquet``), ``save_to_disk`` directory, list of records or HF
            ``Dataset`` (see :func:`vlm.data.readers.load_records`).
        format: a registered reader name, or ``"auto"`` (detected from the first record).
        processor: when given, items are processed dicts; otherwise ``Sample``s.
        image_folder: root for relative image paths.
        allow_urls: accept ``http(s)`` images (reader) and fetch them (processor).
        skip_bad: skip bad samples (counted in :attr:`bad`) instead of raising.
        add_generation_prompt: process for generation (evaluation): the final assistant reply becomes
            ``meta["target"]``.
        split, backend: passed to ``load_records``. ``reader_options``: more reader arguments (``check_files``, ...).
    """

    def __init__(self, source: Any, format: str = "auto", *, processor: Processor | None = None,
                 image_folder: str | os.PathLike | None = None, allow_urls: bool = False, skip_bad: bool = False,
                 add_generation_prompt: bool = False, split: str = "train", backend: str = "auto",
                 max_skip: int = 1000, **reader_options: Any) -> None:
        self.records = load_records(source, split=split, backend=backend)
        if len(self.records) == 0:
            raise ValueError(f"no records in {source!r}")
        self.source_name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else None
        if format == "auto":
            try:
                format = detect_format(self.records[0])
            except DataError as e:
                raise locate(e, index=0, source=self.source_name) from None
        self.format = format
        self.reader: Reader = make_reader(format, image_folder=image_folder, allow_urls=allow_urls,
                                          source=self.source_name, **reader_options)
        self.processor, self.allow_urls, self.skip_bad = processor, allow_urls, skip_bad
        self.add_generation_prompt, self.max_skip = add_generation_prompt, max_skip
        self.bad = BadSamples()

    def __len__(self) -> int:
        return len(self.records)

    def sample(self, index: int) -> Sample:
        """The validated ``Sample`` at ``index`` (raises ``SampleError``; no skipping)."""
        return self.reader.convert(self.records[index], index=index)

    def _item(self, index: int) -> Any:
        sample = self.sample(index)
        if self.processor is None:
            return sample
        return self.processor(sample, self.add_generation_prompt, allow_urls=self.allow_urls or None)

    def __getitem__(self, index: int) -> Any:
        skipped: list[dict[str, Any]] = []
        for k in range(min(self.max_skip, len(self)) + 1):
            i = (index + k) % len(self)
            try:
                item = self._item(i)
            except SampleDropped as e:
                skipped.append(self.bad.add(e))
            except DataError as e:
                if not self.skip_bad:
                    raise
                skipped.append(self.bad.add(e))
            else:
                meta = item.meta if isinstance(item, Sample) else item["meta"]
                if skipped:
                    meta["skipped"] = skipped
                return item
        raise RuntimeError(f"{self.source_name or 'dataset'}: {len(skipped)} consecutive bad samples from index "
                           f"{index}; {self.bad.summary()}")

    def __iter__(self) -> Iterator[Any]:
        """Every good item once (bad ones skipped per policy); logs the bad-sample summary at the end."""
        for i in range(len(self)):
            try:
                yield self._item(i)
            except SampleDropped as e:
                self.bad.add(e)
            except DataError as e:
                if not self.skip_bad:
                    raise
                self.bad.add(e)
        if self.bad.total:
            log.warning("%s: %s", self.source_name or "dataset", self.bad.summary())

    def report(self) -> str:
        """A one-paragraph summary of skipped samples (counts by reason plus examples)."""
        return self.bad.summary()


def read_samples(source: Any, format: str = "auto", **options: Any) -> Iterator[Sample]:
    """Iterate over the ``Sample``s of ``source`` (``SampleDataset`` options: ``image_folder``, ``skip_bad``, ...)."""
    yield from SampleDataset(source, format, **options)
