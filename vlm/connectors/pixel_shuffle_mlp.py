"""``pixel_shuffle_mlp`` (InternVL): fold each ``1/scale x 1/scale`` block of patch tokens into channels, then
LayerNorm + 2-layer GELU MLP. ``(N, h*w, C) -> (N, h*w*scale^2, C/scale^2) -> (N, K, D)``.

The shuffle reproduces InternVL's ``pixel_shuffle`` (``ps_version='v2'``) element for element, and the MLP's
parameters sit at InternVL's ``mlp1`` indices (``layers.0`` LayerNorm, ``layers.1`` and ``layers.3`` Linear).
"""
from __future__ import annotations

import torch
from torch import nn

from vlm.connectors.base import Connector
from vlm.connectors.registry import CONNECTORS


def pixel_shuffle(x: torch.Tensor, scale: float) -> torch.Tensor:
    """InternVL's v2 pixel shuffle on a token grid ``(N, W, H, C) -> (N, W*s, H*s, C/s^2)``.

    (InternVL reshapes the row-major token sequence to ``(N, h, w, C)`` and names the axes ``(n, w, h, c)``; we keep
    its exact operation order so weights transfer.)
    """
    n, w, h, c = x.shape
    x = x.reshape(n, w, int(h * scale), int(c / scale))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.reshape(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    return x.permute(0, 2, 1, 3).contiguous()


@CONNECTORS.register("pixel_shuffle_mlp")
class PixelShuffleMLP(Connector):
    def __init__(self, in_dim: int, out_dim: int, scale: float = 0.5, hidden_dim: int | None = None) -> None:
        super().__init__()
        inv = round(1 / scale)
        if not 0 < scale <= 1 or abs(inv * scale - 1) > 1e-9:
            raise ValueError(f"pixel_shuffle_mlp scale must be 1/k for an integer k (e.g. 0.5); got {scale}")
        self.in_dim, self.out_dim, self.scale, self.factor = in_dim, out_dim, scale, inv
        self.record_options(locals())
        folded = in_dim * inv * inv
        hidden = hidden_dim or out_dim
        self.layers = nn.Sequential(nn.LayerNorm(folded), nn.Linear(folded, hidden), nn.GELU(),
                                    nn.Linear(hidden, out_dim))

    def _check_grid(self, num_input_tokens: int, grid: tuple[int, int]) -> None:
        h, w = grid
        if num_input_tokens != h * w:
            raise ValueError(f"pixel_shuffle_mlp needs exactly the patch grid's {h}x{w}={h * w} tokens (no CLS: use "
                             f"select='patch'); got {num_input_tokens}")
        if h % self.factor or w % self.factor:
            raise ValueError(f"pixel_shuffle_mlp with scale {self.scale} needs a patch grid divisible by "
                             f"{self.factor}; got {h}x{w}")

    def num_tokens(self, num_input_tokens: int, grid: tuple[int, int]) -> int:
        self._check_grid(num_input_tokens, grid)
        return (grid[0] // self.factor) * (grid[1] // self.factor)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``(N, h*w, C) -> (N, h*w/k^2, D)`` with ``k = 1/scale``."""
        self.check_input(x)
        self._check_grid(x.shape[1], grid)
        h, w = grid
        x = pixel_shuffle(x.reshape(x.shape[0], h, w, -1), self.scale)
        return self.layers(x.reshape(x.shape[0], -1, x.shape[-1]))
