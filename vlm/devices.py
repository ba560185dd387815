"""Devices by name, shared by training (``vlm.train.distributed``) and evaluation (``vlm.eval``) without either
importing the other."""
from __future__ import annotations

import os

import torch


def resolve_device(name: str) -> torch.device:
    """``auto`` -> the local CUDA device if there is one, else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"trainer.device={name!r} but CUDA is not available; use trainer.device=cpu")
        if name == "cuda":
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)
