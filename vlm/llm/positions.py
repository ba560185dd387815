"""Position schemes: how an LLM numbers its input positions, stated by the LLM component (``position_scheme``) and
asked by ``VLM`` for every forward, so that a scheme that depends on the images (Qwen2-VL's 3-D mRoPE: temporal,
height, width indices from ``image_grid_thw``) is one more entry, never a branch on a model's name.

``rope_1d``: 1-D positions, as every transformers causal LM numbers them; restarting at 0 for each packed sample
(``segment_ids``); otherwise left to the LM (``None``: transformers counts from the cache position, and from the
attention mask under left padding in ``generate``). ``mrope`` (``vlm.llm.mrope``): Qwen2-VL's 3-D positions, image and
video tokens placed on their grid (``MediaTokens``).

To add one: a ``PositionScheme`` subclass in its own module, registered with ``@POSITION_SCHEMES.register(name)``
and imported in ``vlm/llm/__init__.py``; an LLM component states it (``position_scheme = "<name>"``). A scheme whose
positions continue differently during generation (mRoPE's rope delta) also owns that.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vlm.llm.masks import positions_from_segments
from vlm.registry import Registry

POSITION_SCHEMES: Registry = Registry("position scheme")


@dataclass
class MediaTokens:
    """Where the image / video placeholder tokens of a batch are and what grid each one fills.

    ``mask (B, L)`` bool: True at every image / video placeholder position. ``grids``: the LLM-token grid ``(t, h, w)``
    of each image / video in order of appearance (row-major over the batch; the tiles of one image are separate
    entries); an entry consumes exactly ``t * h * w`` consecutive placeholder tokens (counted, so two images whose
    placeholders touch stay two). ``time_steps``: the temporal position step of each entry (1 for images; for a
    Qwen2.5-VL video ``tokens_per_second * second_per_grid_t``), ``None``: 1 for every entry."""

    mask: torch.Tensor
    grids: list[tuple[int, int, int]]
    time_steps: list[float] | None = None

    def __post_init__(self) -> None:
        if self.mask.ndim != 2:
            raise ValueError(f"MediaTokens.mask must be (B, L); got shape {tuple(self.mask.shape)}")
        self.mask = self.mask.bool()
        self.grids = [tuple(int(v) for v in g) for g in self.grids]
        bad = [g for g in self.grids if len(g) != 3 or min(g) < 1]
        if bad:
            raise ValueError(f"MediaTokens.grids: each entry must be (t, h, w) with positive sizes; got {bad[:4]}")
        if self.time_steps is not None and len(self.time_steps) != len(self.grids):
            raise ValueError(f"MediaTokens.time_steps has {len(self.time_steps)} entries for {len(self.grids)} grids")
        n_tokens, n_grid = int(self.mask.sum()), sum(t * h * w for t, h, w in self.grids)
        if n_tokens != n_grid:
            raise ValueError(f"MediaTokens: the mask holds {n_tokens} image/video placeholder tokens but the grids "
                             f"{self.grids} fill {n_grid} (t * h * w each)")


class PositionScheme:
    """``position_ids(...)`` -> what the LM is called with as ``position_ids``: ``(B, L)`` (1-D schemes),
    ``(3, B, L)`` (mRoPE; ``(4, B, L)`` when packed), or ``None`` (the LM's own default). ``generation_inputs(...)``
    -> the keywords ``generate`` gets for the prompt (how positions continue during decoding is the scheme's to
    say). ``reads_media``: whether it places image tokens by ``MediaTokens`` (``VLM`` builds them only then)."""

    reads_media: bool = False

    def position_ids(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                     segment_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                     media: MediaTokens | None = None) -> torch.Tensor | None:
        """``input_ids (B, L)``; ``attention_mask (B, L)`` (0 = padding); ``segment_ids (B, L)`` (packing: 0 =
        padding, 1..k the samples of a row); ``position_ids`` given by the caller (kept); ``media``: where the image /
        video tokens are and their grids (schemes that place them on their grid read it)."""
        raise NotImplementedError

    def generation_inputs(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                          media: MediaTokens | None = None) -> dict[str, Any]:
        """Keywords for the LM's ``generate`` besides ``inputs_embeds`` / ``attention_mask`` (prompt ``(B, L)``,
        left-padded). Default: none (transformers numbers positions from the attention mask and the cache)."""
        return {}


@POSITION_SCHEMES.register("rope_1d")
class Rope1D(PositionScheme):
    """1-D positions: the caller's, else restarting per packed segment (``positions_from_segments``), else the LM's
    default (``None``)."""

    def position_ids(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                     segment_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                     media: MediaTokens | None = None) -> torch.Tensor | None:
        if position_ids is not None or segment_ids is None:
            return position_ids
        return positions_from_segments(segment_ids)
