"""Position schemes: how an LLM numbers its input positions, stated by the LLM component (``position_scheme``) and
asked by ``VLM`` for every forward, so that a scheme that depends on the images (Qwen2-VL's 3-D mRoPE: temporal,
height, width indices from ``image_grid_thw``) is one more entry, never a branch on a model's name.

Only ``rope_1d`` ships: 1-D positions, as every transformers causal LM numbers them; restarting at 0 for each packed
sample (``segment_ids``); otherwise left to the LM (``None``: transformers counts from the cache position, and from
the attention mask under left padding in ``generate``).

To add one: a ``PositionScheme`` subclass in its own module, registered with ``@POSITION_SCHEMES.register(name)``
and imported in ``vlm/llm/__init__.py``; an LLM component states it (``position_scheme = "<name>"``). A scheme whose
positions continue differently during generation (mRoPE's rope delta) also owns that.
"""
from __future__ import annotations

import torch

from vlm.llm.masks import positions_from_segments
from vlm.registry import Registry

POSITION_SCHEMES: Registry = Registry("position scheme")


class PositionScheme:
    """``position_ids(...)`` -> what the LM is called with as ``position_ids``: ``(B, L)`` (1-D schemes),
    ``(3, B, L)`` (mRoPE), or ``None`` (the LM's own default)."""

    def position_ids(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                     segment_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                     image_grids: list[tuple[int, int, int]] | None = None) -> torch.Tensor | None:
        """``input_ids (B, L)``; ``segment_ids (B, L)`` (packing: 0 = padding, 1..k the samples of a row);
        ``position_ids`` given by the caller (kept); ``image_grids``: ``(t, h, w)`` token grid of each image in
        batch order (schemes that place image tokens on their grid read it)."""
        raise NotImplementedError


@POSITION_SCHEMES.register("rope_1d")
class Rope1D(PositionScheme):
    """1-D positions: the caller's, else restarting per packed segment (``positions_from_segments``), else the LM's
    default (``None``)."""

    def position_ids(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                     segment_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                     image_grids: list[tuple[int, int, int]] | None = None) -> torch.Tensor | None:
        if position_ids is not None or segment_ids is None:
            return position_ids
        return positions_from_segments(segment_ids)
