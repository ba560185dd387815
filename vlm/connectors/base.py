"""The connector contract: ``forward(x (N, T, C), grid (h, w)) -> (N, K, D)`` and ``num_tokens(T, grid) -> K``."""
from __future__ import annotations

import inspect
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
    #: where LLaVA's projector layers live in this connector (``{our submodule: "linear_1" | "linear_2"}``) when it
    #: has LLaVA's ``linear_1 -> act -> linear_2`` projector layout; ``None``: it has not (no LLaVA export/import)
    llava_projector_layers: dict[str, str] | None = None
    #: a fusion connector (``xattn``): ``num_tokens`` is the ``<image>`` text tokens per image (1), ``forward``
    #: gives the media its blocks attend to, ``install(llm)`` hooks the blocks into the LLM (``VLM`` calls it) and
    #: ``media(features, input_ids, image_token_id, segment_ids)`` is the context ``VLM`` runs the LLM in
    fuses_by_cross_attention: bool = False

    def llava_projector_problems(self) -> list[str]:
        """Why this connector's weights are not a LLaVA projector (empty when they are); used by the LLaVA export."""
        name = getattr(self, "registry_name", type(self).__name__)
        return [f"the connector is {name!r}; LLaVA's projector is linear_1 -> act -> linear_2, i.e. our 'mlp' "
                f"connector with depth=2 (no pooling, no norm)"]

    def num_tokens(self, num_input_tokens: int, grid: tuple[int, int]) -> int:
        """``K``: how many LLM tokens one image of ``num_input_tokens`` encoder tokens (patch ``grid``) becomes."""
        return num_input_tokens

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

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
