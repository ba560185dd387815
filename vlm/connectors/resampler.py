"""``resampler`` (Qwen-VL's position-aware vision-language adapter): ``num_queries`` learned queries read the image
through one multi-head cross-attention; every image becomes ``num_queries`` tokens whatever its patch grid.

::

    pos_q  = sincos_2d(s, s)                                  (K, dim)  frozen, s = sqrt(K), MAE layout
    pos_k  = bicubic-resize(pos_q as an s x s map, to h x w)  (h*w, dim)
    kv     = ln_kv(kv_proj(x))                                (N, h*w, dim)
    q      = ln_q(queries) + pos_q                            (K, dim)
    out    = proj(ln_post(MHA(q, kv + pos_k, kv)))            (N, K, out_dim)

``kv_proj`` is a Linear without bias (the identity when ``in_dim == dim``); ``MHA`` is ``nn.MultiheadAttention``
(``attn.in_proj_weight``/``in_proj_bias``/``out_proj``, as Qwen-VL names them); ``proj`` a Linear without bias
(Qwen-VL's ``proj`` parameter is this weight transposed: its forward is ``x @ proj``). ``dim`` defaults to
``out_dim`` (Qwen-VL: 4096, the LLM width), ``num_heads`` to ``dim // 128`` (Qwen-VL: 32).

Grids: any ``h x w`` (non-square included) and, since the output count never depends on it, one grid per image
(``per_image_grids``; padded keys are masked out).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from vlm.connectors.base import Connector, Grid, image_grids
from vlm.connectors.registry import CONNECTORS
from vlm.pos_embed import resize_pos_grid, sincos_2d


@CONNECTORS.register("resampler")
class Resampler(Connector):
    """``(N, h*w, in_dim)`` patch tokens (+ grid) -> ``(N, num_queries, out_dim)``."""

    per_image_grids = True

    def __init__(self, in_dim: int, out_dim: int, num_queries: int = 256, dim: int | None = None,
                 num_heads: int | None = None, eps: float = 1e-6) -> None:
        super().__init__()
        side = math.isqrt(num_queries) if num_queries > 0 else 0
        if side < 1 or side * side != num_queries:
            raise ValueError(f"resampler num_queries={num_queries}; expected a positive square number (the queries "
                             f"carry the position codes of a sqrt(K) x sqrt(K) grid), e.g. 64, 144, 256")
        dim = dim or out_dim
        heads = num_heads or dim // 128
        if heads < 1 or dim % heads:
            raise ValueError(f"resampler: width dim={dim} is not divisible into num_heads={num_heads or heads} heads "
                             f"(default dim // 128); set connector.num_heads to a divisor of {dim}")
        self.in_dim, self.out_dim = in_dim, out_dim
        self.record_options(locals())
        self.query_grid = (side, side)
        self.register_buffer("pos_embed", sincos_2d(side, side, dim, col_first=True), persistent=False)
        self.query = nn.Parameter(torch.empty(num_queries, dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.kv_proj = nn.Linear(in_dim, dim, bias=False) if in_dim != dim else nn.Identity()
        self.ln_q = nn.LayerNorm(dim, eps=eps)
        self.ln_kv = nn.LayerNorm(dim, eps=eps)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_post = nn.LayerNorm(dim, eps=eps)
        self.proj = nn.Linear(dim, out_dim, bias=False)

    def num_tokens(self, num_input_tokens: int, grid: tuple[int, int]) -> int:
        """Always ``num_queries``; the tokens must be the grid's ``h*w`` patch tokens."""
        h, w = grid
        if num_input_tokens != h * w:
            raise ValueError(f"resampler needs exactly the patch grid's {h}x{w}={h * w} tokens (no CLS: use the "
                             f"encoder's select='patch'); got {num_input_tokens}")
        return self.query.shape[0]

    def key_pos(self, grids: Sequence[Grid], length: int) -> torch.Tensor:
        """``(N, length, dim)`` key position codes: each image's ``h*w`` codes, zeros over its padding."""
        table = self.pos_embed.to(self.query.dtype)
        cache: dict[Grid, torch.Tensor] = {}
        rows = []
        for g in grids:
            if g not in cache:
                cache[g] = resize_pos_grid(table, self.query_grid, g)
            rows.append(F.pad(cache[g], (0, 0, 0, length - g[0] * g[1])))
        return torch.stack(rows)

    def forward(self, x: torch.Tensor, grid: Grid | Sequence[Grid]) -> torch.Tensor:
        """``(N, T, in_dim)`` + grid ``(h, w)`` (or one per image, ``x`` padded) -> ``(N, num_queries, out_dim)``."""
        self.check_input(x)
        grids, padding = image_grids(x, grid, "resampler")
        kv = self.ln_kv(self.kv_proj(x))
        q = (self.ln_q(self.query) + self.pos_embed.to(self.query.dtype)).expand(x.shape[0], -1, -1)
        out = self.attn(q, kv + self.key_pos(grids, x.shape[1]), kv, key_padding_mask=padding,
                        need_weights=False)[0]
        return self.proj(self.ln_post(out))
