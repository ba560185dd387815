"""Training datasets by name: a data spec -> a dataset of ``Sample``s, or of processed items.

A data spec is a mapping with ``name`` (a ``DATASETS`` entry) plus its options, e.g. ``{name: shapes, split: train,
size: 20000, tasks: {vqa: 4, grounding: 2}}`` or ``{name: llava_json, path: data/llava_v1_5_mix665k.json,
image_root: data/}``. With a ``processor`` the dataset yields processed items (tensors), lazily in ``__getitem__``.
"""
from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from vlm.data.dataset import SampleDataset
from vlm.data.shapes import ShapesDataset
from vlm.data.dataset_registry import (  # noqa: F401  (check_format, processed: part of this module's API)
    DATASETS,
    MAX_BAD_FRACTION,
    check_format,
    processed,
)
from vlm.registry import to_dict



@DATASETS.register("shapes")
def shapes(processor: Any = None, add_generation_prompt: bool = False, **options: Any) -> Dataset:
    """The built-in procedurally generated ``shapes`` dataset (``vlm.data.shapes.ShapesDataset`` options)."""
    from vlm.data.shapes import build_shapes

    return processed(build_shapes(**options), processor, add_generation_prompt)


shapes.forwards_to = ShapesDataset  # type: ignore[attr-defined]  (its options are checked before a run starts)


def _records(path: str, format: str, processor: Any, add_generation_prompt: bool, image_root: str | None,
             skip_bad: bool, max_bad_fraction: float | None, **reader_options: Any) -> Dataset:
    if not Path(path).exists():
        raise FileNotFoundError(f"data file {path!r} does not exist (set the data path, e.g. "
                                f"data.sft.path=/path/to/file.json, or VLM_DATA for the recipe defaults)")
    if image_root is not None and not Path(image_root).is_dir():
        raise FileNotFoundError(f"image_root {image_root!r} is not a directory")
    samples = SampleDataset(path, format, image_folder=image_root, skip_bad=skip_bad,
                            max_bad_fraction=max_bad_fraction, **reader_options)
    return processed(samples, processor, add_generation_prompt)


@DATASETS.register("records")
def records(path: str, format: str = "auto", processor: Any = None, add_generation_prompt: bool = False,
            image_root: str | None = None, skip_bad: bool = True, max_bad_fraction: float | None = MAX_BAD_FRACTION,
            **reader_options: Any) -> Dataset:
    """A json / jsonl / parquet file or ``save_to_disk`` directory in any reader format (``vlm.data.readers``)."""
    return _records(path, format, processor, add_generation_prompt, image_root, skip_bad, max_bad_fraction,
                    **reader_options)


def check_records(format: str = "auto", **options: Any) -> None:
    """A file dataset's options before anything is read: ``format`` is ``auto`` or a registered reader, and every
    other option is the dataset's, ``SampleDataset``'s or the reader's (with ``auto``: any reader's)."""
    from vlm.data.dataset import SampleDataset
    from vlm.data.readers import READERS
    from vlm.registry import did_you_mean

    check_format(format)
    def named(f: Any) -> set[str]:  # the arguments ``f`` names (its ``**options`` are checked here)
        return {n for n, p in inspect.signature(f).parameters.items()
                if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)}

    allowed = named(records) | named(SampleDataset)
    for reader in (READERS.names() if format == "auto" else [format]):
        allowed |= named(READERS.get(reader))
    allowed -= {"source", "processor", "add_generation_prompt", "image_folder"}
    for key, value in options.items():
        if key not in allowed:
            raise ValueError(f"{key}={value!r}: not an option of this data set or the {format!r} reader; expected "
                             f"one of {sorted(allowed)} ({did_you_mean(key, sorted(allowed))})")


records.check_options = check_records  # type: ignore[attr-defined]  (run by the config check)


@DATASETS.register("llava_json")
def llava_json(path: str, processor: Any = None, add_generation_prompt: bool = False, image_root: str | None = None,
               skip_bad: bool = True, max_bad_fraction: float | None = MAX_BAD_FRACTION,
               **reader_options: Any) -> Dataset:
    """LLaVA's conversation json (``{"image": ..., "conversations": [{"from": "human", ...}]}``)."""
    return _records(path, "llava", processor, add_generation_prompt, image_root, skip_bad, max_bad_fraction,
                    **reader_options)


llava_json.check_options = functools.partial(check_records, "llava")  # type: ignore[attr-defined]


def build_dataset(spec: Any, processor: Any = None, add_generation_prompt: bool = False) -> Dataset:
    spec = to_dict(spec)
    return DATASETS.build(spec, processor=processor, add_generation_prompt=add_generation_prompt)


from vlm.data import files, preference  # noqa: E402,F401  (register 'files', 'preference')
from vlm.data.shapes import preference as shapes_preference  # noqa: E402,F401  (registers 'shapes_preference')
