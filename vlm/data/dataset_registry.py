"""The data-set registry (``data.<set>.name``) and what every entry shares, kept apart from the entries so that
each registers itself without an import cycle (``vlm.data.datasets``: ``shapes``, ``records``, ``llava_json``;
``vlm.data.files``: ``files``)."""
from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from vlm.data.dataset import ProcessedDataset
from vlm.registry import Registry

DATASETS: Registry[Any] = Registry("dataset")
#: default ``max_bad_fraction`` of file datasets: a run stops once more than 5% of its samples are known to be bad
MAX_BAD_FRACTION = 0.05


def processed(samples: Dataset, processor: Any, add_generation_prompt: bool) -> Dataset:
    """``samples`` itself without a processor, else ``ProcessedDataset(samples, processor, add_generation_prompt)``."""
    return samples if processor is None else ProcessedDataset(samples, processor, add_generation_prompt)


def check_format(format: str) -> None:
    """``format`` is ``auto`` or a registered reader; raises ``OptionError`` (a ``ValueError``: ``format=...:
    unknown reader``) naming the closest reader."""
    from vlm.data.readers import READERS
    from vlm.registry import OptionError, did_you_mean

    if format != "auto" and format not in READERS:
        raise OptionError("format", format, f"unknown reader; expected 'auto' or one of {READERS.names()} "
                                            f"({did_you_mean(format, READERS.names())})")
