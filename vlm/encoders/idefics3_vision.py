"""Idefics3 / SmolVLM vision tower (transformers ``Idefics3VisionTransformer``): SigLIP's blocks and weights under
the same names (``embeddings.patch_embedding``, ``embeddings.position_embedding``, ``encoder.layers.N``,
``post_layernorm``), with NaViT-style position ids: each patch's position is the bucket of its fractional
coordinate ``i / n`` among ``n = image_size // patch_size`` buckets (``torch.bucketize``), so any grid takes the
learned ``n x n`` table. For the native grid that is the identity only where float rounding lets it be (``n = 32``,
SmolVLM's 512 px / 16 px, is; ``n = 25`` is not: some patches share a position), which is why this wraps
transformers' class instead of SigLIP's: its logits are then Idefics3's for every size. No CLS token.

Features: the last layer through ``post_layernorm`` (``post_layernorm=True``, Idefics3's ``last_hidden_state``,
what its connector reads), or ``hidden_states[feature_layer]`` before it (``post_layernorm=False``, as vlm's other
towers). Sizes: multiples of the patch size (the base rule); the tower's patch mask is all ones (a view is whole:
Idefics3's processor pads only with whole padding images, which the model drops, ``VLM.real_views``).
"""
from __future__ import annotations

from typing import Any

import torch
from transformers import Idefics3VisionConfig
from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionTransformer

from vlm.encoders.hf_vision import HFVisionEncoder
from vlm.encoders.registry import ENCODERS


@ENCODERS.register("idefics3_vision")
class Idefics3VisionEncoder(HFVisionEncoder):
    model_class = Idefics3VisionTransformer
    config_class = Idefics3VisionConfig
    has_cls = False
    image_mean = (0.5, 0.5, 0.5)
    image_std = (0.5, 0.5, 0.5)
    fixed_position_grid = False  # the bucketized position ids cover any grid

    def __init__(self, *args: Any, post_layernorm: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.post_layernorm = bool(post_layernorm)
        last = self.model.config.num_hidden_layers
        if self.post_layernorm and [i % (last + 1) for i in self.layers] != [last]:
            raise ValueError(f"idefics3_vision encoder: post_layernorm=True normalizes the last layer's output "
                             f"(Idefics3's last_hidden_state); feature_layer={self.feature_layer!r} selects other "
                             f"layers: use feature_layer=-1, or post_layernorm=False")

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W) -> (N, h*w, C)``, every patch valid (a patch mask of ones)."""
        dtype = next(self.model.parameters()).dtype
        h, w = self.grid(tuple(pixel_values.shape[-2:]))
        mask = torch.ones(pixel_values.shape[0], h, w, dtype=torch.bool, device=pixel_values.device)
        if self.post_layernorm:
            return self.model(pixel_values=pixel_values.to(dtype), patch_attention_mask=mask).last_hidden_state
        out = self.model(pixel_values=pixel_values.to(dtype), patch_attention_mask=mask, output_hidden_states=True)
        states = [out.hidden_states[i] for i in self.layers]
        return states[0] if len(states) == 1 else torch.cat(states, dim=-1)

    def export_config(self) -> dict[str, Any]:
        return {**super().export_config(), "post_layernorm": self.post_layernorm}
