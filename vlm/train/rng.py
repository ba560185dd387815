"""Random number streams of a run, one per consumer, so that a resumed run draws exactly what an uninterrupted one
draws.

- The model (dropout, LoRA dropout, anything a module draws inside ``forward``) uses the process-global torch (and
  CUDA) generators: its state is saved in every checkpoint (:func:`rng_state`) and restored right before the first
  step after a resume, when nothing else will draw any more.
- Data items (the processor, image augmentation, any transform that draws from ``torch`` / ``random`` /
  ``numpy``) run inside :func:`isolated` seeded by ``derive_seed(data seed, epoch, sample index)``: the same sample
  gets the same randomness in the same epoch whatever the worker count, the process count or the resume point, and
  the global streams are left exactly as they were.
- Evaluation runs inside :func:`isolated` seeded by ``derive_seed(seed, stage, step)``.
"""
from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from ``parts`` (their ``repr``), stable across processes, machines and Python versions."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@contextmanager
def isolated(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Run the block with the global torch CPU / python / numpy generators (and ``device``'s, when CUDA) seeded from
    ``seed``; restore all of them afterwards, so whatever the block draws leaves the caller's streams untouched."""
    py, np_state = random.getstate(), np.random.get_state()
    cuda = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for d in cuda:
            with torch.cuda.device(d):
                torch.cuda.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)


def rng_state() -> dict[str, Any]:
    """This process's torch / CUDA / python / numpy generator states, as plain tensors and numbers (loadable with
    ``torch.load(weights_only=True)``)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "python": {"version": py[0], "state": torch.tensor(py[1], dtype=torch.int64), "gauss": py[2]},
             "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
