"""Training data: dataset specs -> datasets of processed items, and a deterministic step-indexed batch plan.

A data spec is a mapping with ``name`` (a ``DATASETS`` entry) plus its options, e.g. ``{name: shapes, split: train,
size: 20000, tasks: {vqa: 4, grounding: 2}}`` or ``{name: llava_json, path: data/llava_v1_5_mix665k.json,
image_root: data/}``. The batch plan maps an optimizer step to the sample indices of that step (a seeded permutation
per epoch, sliced into equal per-rank shares, then micro-batches), so the data position is just the step number: a
resumed run and a run with a different number of processes see exactly the same global batches.
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from vlm.data.shapes import ShapesDataset
from vlm.registry import Registry, to_dict

DATASETS: Registry[Any] = Registry("dataset")


class Processed(Dataset):
    """``processor(dataset[i])`` lazily (in DataLoader workers when there are any)."""

    def __init__(self, samples: Any, processor: Any, add_generation_prompt: bool = False) -> None:
        self.samples, self.processor, self.add_generation_prompt = samples, processor, add_generation_prompt

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.processor(self.samples[index], self.add_generation_prompt)


@DATASETS.register("shapes")
def shapes(processor: Any = None, add_generation_prompt: bool = False, **options: Any) -> Dataset:
    """The built-in procedurally generated ``shapes`` dataset (``vlm.data.shapes.ShapesDataset`` options)."""
    from vlm.data.shapes import build_shapes

    samples = build_shapes(**options)
    return samples if processor is None else Processed(samples, processor, add_generation_prompt)


shapes.forwards_to = ShapesDataset  # type: ignore[attr-defined]  (its options are checked before a run starts)


def _records(path: str, format: str, processor: Any, add_generation_prompt: bool, image_root: str | None,
             skip_bad: bool, **reader_options: Any) -> Dataset:
    from vlm.data.dataset import SampleDataset

    if not Path(path).exists():
        raise FileNotFoundError(f"data file {path!r} does not exist (set the data path, e.g. "
                                f"data.sft.path=/path/to/file.json, or VLM_DATA for the recipe defaults)")
    if image_root is not None and not Path(image_root).is_dir():
        raise FileNotFoundError(f"image_root {image_root!r} is not a directory")
    return SampleDataset(path, format, processor=processor, image_folder=image_root, skip_bad=skip_bad,
                         add_generation_prompt=add_generation_prompt, **reader_options)


@DATASETS.register("records")
def records(path: str, format: str = "auto", processor: Any = None, add_generation_prompt: bool = False,
            image_root: str | None = None, skip_bad: bool = True, **reader_options: Any) -> Dataset:
    """A json / jsonl / parquet file or ``save_to_disk`` directory in any reader format (``vlm.data.readers``)."""
    return _records(path, format, processor, add_generation_prompt, image_root, skip_bad, **reader_options)


@DATASETS.register("llava_json")
def llava_json(path: str, processor: Any = None, add_generation_prompt: bool = False, image_root: str | None = None,
               skip_bad: bool = True, **reader_options: Any) -> Dataset:
    """LLaVA's conversation json (``{"image": ..., "conversations": [{"from": "human", ...}]}``)."""
    return _records(path, "llava", processor, add_generation_prompt, image_root, skip_bad, **reader_options)


def build_dataset(spec: Any, processor: Any = None, add_generation_prompt: bool = False) -> Dataset:
    spec = to_dict(spec)
    return DATASETS.build(spec, processor=processor, add_generation_prompt=add_generation_prompt)


def data_seed(seed: int, stage: str) -> int:
    """The data-order seed of a stage: depends on its name (not its position), so a stage run alone sees the same
    batches as in a chained run."""
    return seed + zlib.crc32(stage.encode()) % 100003


class BatchPlan:
    """Which samples each rank trains on at each optimizer step.

    Step ``s`` of epoch ``e = s // steps_per_epoch`` takes the next ``global_batch`` indices of a permutation seeded
    by ``(seed, e)``; rank ``r`` takes the ``r``-th of ``world`` equal slices and cuts it into micro-batches of at most
    ``micro_batch`` (the last one may be smaller). The incomplete tail of an epoch is dropped.
    """

    def __init__(self, num_samples: int, global_batch: int, micro_batch: int, rank: int = 0, world: int = 1,
                 seed: int = 0) -> None:
        if global_batch % world:
            raise ValueError(f"global_batch_size={global_batch} is not divisible by the {world} processes")
        if num_samples < global_batch:
            raise ValueError(f"the dataset has {num_samples} samples, fewer than one global batch ({global_batch})")
        self.n, self.global_batch, self.micro_batch = num_samples, global_batch, micro_batch
        self.rank, self.world, self.seed = rank, world, seed
        self.per_rank = global_batch // world
        self.steps_per_epoch = num_samples // global_batch
        self.accumulation = math.ceil(self.per_rank / micro_batch)

    def total_steps(self, epochs: float, max_steps: int | None) -> int:
        if max_steps is not None:
            return int(max_steps)
        return max(1, math.ceil(epochs * self.steps_per_epoch))

    @lru_cache(maxsize=2)
    def permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def global_indices(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.steps_per_epoch)
        return self.permutation(epoch)[k * self.global_batch:(k + 1) * self.global_batch]

    def micro_batches(self, step: int) -> list[list[int]]:
        mine = self.global_indices(step)[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]
        return [mine[i:i + self.micro_batch] for i in range(0, len(mine), self.micro_batch)]

    def epoch_of(self, step: int) -> float:
        return step / self.steps_per_epoch


class PlanSampler(Sampler[list[int]]):
    """Yields this rank's micro-batches for steps ``start..stop-1`` in order (a DataLoader ``batch_sampler``)."""

    def __init__(self, plan: BatchPlan, start: int, stop: int) -> None:
        self.plan, self.start, self.stop = plan, start, stop

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.stop):
            yield from self.plan.micro_batches(step)

    def __len__(self) -> int:
        return (self.stop - self.start) * self.plan.accumulation


def make_loader(dataset: Dataset, collator: Any, plan: BatchPlan, start: int, stop: int,
                num_workers: int = 0) -> DataLoader:
    return DataLoader(dataset, batch_sampler=PlanSampler(plan, start, stop), collate_fn=collator,
                      num_workers=num_workers, persistent_workers=False,
                      prefetch_factor=4 if num_workers else None)
