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
from transformers import Idefics3VisionConfig, PreTrainedModel, SiglipVisionModel
from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionTransformer

from vlm.dtypes import resolve_dtype
from vlm.encoders.hf_vision import HFVisionEncoder
from vlm.encoders.registry import ENCODERS
from vlm.pretrained import check_pretrained_dir, load_strict, read_config, read_normalization

#: ``config.json`` model types of SigLIP checkpoints this tower starts from
SIGLIP_MODEL_TYPES = ("siglip", "siglip_vision_model")
#: the SigLIP vision-config keys an ``Idefics3VisionConfig`` takes
INHERITED_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                  "image_size", "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout")


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

    def load_pretrained(self, pretrained: str, attn_implementation: str,
                        dtype: str | None) -> tuple[PreTrainedModel, tuple | None]:
        """The tower of a local directory: an Idefics3 / SmolVLM vision tower as saved by transformers, or a SigLIP
        checkpoint (``SiglipModel`` / ``SiglipVisionModel``, e.g. ``google/siglip-base-patch16-512``: how SmolVLM
        starts), whose weights load under the same names (its pooling head, which Idefics3 has not, is left out)."""
        path = check_pretrained_dir(pretrained, "idefics3_vision encoder")
        model_type = read_config(path, "idefics3_vision encoder", "a SigLIP or Idefics3 vision checkpoint"
                                 ).get("model_type")
        if model_type not in SIGLIP_MODEL_TYPES:
            return super().load_pretrained(pretrained, attn_implementation, dtype)
        siglip, info = SiglipVisionModel.from_pretrained(
            str(path), attn_implementation=attn_implementation, dtype=resolve_dtype(dtype) or torch.float32,
            local_files_only=True, output_loading_info=True, vision_use_head=False)
        if info.get("missing_keys"):
            raise ValueError(f"idefics3_vision encoder: {str(path)!r} holds no weights for "
                             f"{len(info['missing_keys'])} tensors of a SigLIP vision tower (e.g. "
                             f"{sorted(info['missing_keys'])[:4]})")
        cfg = self.config_class(**{k: v for k, v in siglip.config.to_dict().items() if k in INHERITED_KEYS})
        cfg._attn_implementation = attn_implementation
        tower = self.model_class(cfg).to(next(siglip.parameters()).dtype)
        load_strict(tower, siglip.state_dict(), f"idefics3_vision encoder: {str(path)!r}")
        return tower, read_normalization(path)

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
