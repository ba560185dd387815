"""The vision-encoder contract: ``forward(pixel_values (N, 3, H, W)) -> (N, T, C)``."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

SELECT_STRATEGIES = ("patch", "all", "llava_default")


def as_pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


class VisionEncoder(nn.Module):
    """Base class of every vision tower.

    Subclasses set ``hidden_size`` (channels ``C`` of the output, after concatenating feature layers),
    ``patch_size``, ``image_size`` (default square input side), ``has_cls``, ``image_mean`` / ``image_std``,
    ``select`` and implement ``encode(pixel_values) -> (N, T_all, C)`` returning tokens *before* selection.

    ``select``: ``patch`` drops the CLS token only when the backbone has one; ``all`` keeps every token;
    ``llava_default`` always drops token 0 (LLaVA's "default" strategy; on a tower without CLS such as SigLIP this
    drops a real patch — it exists only to import such LLaVA checkpoints exactly).
    """

    hidden_size: int
    patch_size: int
    image_size: int
    has_cls: bool = False
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    select: str = "patch"

    def grid(self, image_size: int | tuple[int, int] | None = None) -> tuple[int, int]:
        """Patch grid ``(h, w)`` for an input of ``image_size`` (``(H, W)`` or a square side)."""
        h, w = as_pair(self.image_size if image_size is None else image_size)
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {(h, w)} is not divisible by the patch size {self.patch_size}")
        return (h // self.patch_size, w // self.patch_size)

    def num_tokens(self, image_size: int | tuple[int, int] | None = None) -> int:
        """Number of output tokens ``T`` for one image of ``image_size``."""
        h, w = self.grid(image_size)
        return h * w + int(self.has_cls) - int(self.drops_first)

    @property
    def drops_first(self) -> bool:
        """Whether ``select`` removes token 0."""
        return self.select == "llava_default" or (self.select == "patch" and self.has_cls)

    def check_pixels(self, pixel_values: torch.Tensor) -> None:
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must have shape (N, 3, H, W); got rank {pixel_values.ndim} "
                             f"shape {tuple(pixel_values.shape)}")
        if pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must have 3 channels at dim 1, shape (N, 3, H, W); got "
                             f"{tuple(pixel_values.shape)}")
        self.grid(tuple(pixel_values.shape[-2:]))

    def apply_select(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(N, T_all, C) -> (N, T, C)`` according to ``select``."""
        return tokens[:, 1:] if self.drops_first else tokens

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W) -> (N, T, C)``."""
        self.check_pixels(pixel_values)
        return self.apply_select(self.encode(pixel_values))

    def export_config(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError
