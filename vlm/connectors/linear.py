"""``linear``: one projection ``(N, T, C) -> (N, T, D)`` (LLaVA-1.0), optionally plus a learned position embedding.

``pos_embed=T`` adds a trainable ``(T, D)`` table (zero-initialized, so it starts as the plain projection) to the
``T`` tokens of each image: for towers whose tokens do not say where they are (a CNN), and the LLM needs to
(grounding, "left of"). It fixes the token count: an image with another count is an error, not a silent mismatch.
"""
from __future__ import annotations

import torch
from torch import nn

from vlm.connectors.base import Connector, flat_grids
from vlm.connectors.registry import CONNECTORS


@CONNECTORS.register("linear")
class LinearConnector(Connector):
    token_wise = True

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True, pos_embed: int = 0) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.record_options(locals())
        self.proj = nn.Linear(in_dim, out_dim, bias=bias)
        if pos_embed < 0:
            raise ValueError(f"linear connector pos_embed={pos_embed}; expected 0 (none) or the tokens per image")
        self.pos = nn.Parameter(torch.zeros(pos_embed, out_dim)) if pos_embed else None

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``(N, T, C) -> (N, T, D)``."""
        self.check_input(x)
        out = self.proj(x)
        if self.pos is not None:
            if x.shape[1] != self.pos.shape[0]:
                raise ValueError(f"linear connector: pos_embed is sized for {self.pos.shape[0]} tokens per image; got "
                                 f"{x.shape[1]} (grid {tuple(grid)}): set connector.pos_embed to the tower's "
                                 f"token count")
            out = out + self.pos
        return out

    def forward_flat(self, x: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """``(P, C) -> (P, D)``: one call; with ``pos_embed`` per image (each frame gets the table)."""
        if self.pos is None:
            return super().forward_flat(x, grids)
        return self.forward_per_image(x, flat_grids(x, grids, self.in_dim, "linear connector"))
