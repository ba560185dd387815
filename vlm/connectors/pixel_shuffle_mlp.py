"""``pixel_shuffle_mlp`` (InternVL): reduce each ``k x k`` block of patch tokens (``k = 1/scale``) to one token,
then LayerNorm + 2-layer GELU MLP. ``(N, h*w, C) -> (N, h*w/k^2, C') -> (N, K, D)``.

``reducer`` says how a block becomes one token:

- ``shuffle`` (default, InternVL): concatenate the block's tokens, ``C' = C*k^2``; for ``k = 2``
  ``out[a, b] = cat(x[2a, 2b], x[2a, 2b+1], x[2a+1, 2b], x[2a+1, 2b+1])``. It reproduces InternVL's
  ``pixel_shuffle`` (``ps_version='v2'``) element for element; ``pixel_unshuffle`` inverts it.
- ``avg_pool``: average the block's tokens, ``C' = C`` (a smaller MLP; loses the within-block layout).

``head`` says what projects the folded tokens to the LLM's width:

- ``mlp`` (default, InternVL's ``mlp1``): LayerNorm + Linear + GELU + Linear, at InternVL's indices (``layers.0``
  LayerNorm, ``layers.1`` and ``layers.3`` Linear);
- ``linear`` (Idefics3 / SmolVLM's ``Idefics3Connector``): one ``Linear(C*k^2, D)`` at ``layers.0``, without bias
  unless ``bias=True`` (``Idefics3SimpleMLP.proj`` has none). Idefics3's ``pixel_shuffle`` (``scale_factor`` 2-4 =
  ``k``) performs the same operations in the same order as InternVL's v2 shuffle above, so ``reducer='shuffle'``
  with ``scale = 1/scale_factor`` reproduces it element for element (tests/test_connector_pixel_shuffle.py compares
  with transformers' ``Idefics3Connector``).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

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


def pixel_unshuffle(x: torch.Tensor, scale: float) -> torch.Tensor:
    """The inverse of ``pixel_shuffle``: ``(N, h*s, w*s, C*k^2) -> (N, h, w, C)`` with ``k = 1/s``; token
    ``(k*a + i, k*b + j)`` is channel block ``i*k + j`` of ``x[a, b]``."""
    k = round(1 / scale)
    n, hs, ws, c = x.shape
    if c % (k * k):
        raise ValueError(f"pixel_unshuffle with scale {scale}: {c} channels are not divisible by {k * k}")
    x = x.reshape(n, hs, ws, k, k, c // (k * k)).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(n, hs * k, ws * k, c // (k * k))


def avg_pool_blocks(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``(N, h, w, C) -> (N, h*s, w*s, C)``: the mean of each ``k x k`` block (``k = 1/s``)."""
    k = round(1 / scale)
    return F.avg_pool2d(x.permute(0, 3, 1, 2), k).permute(0, 2, 3, 1)


#: reducer name -> (function of ``(N, h, w, C)`` and ``scale``, channel multiplier as a function of ``k``)
REDUCERS = {"shuffle": (pixel_shuffle, lambda k: k * k), "avg_pool": (avg_pool_blocks, lambda k: 1)}


def mlp_head(folded: int, hidden: int, out_dim: int, bias: bool | None) -> nn.Sequential:
    """InternVL's ``mlp1``: LayerNorm + Linear + GELU + Linear (``bias``: the Linears', default True)."""
    b = True if bias is None else bool(bias)
    return nn.Sequential(nn.LayerNorm(folded), nn.Linear(folded, hidden, bias=b), nn.GELU(),
                         nn.Linear(hidden, out_dim, bias=b))


def linear_head(folded: int, hidden: int, out_dim: int, bias: bool | None) -> nn.Sequential:
    """Idefics3's ``modality_projection``: one Linear (``bias`` default False, as ``Idefics3SimpleMLP``)."""
    return nn.Sequential(nn.Linear(folded, out_dim, bias=bool(bias)))


#: head name -> builder of ``(folded channels, hidden, out_dim, bias)``
HEADS = {"mlp": mlp_head, "linear": linear_head}


@CONNECTORS.register("pixel_shuffle_mlp")
class PixelShuffleMLP(Connector):
    def __init__(self, in_dim: int, out_dim: int, scale: float = 0.5, hidden_dim: int | None = None,
                 reducer: str = "shuffle", head: str = "mlp", bias: bool | None = None) -> None:
        super().__init__()
        inv = round(1 / scale) if scale > 0 else 0
        if not 0 < scale <= 1 or abs(inv * scale - 1) > 1e-9:
            raise ValueError(f"pixel_shuffle_mlp scale must be 1/k for an integer k (e.g. 0.5); got {scale}")
        if reducer not in REDUCERS:
            raise ValueError(f"pixel_shuffle_mlp reducer={reducer!r}; expected one of {sorted(REDUCERS)}")
        if head not in HEADS:
            raise ValueError(f"pixel_shuffle_mlp head={head!r}; expected one of {list(HEADS)}")
        if head == "linear" and hidden_dim is not None:
            raise ValueError(f"pixel_shuffle_mlp head='linear' is one Linear layer: hidden_dim={hidden_dim} does not "
                             f"apply (use head='mlp')")
        self.in_dim, self.out_dim, self.scale, self.factor = in_dim, out_dim, scale, inv
        self.record_options(locals())
        self.reduce, channels = REDUCERS[reducer]
        folded = in_dim * channels(inv)
        self.layers = HEADS[head](folded, hidden_dim or out_dim, out_dim, bias)

    def _check_grid(self, num_input_tokens: int, grid: tuple[int, int]) -> None:
        h, w = grid
        if num_input_tokens != h * w:
            raise ValueError(f"pixel_shuffle_mlp needs exactly the patch grid's {h}x{w}={h * w} tokens (no CLS: use "
                             f"select='patch'); got {num_input_tokens}")
        if h % self.factor or w % self.factor:
            raise ValueError(f"pixel_shuffle_mlp with scale {self.scale} needs a patch grid whose sides are "
                             f"divisible by {self.factor}; got {h}x{w}: pick an image size whose grid is e.g. "
                             f"{-(-h // self.factor) * self.factor}x{-(-w // self.factor) * self.factor} patches, "
                             f"or a connector that takes any grid (resampler, perceiver, mlp)")

    def num_tokens(self, num_input_tokens: int, grid: tuple[int, int]) -> int:
        self._check_grid(num_input_tokens, grid)
        return (grid[0] // self.factor) * (grid[1] // self.factor)

    def output_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        """``(h/k, w/k)``; ``ValueError`` for a grid whose sides are not multiples of ``k``."""
        self._check_grid(grid[0] * grid[1], grid)
        return (grid[0] // self.factor, grid[1] // self.factor)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``(N, h*w, C) -> (N, h*w/k^2, D)`` with ``k = 1/scale``."""
        self.check_input(x)
        self._check_grid(x.shape[1], grid)
        h, w = grid
        x = self.reduce(x.reshape(x.shape[0], h, w, -1), self.scale)
        return self.layers(x.reshape(x.shape[0], -1, x.shape[-1]))
