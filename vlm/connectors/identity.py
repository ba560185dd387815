"""``identity``: passes encoder tokens through (requires ``in_dim == out_dim``)."""
from __future__ import annotations

import torch

from vlm.connectors.base import Connector
from vlm.connectors.registry import CONNECTORS


@CONNECTORS.register("identity")
class IdentityConnector(Connector):
    token_wise = True

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        if in_dim != out_dim:
            raise ValueError(f"identity connector needs encoder hidden size == LLM hidden size; got {in_dim} vs "
                             f"{out_dim} (use 'linear' or 'mlp')")
        self.in_dim, self.out_dim = in_dim, out_dim
        self.record_options(locals())

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``(N, T, C) -> (N, T, C)``."""
        self.check_input(x)
        return x
