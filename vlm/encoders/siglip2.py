"""SigLIP2 vision tower (transformers ``Siglip2VisionModel``, NaFlex), used at a fixed resolution.

The tower takes pre-patchified pixels ``(N, h*w, 3*p*p)`` with a patch mask and per-image ``spatial_shapes``; this
wrapper patchifies ``(N, 3, H, W)`` the way transformers' Siglip2 image processor does, so any ``H, W`` divisible by
the patch size works (position embeddings are resized by the model). Patchifying is a reshape, not a flooring
convolution, so ``H`` and ``W`` must be multiples of the patch size (the base ``check_image_size`` rule). No CLS token.
"""
from __future__ import annotations

import math

import torch
from transformers import PretrainedConfig, Siglip2VisionConfig, Siglip2VisionModel

from vlm.encoders.hf_vision import HFVisionEncoder
from vlm.encoders.registry import ENCODERS


def patchify(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(N, C, H, W) -> (N, h*w, p*p*C)`` in Siglip2's (row, col, py, px, channel) order."""
    N, C, H, W = pixel_values.shape
    h, w = H // patch_size, W // patch_size
    x = pixel_values.reshape(N, C, h, patch_size, w, patch_size).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(N, h * w, patch_size * patch_size * C)


@ENCODERS.register("siglip2")
class Siglip2Encoder(HFVisionEncoder):
    model_class = Siglip2VisionModel
    config_class = Siglip2VisionConfig
    has_cls = False
    image_mean = (0.5, 0.5, 0.5)
    image_std = (0.5, 0.5, 0.5)
    config_overrides = {"vision_use_head": False}
    fixed_position_grid = False  # position embeddings are resized to every input's grid

    @staticmethod
    def dims_config(**dims: int) -> dict[str, int]:
        image_size = dims.pop("image_size")
        return {**dims, "num_patches": (image_size // dims["patch_size"]) ** 2}

    @staticmethod
    def config_image_size(cfg: PretrainedConfig) -> int:
        return int(math.isqrt(cfg.num_patches) * cfg.patch_size)

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W) -> (N, h*w, C)``."""
        h, w = self.grid(tuple(pixel_values.shape[-2:]))
        dtype = next(self.model.parameters()).dtype
        patches = patchify(pixel_values.to(dtype), self.patch_size)
        N = patches.shape[0]
        mask = torch.ones(N, h * w, dtype=torch.long, device=patches.device)
        shapes = torch.tensor([[h, w]] * N, dtype=torch.long, device=patches.device)
        out = self.model(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes,
                         output_hidden_states=True, return_dict=True)
        states = [out.hidden_states[i] for i in self.layers]
        return states[0] if len(states) == 1 else torch.cat(states, dim=-1)
