"""Your own data for any recipe: the ``files`` dataset (``recipes/data/files.yaml``).

``python -m vlm.train recipe=tiny data=files data.train=my/train.json`` points every stage of a recipe at one file of
any reader format (``vlm.data.readers``: LLaVA json, messages, Qwen-VL, ...):

- ``files`` with ``part: train`` is the training file, less a fixed held-out slice of ``heldout`` samples (a
  permutation seeded by ``seed``; ``auto``: 10 %, 1..200) when no evaluation file is given; ``part: eval`` is the
  evaluation file, or that held-out slice (each part says which samples it is: ``selection``, logged by the run).
  Relative image paths resolve against ``image_root``, else against the data file's own folder; a path leading out
  of it is a counted skip unless ``allow_outside_root``. Built for training, every sample is read once up front (bad
  ones counted, so every stage reports them alike) and ``epochs`` bounds each stage's passes (``max_epochs``).
- Caption stages (``pretrain``, ``align``: template ``plain``) read the same samples: ``plain`` keeps only the
  assistant text as the label (the user text is dropped), so the file's answers are the captions.

The settings that follow the data (``${vlm.image_size:...}`` and friends) are resolvers of the training config
(``vlm.train.resolvers``).
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from vlm.data.dataset import SampleDataset
from vlm.data.dataset_registry import DATASETS, check_format, processed
from vlm.data.errors import DataError
from vlm.data.sample import Sample
from vlm.registry import OptionError

PARTS = ("train", "eval")
#: ``heldout: auto``: this fraction of the training file is held out for evaluation, at least 1, at most HELDOUT_MAX
HELDOUT_FRACTION = 0.1
HELDOUT_MAX = 200
#: record fields kept in ``sample.meta`` for scoring (``vlm.eval.score``)
REFERENCE_KEYS = ("task", "category", "answers", "answer", "options", "captions", "metric")


class _Part(SampleDataset):
    """A ``SampleDataset`` restricted to ``indices`` of its file (errors name the file's own sample index).

    A record's optional reference fields (``REFERENCE_KEYS``: ``task``, ``category``, ``answers``, ``options``,
    ``captions``, ...) are kept in ``sample.meta``: the evaluation (``vlm.eval.score``) picks each sample's metric
    and table row from them."""

    def __init__(self, source: str, indices: Sequence[int] | None, **options: Any) -> None:
        super().__init__(source, **options)
        self.indices = list(range(len(self.records))) if indices is None else list(indices)
        self.selection: str | None = None    # which samples of the file this part is (logged by the run)
        self.max_epochs: float | None = None  # a stage trains at most this many passes over it (stage.py asks)

    def scan(self) -> list[tuple[int, Sample]]:
        """Every sample read once (no image decoded), in order: ``[(index, sample)]`` of the good ones; the bad ones
        (missing image, outside the image folder, malformed record, ...) counted in ``bad``, so every stage that
        trains on this part reports them the same way, whichever samples it reaches (raises them without
        ``skip_bad``)."""
        good = []
        for k in range(len(self)):
            try:
                good.append((k, self.sample(k)))
            except DataError as e:
                if not self.skip_bad:
                    raise
                self.bad.add(e)
        return good

    def __len__(self) -> int:
        return len(self.indices)

    def sample(self, index: int):  # type: ignore[override]
        i = self.indices[index]
        record = self.records[i]
        sample = self.reader.convert(record, index=i)
        if isinstance(record, Mapping):
            for key in REFERENCE_KEYS:
                if record.get(key) is not None:
                    sample.meta.setdefault(key, str(record[key]) if key in ("task", "category") else record[key])
        return sample



def _existing(path: str | None, key: str, what: str = "file") -> str | None:
    if path is not None and not Path(path).exists():
        raise FileNotFoundError(f"{key}={path!r}: does not exist; expected an existing {what}")
    return path


def heldout_size(num_samples: int, heldout: int | str = "auto") -> int:
    """The size of the held-out slice of a file of ``num_samples``: ``heldout`` samples, or with ``"auto"``
    ``HELDOUT_FRACTION`` (10 %) of them, rounded, at least 1 and at most ``HELDOUT_MAX`` (200)."""
    if heldout == "auto":
        return min(HELDOUT_MAX, max(1, round(num_samples * HELDOUT_FRACTION)))
    if isinstance(heldout, bool) or not isinstance(heldout, (int, str)) or not str(heldout).lstrip("-").isdigit():
        raise OptionError("heldout", heldout, "expected a number of samples or auto (10 % of the training file, "
                                              f"at least 1, at most {HELDOUT_MAX})")
    return int(heldout)


def heldout_unused(eval: str | None, heldout: int | str) -> None:
    """Raise ``OptionError`` (naming ``heldout``) when a held-out size is set beside an evaluation file: the file is
    the evaluation set, nothing of the training file is held out, so the size would be silently ignored."""
    if eval is not None and heldout != "auto":
        raise OptionError("heldout", heldout, f"data.eval={eval!r} is given: that file is the evaluation set and no "
                                              f"slice of data.train is held out, so data.heldout would be ignored; "
                                              f"expected one of them: drop data.heldout, or drop data.eval to hold "
                                              f"out data.heldout samples of data.train")


def heldout_indices(num_samples: int, heldout: int | str, seed: int) -> list[int]:
    """The held-out slice of a file of ``num_samples``: ``heldout_size(num_samples, heldout)`` indices of a
    permutation seeded by ``seed`` (sorted); the same for the same file size, seed and ``heldout``."""
    size = heldout_size(num_samples, heldout)
    if not 0 < size < num_samples:
        raise OptionError("heldout", heldout, f"the training file has {num_samples} samples; expected a held-out "
                          f"slice of 1..{num_samples - 1} samples (or give an evaluation file: data.eval=PATH)")
    perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(int(seed)))
    return sorted(perm[:size].tolist())


@DATASETS.register("files")  # recipes/data/files.yaml
def files(train: str, eval: str | None = None, part: str = "train", heldout: int | str = "auto", seed: int = 0,
          format: str = "auto", image_root: str | None = None, check_length: bool = True, processor: Any = None,
          add_generation_prompt: bool = False, skip_bad: bool = True, max_bad_fraction: float | None = 0.05,
          epochs: float | None = None, allow_outside_root: bool = False, **reader_options: Any) -> Any:
    """The training (``part="train"``) or evaluation (``part="eval"``) samples of your own data files.

    Args:
        train: the training file (``.json`` / ``.jsonl`` / ``.parquet`` / ``save_to_disk`` folder).
        eval: the evaluation file; ``None``: ``heldout`` samples of ``train`` (left out of its training part).
        heldout: size of the held-out slice (only without ``eval``), or ``auto``: 10 % of the file, at least 1, at
            most 200 (:func:`heldout_size`); ``seed``: its permutation's seed.
        format: a reader name or ``auto`` (detected from the first record).
        image_root: root of relative image paths; ``None``: each file's own folder.
        check_length: with a ``processor`` (training), check that the longest sample fits its ``max_length``
            (:func:`check_samples_fit`).
        epochs: a stage trains at most this many passes over the part (``dataset.max_epochs``: the stage takes
            ``min(its steps, ceil(epochs * samples / global batch))``); ``None``: the stage's own length.
        allow_outside_root: read image paths that lead outside the image folder (``../x.png``, absolute paths,
            symlinks out of it); by default such a sample is a counted skip (reason ``outside_root``).
    Raises:
        ValueError: an unknown ``part`` or a held-out slice that does not fit; FileNotFoundError: a missing file;
        TooLongError: a training sample longer than ``max_length``; TooManyBadSamples: more bad training samples
        than ``max_bad_fraction`` (every sample is read once when training: a missing image is counted up front).
    """
    if part not in PARTS:
        raise ValueError(f"files part={part!r}; expected one of {list(PARTS)}")
    _existing(train, "data.train")
    _existing(eval, "data.eval")
    _existing(image_root, "data.image_root", "folder")
    heldout_unused(eval, heldout)
    source = eval if part == "eval" and eval is not None else train
    root = image_root if image_root is not None else os.path.dirname(os.path.abspath(source))
    ds = _Part(source, None, format=format, image_folder=root, skip_bad=skip_bad,
               max_bad_fraction=max_bad_fraction, allow_outside_root=allow_outside_root, **reader_options)
    ds.max_epochs = None if epochs is None or part == "eval" else float(epochs)
    if eval is None:  # the training file: its held-out slice, or the rest
        n = len(ds.records)
        held = heldout_indices(n, heldout, seed)
        keep = set(held)
        ds.indices = held if part == "eval" else [i for i in range(n) if i not in keep]
        how = f"data.heldout={heldout}" + (f": {HELDOUT_FRACTION:.0%} of the file, at least 1, at most {HELDOUT_MAX}"
                                           if heldout == "auto" else "")
        ds.selection = (f"held out {len(held)} of {n} samples of {source} for evaluation ({how})" if part == "eval"
                        else f"{len(ds)} of the {n} samples of {source}: {len(held)} are held out for evaluation "
                             f"({how})")
    if processor is not None and not add_generation_prompt:  # training: every sample read once, bad ones counted
        good = ds.scan()
        ds.check_bad()
        if check_length:
            check_samples_fit(ds, processor, read=good)
    return processed(ds, processor, add_generation_prompt)


files.checks_samples = True  # type: ignore[attr-defined]  # built with a processor, it checks every sample (stage.py)


def check_samples_fit(ds: _Part, processor: Any, candidates: int = 8,
                      read: Sequence[tuple[int, Sample]] | None = None) -> int:
    """The token count of the longest sample of ``ds`` (untruncated); raises ``TooLongError`` naming it when it is
    over ``processor.max_length`` (training would cut or drop it).

    Every sample is read (no images decoded; ``read``: the ``(index, sample)`` pairs already read, as
    ``_Part.scan`` returns them) and the ``candidates`` longest by text and by image count are processed in full
    (images included, so their tokens are counted as the model sees them)."""
    import copy

    if processor.max_length is None or not len(ds):
        return 0
    if read is None:
        read = []
        for k in range(len(ds)):
            try:
                read.append((k, ds.sample(k)))
            except DataError:  # counted and skipped when training reaches it
                continue
    sizes = [(sum(len(m.text()) for m in s.messages), len(s.images), k) for k, s in read]
    picks = {k for _, _, k in sorted(sizes, reverse=True)[:candidates]}
    picks |= {k for _, _, k in sorted(sizes, key=lambda x: (x[1], x[0]), reverse=True)[:candidates]}
    full = copy.copy(processor)
    full.max_length = None
    longest, worst = 0, None
    for k in sorted(picks):
        try:
            n = int(full(ds.sample(k))["input_ids"].numel())
        except DataError:
            continue
        if n > longest:
            longest, worst = n, ds.sample(k)
    if longest > processor.max_length and worst is not None:
        raise TooLongError(f"data: sample #{worst.meta.get('index')} (id {worst.id!r}) of {ds.source_name} is "
                           f"{longest} tokens long, more than the stage's max_length={processor.max_length}",
                           longest)
    return longest


class TooLongError(DataError):
    """A training sample longer than the stage's ``max_length`` (reason ``too_long``). The data does not know its
    stage: ``for_stage(name)`` is the one-line message naming the stage's key to set, which the stage raises as its
    config error."""

    reason = "too_long"

    def __init__(self, what: str, longest: int) -> None:
        self.what, self.longest = what, longest
        super().__init__(self.for_stage("<stage>"))

    def __reduce__(self):  # picklable (positional arguments of its own)
        return (type(self), (self.what, self.longest))

    def for_stage(self, stage: str) -> str:
        return (f"{self.what}; expected max_length >= {self.longest}: set stage.{stage}.max_length={self.longest} "
                f"(or shorten the sample; data.check_length=false lets training cut or drop the long ones)")


def check_files_options(train: str, eval: str | None = None, part: str = "train", heldout: int | str = "auto",
                        image_root: str | None = None, format: str = "auto", epochs: Any = None, **_: Any) -> None:
    """The files exist and hold records, the format is known, the held-out slice fits the training file and
    ``epochs`` is positive (``check_component``: before anything is built; raises ``OptionError`` naming the
    argument, which the check names by the key it was set at)."""
    for path, option, what in ((train, "train", "file"), (eval, "eval", "file"), (image_root, "image_root", "folder")):
        if path is not None and not Path(path).exists():
            raise OptionError(option, path, f"does not exist; expected an existing {what}")
    if part not in PARTS:
        raise OptionError("part", part, f"expected one of {list(PARTS)}")
    check_format(format)
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or epochs <= 0):
        raise OptionError("epochs", epochs, "expected a positive number of passes over the data, or null (the "
                                            "stages' own lengths)")
    n = len(data_records(train, "train", format))
    if eval is not None:
        heldout_unused(eval, heldout)
        data_records(eval, "eval", format)
    else:
        heldout_indices(n, heldout, 0)


def data_records(path: str, option: str = "train", format: str = "auto") -> Any:
    """The records of a data file, checked as a whole before any sample is read: it parses, holds at least one
    record and (``format=auto``) its first record is of a known format. Raises ``OptionError`` naming ``option``
    (``data.train``, ``data.eval``) and what was wrong (invalid JSON, empty, not a list of records, ...)."""
    from vlm.data.readers import detect_format, load_records

    expected = ("expected a .json list of records, a .jsonl / .parquet file or a save_to_disk folder, in a reader "
                "format (docs/data.md)")
    try:
        records = load_records(path)
        if len(records) == 0:
            raise ValueError("holds no records")
        if format == "auto":
            detect_format(records[0])
    except (DataError, ValueError, TypeError, OSError) as e:
        problem = str(getattr(e, "problem", e)).strip().splitlines()
        first = problem[0] if problem else type(e).__name__
        raise OptionError(option, path, first if "; expected" in first else f"{first}; {expected}") from None
    return records


files.check_options = check_files_options  # type: ignore[attr-defined]
