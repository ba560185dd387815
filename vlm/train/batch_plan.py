"""A deterministic step-indexed batch plan: which samples each rank trains on at each optimizer step.

The batch plan maps an optimizer step to the sample indices of that step (a seeded permutation per epoch, sliced into
equal per-rank shares, then micro-batches), so the data position is just the step number: a resumed run and a run
with a different number of processes see exactly the same global batches. The datasets themselves come from
``vlm.data.datasets`` (``DATASETS``).

Each item is processed with the global RNGs seeded from ``(data seed, epoch, index)`` (:class:`SeededItems`), so
randomness in processing (augmentation) is a function of the sample and its epoch too: the same with 0 or N workers,
after a resume, and independent of the model's own random stream (see :mod:`vlm.train.rng`).
"""
from __future__ import annotations

import math
import signal
import zlib
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from vlm.train.rng import derive_seed, isolated


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


class PlanSampler(Sampler[list[tuple[int, int]]]):
    """Yields this rank's micro-batches for steps ``start..stop-1`` in order (a DataLoader ``batch_sampler``), each as
    a list of ``(epoch, sample index)`` keys for :class:`SeededItems`."""

    def __init__(self, plan: BatchPlan, start: int, stop: int) -> None:
        self.plan, self.start, self.stop = plan, start, stop

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.stop):
            epoch = step // self.plan.steps_per_epoch
            for micro in self.plan.micro_batches(step):
                yield [(epoch, i) for i in micro]

    def __len__(self) -> int:
        return (self.stop - self.start) * self.plan.accumulation


class SeededItems(Dataset):
    """``items[(epoch, index)]`` is ``dataset[index]`` computed inside ``vlm.train.rng.isolated(derive_seed(seed,
    epoch, index))``: whatever the item's processing draws from torch / python / numpy (random augmentation) is fixed
    by the sample and its epoch, and the caller's (the model's) random streams are left untouched."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        with isolated(derive_seed("item", self.seed, epoch, index)):
            return self.dataset[index]


def _worker_init(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM to the main process: it checkpoints, then stops them."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(dataset: Dataset, collator: Any, plan: BatchPlan, start: int, stop: int,
                num_workers: int = 0) -> DataLoader:
    """This rank's micro-batches of steps ``start..stop-1``. The loader has its own generator (seeded from the plan's
    seed), so creating an iterator and starting workers draws nothing from the global (model) RNG."""
    return DataLoader(SeededItems(dataset, plan.seed), batch_sampler=PlanSampler(plan, start, stop),
                      collate_fn=collator, num_workers=num_workers, persistent_workers=False,
                      prefetch_factor=4 if num_workers else None, worker_init_fn=_worker_init if num_workers else None,
                      generator=torch.Generator().manual_seed(derive_seed("loader", plan.seed, start)))
