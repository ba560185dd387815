"""Data pipeline: records -> ``Sample`` -> ``Processor`` -> collators (see docs/data.md).

Readers (``vlm.data.readers``), templates (``vlm.data.templates``), tokenizers (``TOKENIZERS``), the processor,
collators and datasets are imported eagerly; image and video handling (``vlm.data.images``, ``tiling``, ``boxes``,
``video``), the ``shapes`` dataset and the named training datasets (``DATASETS``, ``vlm.data.datasets``) load on first
access.
"""
from __future__ import annotations

import importlib
from typing import Any

from vlm.data.collate import PackCollator, PackedDataset, PadCollator, concat_items, greedy_pack, padding_stats
from vlm.data.dataset import BadSamples, ProcessedDataset, SampleDataset, TooManyBadSamples, read_samples
from vlm.data.errors import DataError
from vlm.data.processor import IGNORE_INDEX, Processor, SampleDropped
from vlm.data.readers import READERS, Reader, SampleError, detect_format, load_records, make_reader
from vlm.data.sample import ImageRef, Message, Sample, Video, VideoRef
from vlm.data.templates import TEMPLATES, Template, build_template
from vlm.data.tokenizer import TOKENIZERS, byte_tokenizer, load_tokenizer

_LAZY = {"ImageProcessor": "vlm.data.images", "load_image": "vlm.data.images", "ImageInfo": "vlm.data.images",
         "DATASETS": "vlm.data.datasets", "build_dataset": "vlm.data.datasets", "VideoProcessor": "vlm.data.video"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vlm.data' has no attribute {name!r}")


__all__ = [
    "DATASETS",
    "IGNORE_INDEX",
    "READERS",
    "TEMPLATES",
    "TOKENIZERS",
    "BadSamples",
    "DataError",
    "ImageInfo",
    "ImageProcessor",
    "ImageRef",
    "Message",
    "PackCollator",
    "PackedDataset",
    "PadCollator",
    "ProcessedDataset",
    "Processor",
    "Reader",
    "Sample",
    "SampleDataset",
    "SampleDropped",
    "SampleError",
    "Template",
    "TooManyBadSamples",
    "Video",
    "VideoProcessor",
    "VideoRef",
    "build_template",
    "build_dataset",
    "byte_tokenizer",
    "concat_items",
    "detect_format",
    "greedy_pack",
    "load_image",
    "load_records",
    "load_tokenizer",
    "make_reader",
    "padding_stats",
    "read_samples",
]
