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
    # with depth=2, no norm and hidden_dim = out_dim, layers.0 / layers.2 are LLaVA's projector linear_1 / linear_2
    llava_projector_layers = {"layers.0": "linear_1", "layers.2": "linear_2"}
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

    def llava_projector_problems(self) -> list[str]:
        """What keeps this mlp from being LLaVA's projector: LLaVA has exactly 2 linear layers, no input norm, and a
        hidden size equal to the LLM's (``out_dim``)."""
        opts, problems = self.options, []
        if opts.get("depth") != 2:
            problems.append(f"the mlp connector has depth={opts.get('depth')}; LLaVA's projector has exactly 2 "
                            f"linear layers (depth=2)")
        if opts.get("norm"):
            problems.append("the mlp connector has norm=True; LLaVA's projector has no input LayerNorm")
        if opts.get("hidden_dim") not in (None, self.out_dim):
            problems.append(f"the mlp connector has hidden_dim={opts.get('hidden_dim')}; LLaVA's projector's hidden "
                            f"size is the LLM hidden size ({self.out_dim})")
        return problems

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``(N, T, C) -> (N, T, D)``."""
        self.check_input(x)
        return self.layers(self.norm(x))
