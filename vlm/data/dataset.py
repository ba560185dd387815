"""Datasets: records -> ``Sample`` (reader, ``SampleDataset``) -> processed tensors (processor, ``ProcessedDataset``),
lazily in ``__getitem__``.

``SampleDataset`` converts a row only when it is asked for, and ``ProcessedDataset`` processes any dataset of
``Sample``s (a ``SampleDataset``, the ``shapes`` generator) the same way, so with a ``DataLoader`` the reading, image
decoding and tiling happen in the workers. Bad samples raise a ``SampleError`` naming the data file, the index/id, the image file
and the problem; with ``skip_bad=True`` they are skipped instead (the next index is tried), counted once each by
reason in ``dataset.bad`` and listed in the returned item's ``meta["skipped"]`` (so a training loop can aggregate counts over
DataLoader workers: collators merge them into ``batch["meta"]["skipped"]``). Samples the processor drops by policy
(too long to truncate, over the tile budget) are always skipped and counted. ``max_bad_fraction`` stops the
reading with a ``TooManyBadSamples`` error once more than that fraction of the samples is known to be bad.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from torch.utils.data import Dataset

from vlm.data.errors import DataError
from vlm.data.processor import Processor, SampleDropped
from vlm.data.readers import detect_format, load_records, make_reader, reason_of
from vlm.data.readers.base import Reader, locate
from vlm.data.sample import Sample

log = logging.getLogger(__name__)


class TooManyBadSamples(DataError):
    """More of a dataset is bad than ``max_bad_fraction`` allows, or every sample tried in a row was bad.

    Over the fraction (``over_limit``), the error keeps what it counted (``limit``), so that whoever knows where the
    limit is configured can name that key (``for_key``): a data set built alone does not know it, its stage does."""

    def __init__(self, problem: str, limit: tuple[Any, ...] | None = None) -> None:
        super().__init__(problem)
        self.limit = limit

    def __reduce__(self):  # picklable across DataLoader workers
        return (type(self), (self.problem, self.limit))

    @classmethod
    def over_limit(cls, where: str, bad: int, num_samples: int, max_fraction: float, summary: str,
                   option: str = "max_bad_fraction", override: str | None = None) -> TooManyBadSamples:
        """``bad`` of ``num_samples`` are more than ``max_fraction`` allows; the message names ``option`` (the key)
        and ``override``, the exact override that raises the limit (default ``option``)."""
        override = override or option
        return cls(f"{where}: {bad} of its {num_samples} samples are bad ({bad / num_samples:.1%} found so far), "
                   f"more than {option}={max_fraction:g} allows ({int(max_fraction * num_samples)}); {summary}\n"
                   f"Fix the data, or raise the limit: {override}=FRACTION (1.0 skips any number of bad samples).",
                   (where, bad, num_samples, max_fraction, summary))

    def for_key(self, option: str, override: str | None = None) -> TooManyBadSamples:
        """This error naming ``option`` / ``override`` as the limit's key (itself when it is not over a limit)."""
        return self if self.limit is None else self.over_limit(*self.limit, option=option, override=override)


#: skip reasons that are a stage's choice, not a fault of the sample (``Objective.images_per_sample``)
POLICY_REASONS = frozenset({"images_per_sample"})


class BadSamples:
    """Skipped samples, each counted once (by index; a sample skipped again in a later epoch or by another request is
    not counted twice), by reason, with the first ``keep`` messages as examples."""

    def __init__(self, keep: int = 5) -> None:
        self.reasons: dict[Any, str] = {}   # sample key (index, else the message) -> reason
        self.examples: list[str] = []
        self.keep = keep

    def _record(self, key: Any, reason: str, message: str) -> None:
        if key in self.reasons:
            return
        self.reasons[key] = reason
        if len(self.examples) < self.keep and message:
            self.examples.append(message)

    def add(self, err: BaseException) -> dict[str, Any]:
        """Count ``err``'s sample; returns the ``meta["skipped"]`` entry ``{index, id, reason, message}``."""
        entry = {"index": getattr(err, "index", None), "id": getattr(err, "sample_id", None),
                 "reason": reason_of(err), "message": str(err)}
        self.update([entry])
        return entry

    def update(self, skipped: Sequence[Mapping[str, Any]]) -> None:
        """Merge ``batch["meta"]["skipped"]`` entries (e.g. counts made in DataLoader workers)."""
        for s in skipped:
            index = s.get("index")
            self._record(index if index is not None else s.get("message", ""), s["reason"], s.get("message", ""))

    def state(self) -> dict[str, Any]:
        """JSON-able state (``merge`` it into another ``BadSamples``: across processes or after a resume)."""
        return {"samples": [[k, r] for k, r in self.reasons.items()], "examples": list(self.examples)}

    def merge(self, state: Mapping[str, Any]) -> None:
        for key, reason in state.get("samples", []):
            self._record(key, reason, "")
        self.examples = (self.examples + [e for e in state.get("examples", []) if e not in self.examples])[:self.keep]

    @property
    def counts(self) -> Counter[str]:
        return Counter(self.reasons.values())

    @property
    def total(self) -> int:
        return len(self.reasons)

    def to_dict(self) -> dict[str, Any]:
        """``{"total", "by_reason", "examples"}`` (what ``result.json`` and ``metrics.jsonl`` record)."""
        return {"total": self.total, "by_reason": dict(self.counts.most_common()), "examples": list(self.examples)}

    @property
    def policy_total(self) -> int:
        """Samples skipped by the stage's own choice (``POLICY_REASONS``): fine data another stage trains on."""
        return sum(n for r, n in self.counts.items() if r in POLICY_REASONS)

    def summary(self) -> str:
        """``skipped N bad sample(s) (reason: n, ...)``, then the samples the stage left out by its own choice
        (``POLICY_REASONS``: not bad data, worded apart), then the first messages."""
        if not self.total:
            return "no bad samples"
        counts = self.counts.most_common()
        bad = [(r, n) for r, n in counts if r not in POLICY_REASONS]
        policy = [(r, n) for r, n in counts if r in POLICY_REASONS]
        parts = []
        if bad:
            parts.append(f"skipped {sum(n for _, n in bad)} bad sample(s) ({', '.join(f'{r}: {n}' for r, n in bad)})")
        if policy:
            parts.append(f"left out {self.policy_total} sample(s) this stage does not train on, by its own choice, "
                         f"not bad data ({', '.join(f'{r}: {n}' for r, n in policy)})")
        ex = "".join(f"\n  e.g. {e}" for e in self.examples)
        return "; ".join(parts) + ex

    def check(self, num_samples: int, max_fraction: float | None, where: str, option: str = "max_bad_fraction",
              override: str | None = None) -> None:
        """Raise ``TooManyBadSamples`` when more than ``max_fraction`` of ``num_samples`` are known to be bad (the
        count is a lower bound of the truth, so this never fires early). Skips by the stage's own choice
        (``POLICY_REASONS``: samples fine for other stages) are not faults of the data and count on neither side.
        The message names ``option`` (the limit's key) and ``override`` (the exact override that raises it, e.g.
        ``+data.sft.max_bad_fraction`` for a key the config does not hold yet; default ``option``)."""
        policy = self.policy_total
        bad, num_samples = self.total - policy, num_samples - policy
        if max_fraction is None or bad <= max_fraction * num_samples:
            return
        raise TooManyBadSamples.over_limit(where, bad, num_samples, max_fraction, self.summary(), option, override)


class SampleDataset(Dataset):
    """A map-style dataset over records of one format.

    Args:
        source: data file (``.json``/``.jsonl``/``.parquet``), ``save_to_disk`` directory, list of records or HF
            ``Dataset`` (see :func:`vlm.data.readers.load_records`).
        format: a registered reader name, or ``"auto"`` (detected from the first record).
        image_folder: root for relative image paths.
        allow_urls: accept ``http(s)`` images (reader) and let a ``ProcessedDataset`` over it fetch them.
        skip_bad: skip bad samples (counted in :attr:`bad`) instead of raising.
        max_bad_fraction: raise ``TooManyBadSamples`` once more than this fraction of the samples is known to be bad
            (skipped for any reason); ``None``: no limit.
        max_skip: at most this many bad samples in a row are skipped for one request (then ``TooManyBadSamples``).
        split, backend: passed to ``load_records``. ``reader_options``: more reader arguments (``check_files``, ...).
    """

    def __init__(self, source: Any, format: str = "auto", *, image_folder: str | os.PathLike | None = None,
                 allow_urls: bool = False, skip_bad: bool = False, split: str = "train", backend: str = "auto",
                 max_skip: int = 1000, max_bad_fraction: float | None = None, **reader_options: Any) -> None:
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
        self.allow_urls, self.skip_bad, self.max_skip = allow_urls, skip_bad, max_skip
        if max_bad_fraction is not None and not 0 <= max_bad_fraction <= 1:
            raise ValueError(f"max_bad_fraction={max_bad_fraction!r}; expected a fraction in [0, 1] or None")
        self.max_bad_fraction = max_bad_fraction
        self.config_key: str | None = None  # where the dataset is configured (e.g. ``data.sft``), named in errors
        # the exact override that raises max_bad_fraction (``data.max_bad_fraction``, ``+data.sft.max_bad_fraction``:
        # where the config sets it, which the dataset cannot know), named in TooManyBadSamples; None: config_key's
        self.max_bad_fraction_key: str | None = None
        self.bad = BadSamples()

    def __len__(self) -> int:
        return len(self.records)

    def sample(self, index: int) -> Sample:
        """The validated ``Sample`` at ``index`` (raises ``SampleError``; no skipping)."""
        return self.reader.convert(self.records[index], index=index)

    def __getitem__(self, index: int) -> Any:
        return self.first_good(index)

    def first_good(self, index: int, transform: Callable[[Sample], Any] | None = None) -> Any:
        """``transform(sample(i))`` (default: the ``Sample``) for the first ``i = index, index + 1, ...`` (wrapping)
        that is good under this dataset's policy: ``SampleDropped`` (from ``transform``) is always skipped, other
        ``DataError``s only with ``skip_bad``; skipped samples are counted in :attr:`bad` and listed in the item's
        ``meta["skipped"]``."""
        skipped: list[dict[str, Any]] = []
        tries = min(self.max_skip, len(self))
        for k in range(tries):
            i = (index + k) % len(self)
            try:
                item = self.sample(i) if transform is None else transform(self.sample(i))
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
                    self.check_bad()
                return item
        name = self.source_name or "dataset"
        if tries == len(self) and self.bad.policy_total:  # some left out by the stage's choice: not all bad data
            raise TooManyBadSamples(f"{name}: none of its {len(self)} samples can train in this stage; "
                                    f"{self.bad.summary()}")
        if tries == len(self):
            raise TooManyBadSamples(f"{name}: all {len(self)} samples are bad; {self.bad.summary()}")
        raise TooManyBadSamples(f"{name}: the {tries} samples from index {index} on are all bad (max_skip={tries}); "
                                f"{self.bad.summary()}")

    def check_bad(self) -> None:
        """Raise ``TooManyBadSamples`` when more than ``max_bad_fraction`` of the samples are known to be bad."""
        key = self.max_bad_fraction_key
        option = key.lstrip("+") if key else (f"{self.config_key}." if self.config_key else "") + "max_bad_fraction"
        self.bad.check(len(self), self.max_bad_fraction, self.source_name or "dataset", option=option, override=key)

    def __iter__(self) -> Iterator[Any]:
        return self.iterate()

    def iterate(self, transform: Callable[[Sample], Any] | None = None) -> Iterator[Any]:
        """Every good item (``transform(sample)``, default the ``Sample``) once, bad ones skipped per policy; logs
        the bad-sample summary at the end."""
        for i in range(len(self)):
            try:
                sample = self.sample(i)
                yield sample if transform is None else transform(sample)
            except SampleDropped as e:
                self.bad.add(e)
                self.check_bad()
            except DataError as e:
                if not self.skip_bad:
                    raise
                self.bad.add(e)
                self.check_bad()
        if self.bad.total:
            log.warning("%s: %s", self.source_name or "dataset", self.bad.summary())

    def report(self) -> str:
        """A one-paragraph summary of skipped samples (counts by reason plus examples)."""
        return self.bad.summary()


class WrapsSamples:
    """A dataset over ``self.samples`` (a :class:`SampleDataset` or any dataset): the wrapped dataset's attributes
    (``bad``, ``max_bad_fraction``, ``check_bad``, ``report``, ...) are read through, and ``config_key`` /
    ``max_bad_fraction_key`` (set by the stage, named in errors) are written through, so that the skips a worker
    counts and the errors it raises name the configured data set."""

    samples: Any

    @property
    def config_key(self) -> str | None:
        """Where the dataset is configured (``data.sft``), named in its errors; the wrapped dataset's."""
        return self.samples.config_key

    @config_key.setter
    def config_key(self, key: str | None) -> None:
        self.samples.config_key = key

    @property
    def max_bad_fraction_key(self) -> str | None:
        """The override that raises ``max_bad_fraction``, named in its errors; the wrapped dataset's."""
        return self.samples.max_bad_fraction_key

    @max_bad_fraction_key.setter
    def max_bad_fraction_key(self, key: str | None) -> None:
        self.samples.max_bad_fraction_key = key

    def __getattr__(self, name: str) -> Any:
        """The wrapped dataset's attributes (``bad``, ``max_bad_fraction``, ``check_bad``, ``report``, ...)."""
        if name == "samples":  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.samples, name)


class ProcessedDataset(WrapsSamples, Dataset):
    """``processor(samples[i], add_generation_prompt)`` lazily (in DataLoader workers when there are any), for any
    dataset of ``Sample``s.

    Over a :class:`SampleDataset` the processing runs under that dataset's bad-sample policy: samples the processor
    drops (``SampleDropped``) or rejects (``DataError``, with ``skip_bad``) are skipped to the next index and counted in
    ``samples.bad``; its ``bad``, ``max_bad_fraction``, ``check_bad``, ``report`` and ``config_key`` are this
    dataset's too. ``add_generation_prompt``: process for generation (evaluation): the final assistant reply becomes
    ``meta["target"]``.
    """

    def __init__(self, samples: Any, processor: Processor, add_generation_prompt: bool = False) -> None:
        self.samples, self.processor, self.add_generation_prompt = samples, processor, add_generation_prompt
        self.allow_urls = getattr(samples, "allow_urls", False)
        # what the stage's objective needs (``Objective.images_per_sample``): others are dropped, counted and named
        self.images_per_sample: int | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def process(self, sample: Sample) -> dict[str, Any]:
        """One sample's processed item (``input_ids``, ``labels``, ``pixel_values``, ``meta``; see ``Processor``).
        Raises ``SampleDropped`` (reason ``images_per_sample``) for a sample whose image count is not
        ``images_per_sample`` (when set)."""
        n = self.images_per_sample
        if n is not None and len(sample.images) != n:
            raise SampleDropped(f"{len(sample.images)} image(s); this stage's objective needs exactly {n} per sample "
                                f"(text-only samples train in stages with the lm objective)",
                                reason="images_per_sample", sample_id=sample.id)
        return self.processor(sample, self.add_generation_prompt, allow_urls=self.allow_urls or None)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if isinstance(self.samples, SampleDataset):
            return self.samples.first_good(index, self.process)
        return self.process(self.samples[index])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if isinstance(self.samples, SampleDataset):
            return self.samples.iterate(self.process)
        return (self.process(self.samples[i]) for i in range(len(self)))


def read_samples(source: Any, format: str = "auto", **options: Any) -> Iterator[Sample]:
    """Iterate over the ``Sample``s of ``source`` (``SampleDataset`` options: ``image_folder``, ``skip_bad``, ...)."""
    yield from SampleDataset(source, format, **options)
