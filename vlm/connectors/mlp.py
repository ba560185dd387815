"""``mlp``: ``depth`` linear layers with GELU between them; LLaVA-1.5's ``mlp2x_gelu`` is ``depth=2``.

Layer ``i`` lives at ``layers.{2*i}`` (activations at odd indices), matching LLaVA's ``nn.Sequential`` layout.
"""
from __future__ import annotations

import torch
from torch import nn

from vlm.connectors.base import Connector
from vlm.connectors.registry import CONNECTORS

ACTIVATIONS = {"gelu": lambda: nn.GELU(), "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "relu": nn.ReLU,
               "silu": nn.SiLU}


@CONNECTORS.register("mlp")
class MLPConnector(Connector):
    token_wise = True

    # with depth=2, no norm and hidden_dim = out_dim, layers.0 / layers.2 are LLaVA's projector linear_1 / linear_2
    def __init__(self, in_dim: int, out_dim: int, depth: int = 2, hidden_dim: int | None = None,
                 act: str = "gelu", bias: bool = True, norm: bool = False) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"mlp connector depth must be >= 1; got {depth}")
        if act not in ACTIVATIONS:
            raise ValueError(f"mlp connector act={act!r}; expected one of {sorted(ACTIVATIONS)}")
        self.in_dim, self.out_dim = in_dim, out_dim
        self.record_options(locals())
        hidden = hidden_dim or out_dim
        dims = [in_dim] + [hidden] * (depth - 1) + [out_dim]
        mods: list[nn.Module] = []
        for i in range(depth):
            if i:
                mods.append(ACTIVATIONS[act]())
            mods.append(nn.Linear(dims[i], dims[i + 1], bias=bias))
        self.norm = nn.LayerNorm(in_dim) if norm else nn.Identity()
        self.layers = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``(N, T, C) -> (N, T, D)``."""
        self.check_input(x)
        return self.layers(self.norm(x))
