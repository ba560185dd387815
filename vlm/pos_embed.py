"""Fixed 2D sine-cosine position codes (MAE / DETR style, no parameters)."""
from __future__ import annotations

import torch
from torch.nn import functional as F


def sincos_2d(h: int, w: int, dim: int, temperature: float = 10000.0, col_first: bool = False) -> torch.Tensor:
    """``(h*w, dim)`` fixed 2D position codes, row-major over the ``h x w`` grid.

    One half of the channels encodes the row, the other the column (``col_first``: the column in the first half, as
    MAE's ``get_2d_sincos_pos_embed`` and Qwen-VL's resampler lay it out), each as ``[sin(p * f_k), cos(p * f_k)]``
    with ``f_k = temperature ** (-k / (dim // 4))``, ``k = 0 .. dim // 4 - 1``; channels past ``4 * (dim // 4)`` stay
    zero. Raises ``ValueError`` for ``dim < 4``.
    """
    q = dim // 4
    if q == 0:
        raise ValueError(f"sincos_2d needs dim >= 4; got {dim}")
    freqs = temperature ** (-torch.arange(q, dtype=torch.float32) / q)
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
    axes = (cols, rows) if col_first else (rows, cols)
    parts = []
    for p in axes:
        angles = p.reshape(-1)[:, None] * freqs[None]
        parts += [angles.sin(), angles.cos()]
    out = torch.cat(parts, dim=1)
    return torch.nn.functional.pad(out, (0, dim - out.shape[1]))


def resize_pos_grid(pos: torch.Tensor, src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """``(src_h*src_w, C) -> (dst_h*dst_w, C)``: a row-major grid of position codes resized bicubically
    (``align_corners=False``, computed in fp32, returned in ``pos``'s dtype); unchanged when ``src == dst``."""
    if tuple(src) == tuple(dst):
        return pos
    grid = pos.float().reshape(1, src[0], src[1], -1).permute(0, 3, 1, 2)
    out = F.interpolate(grid, size=tuple(dst), mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).reshape(dst[0] * dst[1], -1).to(pos.dtype)
