"""``linear``: one projection ``(N, T, C) -> (N, T, D)`` (LLaVA-1.0)."""
from __future__ import annotations

import torch
from torch import nn

from vlm.connectors.base import Connector
from vlm.connectors.registry import CONNECTORS


@CONNECTORS.register("linear")
class LinearConnector(Connector):
    def __init__(self, in_dim: int, out_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.record_options(locals())
        self.proj = nn.Linear(in_dim, out_dim, bias=bias)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``(N, T, C) -> (N, T, D)``."""
        self.check_input(x)
        return self.proj(x)
