"""``patch_merger`` (Qwen2-VL / Qwen2.5-VL): each ``m x m`` block of neighbouring patch tokens becomes one token.

``ln_q`` normalizes every patch token (``norm: layer_norm`` for Qwen2-VL, ``rms_norm`` for Qwen2.5-VL; eps 1e-6),
the block's ``m*m`` tokens are concatenated in row-major order within the block (``C * m^2`` channels), then
``mlp``: ``Linear(C m^2, C m^2) -> GELU -> Linear(C m^2, D)``. Parameter names are transformers' ``merger.*``
(``ln_q``, ``mlp.0``, ``mlp.2``).

Input tokens are row-major over the patch grid (what every vlm encoder returns, ``qwen2_vl_vit`` included), so the
merger regroups the blocks itself and works after any tower that states a grid (CLIP's ``(N, h*w, C)`` too). Merged
tokens come out row-major over the ``(h/m, w/m)`` grid (``output_grid``), frame after frame: Qwen2-VL's order.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vlm.connectors.base import Connector, flat_grids
from vlm.connectors.registry import CONNECTORS
from vlm.layers import RMSNorm
from vlm.pretrained import check_pretrained_dir, load_strict, read_weights

NORMS = ("layer_norm", "rms_norm")
#: where a transformers Qwen2-VL / Qwen2.5-VL directory keeps the merger (transformers 5 / older files)
MERGER_PREFIXES = ("model.visual.merger.", "visual.merger.")


def read_merger(path: str) -> dict[str, torch.Tensor]:
    """The merger's weights (``ln_q.*``, ``mlp.0.*``, ``mlp.2.*``) of a local transformers Qwen2-VL / Qwen2.5-VL
    model directory.

    Raises:
        FileNotFoundError: no directory, ``config.json`` or weights.
        ValueError: no key under ``model.visual.merger.`` / ``visual.merger.`` (naming the directory).
    """
    root = check_pretrained_dir(path, "patch_merger")
    state = {}
    for key, value in read_weights(root, "patch_merger").items():
        prefix = next((p for p in MERGER_PREFIXES if key.startswith(p)), None)
        if prefix is not None:
            state[key[len(prefix):]] = value
    if not state:
        raise ValueError(f"patch_merger: {str(root)!r} holds no merger weights (keys starting with "
                         f"{' or '.join(repr(p) for p in MERGER_PREFIXES)}); expected a transformers Qwen2-VL / "
                         f"Qwen2.5-VL model directory")
    return state


def block_order(grids: Sequence[tuple[int, int, int]], merge: int, device: torch.device | None = None) -> torch.Tensor:
    """``(P,)`` gather index from row-major tokens to ``m x m`` blocks: ``blocks = row_major[index]`` holds each
    block's ``m*m`` tokens contiguously (row-major within the block), blocks row-major over ``(t, h/m, w/m)``."""
    out, base = [], 0
    for t, h, w in grids:
        idx = torch.arange(t * h * w).reshape(t, h // merge, merge, w // merge, merge).permute(0, 1, 3, 2, 4)
        out.append(idx.reshape(-1) + base)
        base += t * h * w
    return torch.cat(out).to(device)


@CONNECTORS.register("patch_merger")
class PatchMerger(Connector):
    """``(N, h*w, C)`` + grid ``(h, w)`` -> ``(N, h*w/m^2, D)``; ``forward_flat`` for images of different sizes.

    Args:
        merge_size: ``m``, the side of a merged block (Qwen2-VL: 2).
        norm: ``layer_norm`` (Qwen2-VL) or ``rms_norm`` (Qwen2.5-VL).

    Raises:
        ValueError: a grid whose ``h`` or ``w`` is not a multiple of ``merge_size`` (naming the grid and ``m``), a
            token count other than the grid's.
    """

    def __init__(self, in_dim: int, out_dim: int, merge_size: int = 2, norm: str = "layer_norm",
                 pretrained: str | None = None) -> None:
        super().__init__()
        if merge_size < 1:
            raise ValueError(f"patch_merger merge_size={merge_size}; expected an integer >= 1")
        if norm not in NORMS:
            raise ValueError(f"patch_merger norm={norm!r}; expected one of {NORMS}")
        self.in_dim, self.out_dim, self.merge_size = in_dim, out_dim, int(merge_size)
        self.record_options(locals())
        folded = in_dim * merge_size ** 2
        self.ln_q = nn.LayerNorm(in_dim, eps=1e-6) if norm == "layer_norm" else RMSNorm(in_dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(folded, folded), nn.GELU(), nn.Linear(folded, out_dim))
        self.options.pop("pretrained")  # a saved model holds the weights themselves
        if pretrained is not None:
            load_strict(self, read_merger(pretrained), f"patch_merger: {pretrained!r}")

    def check_grid(self, grid: Sequence[int], where: str = "") -> None:
        """``ValueError`` unless the grid's ``h`` and ``w`` (its last two entries) are multiples of ``m``."""
        h, w = int(grid[-2]), int(grid[-1])
        m = self.merge_size
        if h % m or w % m:
            raise ValueError(f"patch_merger{where}: a {h}x{w} patch grid cannot be merged in {m}x{m} blocks "
                             f"(merge_size {m}); expected h and w multiples of {m}: resize the image so its "
                             f"patch grid is e.g. {-(-h // m) * m}x{-(-w // m) * m}, or use a connector that "
                             f"takes any grid (mlp, resampler)")

    def num_tokens(self, num_input_tokens: int, grid: tuple[int, int]) -> int:
        h, w = grid
        if num_input_tokens != h * w:
            raise ValueError(f"patch_merger needs exactly the patch grid's {h}x{w}={h * w} tokens per image (no "
                             f"CLS: use select='patch'); got {num_input_tokens}")
        self.check_grid(grid)
        return num_input_tokens // self.merge_size ** 2

    def output_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        self.check_grid(grid)
        return (int(grid[0]) // self.merge_size, int(grid[1]) // self.merge_size)

    def merge(self, x: torch.Tensor, grids: Sequence[tuple[int, int, int]]) -> torch.Tensor:
        """Row-major tokens ``(P, C)`` of ``grids`` -> ``(P / m^2, D)``."""
        x = self.ln_q(x)[block_order(grids, self.merge_size, x.device)]
        return self.mlp(x.reshape(-1, self.in_dim * self.merge_size ** 2))

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``(N, h*w, C) -> (N, h*w/m^2, D)``."""
        self.check_input(x)
        n = x.shape[0]
        self.num_tokens(x.shape[1], grid)
        out = self.merge(x.reshape(-1, x.shape[-1]), [(n, int(grid[0]), int(grid[1]))])
        return out.reshape(n, -1, self.out_dim)

    def forward_flat(self, x: torch.Tensor, grids: Sequence[tuple[int, int, int]]) -> torch.Tensor:
        """``(P, C)`` row-major per image + ``[(t, h, w)]`` -> ``(P / m^2, D)``, one call for all images."""
        grids = flat_grids(x, grids, self.in_dim, "patch_merger")
        for i, g in enumerate(grids):
            self.check_grid(g, f" (image {i}, grid (t, h, w) = {g})")
        return self.merge(x, grids)
