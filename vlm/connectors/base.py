"""The connector contract: ``forward(x (N, T, C), grid (h, w)) -> (N, K, D)`` and ``num_tokens(T, grid) -> K``.

``grid`` is the patch grid ``(h, w)`` shared by the ``N`` images of the call (``VLM.image_features`` stacks images of
one pixel size). A connector whose output does not depend on the grid's size (``per_image_grids = True``: the
resamplers) also takes a list of ``N`` grids, one per image, with ``x`` holding image ``i``'s ``h_i * w_i`` tokens
first and padding after them (``pad_tokens`` builds such a batch); the padding is never attended to.

Images of different sizes (native resolution) go through ``forward_flat(x (P, C), grids [(t, h, w)])``, each image's
tokens row-major; ``output_grid(grid)`` is the grid of LLM tokens an image becomes (``None``: no grid).
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


class Connector(nn.Module):
    """Maps encoder tokens ``(N, T, in_dim)`` to LLM-space tokens ``(N, K, out_dim)``.

    ``in_dim`` and ``out_dim`` are filled in by ``vlm.build`` from the encoder and the LLM. Subclasses store their
    constructor arguments (besides the dims) in ``self.options`` so ``export_config`` can rebuild them.
    """

    in_dim: int
    out_dim: int
    options: dict[str, Any]
    #: LoRA adapters go into a component's inner transformers model; a connector has none: train it whole ('full')
    supports_lora: bool = False
    #: whether ``forward`` takes one grid per image (a list of ``(h, w)``, ``x`` padded); see the module docstring
    per_image_grids: bool = False
    #: a fusion connector (``xattn``): ``num_tokens`` is the ``<image>`` text tokens per image (1), ``forward``
    #: gives the media its blocks attend to, ``install(llm)`` hooks the blocks into the LLM (``VLM`` calls it) and
    #: ``media(features, input_ids, image_token_id, segment_ids)`` is the context ``VLM`` runs the LLM in
    fuses_by_cross_attention: bool = False
    #: where the features enter the LLM (``vlm.injection.INJECTION_SITES``): ``input_embeddings`` (placeholder
    #: embeddings replaced) or ``cross_attention`` (the connector's blocks read them while the LLM runs)
    injection_site: str = "input_embeddings"
    #: each output token is a function of the input token at its place only (``identity``, ``linear``, ``mlp``):
    #: ``K = T``, ``output_grid(grid) = grid``, and ``forward_flat`` is one call over all images' tokens
    token_wise: bool = False

    def num_tokens(self, num_input_tokens: int, grid: tuple[int, int]) -> int:
        """``K``: how many LLM tokens one image of ``num_input_tokens`` encoder tokens (patch ``grid``) becomes."""
        return num_input_tokens

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def output_grid(self, grid: tuple[int, int]) -> tuple[int, int] | None:
        """The grid ``(h', w')`` of LLM tokens one image (or frame) of patch ``grid`` becomes, row-major; ``None``
        when the tokens have no grid (a resampler's ``K`` queries: a 1-D run). Token-wise connectors: ``grid``."""
        return (int(grid[0]), int(grid[1])) if self.token_wise else None

    def forward_flat(self, x: torch.Tensor, grids: Sequence[tuple[int, int, int]]) -> torch.Tensor:
        """Images of different sizes in one call: ``x (P, C)`` holds image ``i``'s ``t_i * h_i * w_i`` tokens
        (row-major over its ``(t, h, w)`` grid), images one after another -> ``(K_total, D)``, each image's
        ``t_i * num_tokens(h_i * w_i, (h_i, w_i))`` rows in order.

        Default: one call over all tokens for a ``token_wise`` connector, else ``forward`` per image with its ``t``
        frames as the batch (``forward_per_image``). Raises ``ValueError`` when the grids do not account for ``x``.
        """
        grids = flat_grids(x, grids, self.in_dim, type(self).__name__)
        if self.token_wise:
            return self(x[None], (1, x.shape[0]))[0]
        return self.forward_per_image(x, grids)

    def forward_per_image(self, x: torch.Tensor, grids: Sequence[tuple[int, int, int]]) -> torch.Tensor:
        """``forward_flat`` by a loop: ``self(x_i.reshape(t, h*w, C), (h, w))`` per image, flattened and joined."""
        outs, start = [], 0
        for t, h, w in grids:
            n = t * h * w
            out = self(x[start:start + n].reshape(t, h * w, x.shape[-1]), (h, w))
            outs.append(out.reshape(-1, out.shape[-1]))
            start += n
        return torch.cat(outs)

    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 3 or x.shape[-1] != self.in_dim:
            raise ValueError(f"{type(self).__name__} expects (N, T, {self.in_dim}); got {tuple(x.shape)}")

    def export_config(self) -> dict[str, Any]:
        """The config that rebuilds this connector (its parameter ``dtype`` included when it has parameters)."""
        out = {"name": self.registry_name, "in_dim": self.in_dim, "out_dim": self.out_dim, **self.options}
        param = next(self.parameters(), None)
        if param is not None:
            out["dtype"] = str(param.dtype).removeprefix("torch.")
        return out

    def record_options(self, frame_locals: dict[str, Any]) -> None:
        """Store the constructor's keyword arguments (except dims) for ``export_config``."""
        params = inspect.signature(type(self).__init__).parameters
        self.options = {k: frame_locals[k] for k in params if k not in ("self", "in_dim", "out_dim")}


Grid = tuple[int, int]


def image_grids(x: torch.Tensor, grid: Grid | Sequence[Grid], name: str) -> tuple[list[Grid], torch.Tensor | None]:
    """``(grids, key_padding_mask)`` for ``x (N, T, C)`` and one grid or ``N`` per-image grids.

    Every image must hold exactly its grid's ``h * w`` patch tokens (no CLS; with per-image grids, its first
    ``h_i * w_i`` rows, the rest padding). ``key_padding_mask`` is ``(N, T)`` bool, ``True`` at padding, or ``None``
    when nothing is padded. Raises ``ValueError`` naming the image and the counts otherwise.
    """
    n, t = x.shape[:2]
    per_image = len(grid) > 0 and isinstance(grid[0], (tuple, list))
    grids = [tuple(int(v) for v in g) for g in grid] if per_image else [tuple(int(v) for v in grid)] * n
    if len(grids) != n:
        raise ValueError(f"{name}: {len(grids)} grids for {n} images; expected one (h, w) per image")
    for i, (h, w) in enumerate(grids):
        if h < 1 or w < 1:
            raise ValueError(f"{name}: image {i} has grid {(h, w)}; expected h, w >= 1")
        if (h * w != t) if not per_image else (h * w > t):
            need = "exactly" if not per_image else "at most"
            raise ValueError(f"{name}: image {i} has a {h}x{w} patch grid ({h * w} tokens) but x holds {t} tokens "
                             f"per image; expected {need} h*w (patch tokens only: use the encoder's select='patch' "
                             f"to drop a CLS token)")
    if not per_image or all(h * w == t for h, w in grids):
        return grids, None
    counts = torch.tensor([h * w for h, w in grids], device=x.device)
    return grids, torch.arange(t, device=x.device)[None] >= counts[:, None]


def flat_grids(x: torch.Tensor, grids: Sequence[Sequence[int]], in_dim: int,
               name: str) -> list[tuple[int, int, int]]:
    """The ``(t, h, w)`` grids of a flat call as int tuples; ``ValueError`` naming the counts unless ``x`` is
    ``(P, in_dim)`` with ``P = sum t*h*w`` and every ``t, h, w >= 1``."""
    if x.ndim != 2 or x.shape[-1] != in_dim:
        raise ValueError(f"{name}: forward_flat expects tokens of shape (P, {in_dim}); got {tuple(x.shape)}")
    out = [tuple(int(v) for v in g) for g in grids]
    for i, g in enumerate(out):
        if len(g) != 3 or min(g) < 1:
            raise ValueError(f"{name}: grid {i} is {g}; expected (t, h, w) with t, h, w >= 1")
    total = sum(t * h * w for t, h, w in out)
    if total != x.shape[0]:
        raise ValueError(f"{name}: the {len(out)} grid(s) {out} hold {total} tokens (sum of t*h*w) but x has "
                         f"{x.shape[0]} rows")
    return out


def pad_tokens(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack per-image token tensors ``[(T_i, C)]`` into ``(N, max T_i, C)``, zero-padded after each image's tokens:
    the ``x`` of a per-image-grid call."""
    return torch.nn.utils.rnn.pad_sequence(list(features), batch_first=True)
