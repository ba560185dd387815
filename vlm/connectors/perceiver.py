"""``perceiver`` (Flamingo's Perceiver resampler): ``num_latents`` learned latents, ``depth`` blocks of
[attention from the latents over ``cat(features, latents)``, feed-forward], each residual, then a final LayerNorm.

::

    latents = L                                                    (K, C)  learned
    for each block:
        latents = latents + Attn(q=ln_l(latents), kv=cat(ln_x(x), ln_l(latents)))
        latents = latents + FF(latents)           FF = LayerNorm -> Linear -> GELU -> Linear
    out = LayerNorm(latents)                                       (N, K, C)

Attention and feed-forward Linears have no bias (OpenFlamingo's layout: ``to_q``, ``to_kv``, ``to_out``,
``norm_media``, ``norm_latents``); ``heads * head_dim`` is the attention width. ``PerceiverResampler`` is the module
(the width stays the features' ``C``), usable by any component (e.g. before gated cross-attention);
the ``perceiver`` connector adds ``proj``, a Linear from ``C`` to the LLM width.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from vlm.connectors.base import Connector, Grid, image_grids
from vlm.connectors.registry import CONNECTORS


class PerceiverAttention(nn.Module):
    """Latents ``(N, K, C)`` attend over ``cat(x, latents)``, ``x (N, T, C)``; returns the update ``(N, K, C)``."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        """``padding (N, T)`` bool, ``True`` at feature positions to ignore (the latents are always attended)."""
        n, k = latents.shape[:2]
        latents = self.norm_latents(latents)
        keys, values = self.to_kv(torch.cat([self.norm_media(x), latents], dim=1)).chunk(2, dim=-1)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(n, t.shape[1], self.heads, self.head_dim).transpose(1, 2)

        mask = None
        if padding is not None:
            keep = torch.cat([~padding, padding.new_ones(n, k)], dim=1)
            mask = keep[:, None, None, :]
        out = F.scaled_dot_product_attention(heads(self.to_q(latents)), heads(keys), heads(values), attn_mask=mask)
        return self.to_out(out.transpose(1, 2).reshape(n, k, -1))


class PerceiverResampler(nn.Module):
    """``(N, T, dim)`` features -> ``(N, num_latents, dim)``; ``depth`` blocks, ``heads x head_dim`` attention,
    feed-forward ``ff_mult * dim`` wide."""

    def __init__(self, dim: int, depth: int = 6, num_latents: int = 64, heads: int = 8, head_dim: int = 64,
                 ff_mult: int = 4) -> None:
        super().__init__()
        for key, value in (("depth", depth), ("num_latents", num_latents), ("heads", heads), ("head_dim", head_dim),
                           ("ff_mult", ff_mult)):
            if value < 1:
                raise ValueError(f"perceiver {key}={value}; expected >= 1")
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, heads, head_dim),
                           nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, ff_mult * dim, bias=False), nn.GELU(),
                                         nn.Linear(ff_mult * dim, dim, bias=False))])
            for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        """``x (N, T, dim)``, optional ``padding (N, T)`` bool (``True`` = ignore) -> ``(N, num_latents, dim)``."""
        latents = self.latents.expand(x.shape[0], -1, -1)
        for attn, ff in self.layers:
            latents = latents + attn(x, latents, padding)
            latents = latents + ff(latents)
        return self.norm(latents)


@CONNECTORS.register("perceiver")
class PerceiverConnector(Connector):
    """``(N, T, in_dim)`` -> ``PerceiverResampler`` at ``in_dim`` -> ``proj`` -> ``(N, num_latents, out_dim)``.

    Any token count (CLS tokens included: the perceiver has no notion of position); with per-image grids, ``x`` is
    padded after each image's ``h_i * w_i`` tokens and the padding is masked out."""

    per_image_grids = True

    def __init__(self, in_dim: int, out_dim: int, num_latents: int = 64, depth: int = 6, heads: int = 8,
                 head_dim: int = 64, ff_mult: int = 4) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.record_options(locals())
        self.resampler = PerceiverResampler(in_dim, depth=depth, num_latents=num_latents, heads=heads,
                                            head_dim=head_dim, ff_mult=ff_mult)
        self.proj = nn.Linear(in_dim, out_dim)

    def num_tokens(self, num_input_tokens: int, grid: tuple[int, int]) -> int:
        """Always ``num_latents``."""
        return self.resampler.latents.shape[0]

    def forward(self, x: torch.Tensor, grid: Grid | Sequence[Grid]) -> torch.Tensor:
        """``(N, T, in_dim)`` -> ``(N, num_latents, out_dim)``."""
        self.check_input(x)
        padding = None
        if len(grid) and isinstance(grid[0], (tuple, list)):
            padding = image_grids(x, grid, "perceiver")[1]
        return self.proj(self.resampler(x, padding))
