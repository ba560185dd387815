"""``timm``: any timm model as a vision tower, through timm's ``features_only`` interface.

CNNs (ResNet, ConvNeXt, ...) and ViTs alike return ``(N, C, h, w)`` feature maps at the requested ``feature_layer``
(timm's ``out_indices``; negative counts from the last stage/block); they become ``(N, h*w, C)`` tokens, row-major.
A ViT's prefix tokens (CLS, registers, distillation: the model's own ``num_prefix_tokens``) come first with
``select='all'``; ``select='patch'`` (default) drops them.

Image sizes: a CNN takes any multiple of its stride. A ViT's learned position embeddings cover the grid of
``image_size``, so it takes that size only, unless built with ``dynamic_img_size=True`` (timm then resizes them for
every input; any multiple of the patch size).

A CNN's tokens carry little of *where* they are (only what zero padding leaks at the borders); a ViT's carry its
position embeddings. ``pos_embed="sincos2d"`` adds fixed 2D sine-cosine position codes (MAE / DETR style, no
parameters) times ``pos_scale`` to every token, so a frozen CNN tower still tells the LLM which cell a token is.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vlm.dtypes import resolve_dtype
from vlm.encoders.base import VisionEncoder
from vlm.encoders.registry import ENCODERS
from vlm.pos_embed import sincos_2d


@ENCODERS.register("timm")
class TimmEncoder(VisionEncoder):
    """Build with ``model_name`` (any ``timm.list_models()`` name), ``image_size``, optional ``model_kwargs``
    (e.g. ``{"patch_size": 8, "embed_dim": 128}`` for a ViT) and ``pretrained`` = a local weights file
    (``.safetensors`` preferred) of the *full* timm model. Nothing is downloaded."""

    def __init__(self, model_name: str, image_size: int = 224, pretrained: str | None = None,
                 feature_layer: int | list[int] = -1, select: str = "patch", freeze: bool = False,
                 model_kwargs: dict[str, Any] | None = None, image_mean: list[float] | None = None,
                 image_std: list[float] | None = None, pos_embed: str | None = None, pos_scale: float = 1.0,
                 dynamic_img_size: bool = False, dtype: str | None = None) -> None:
        super().__init__()
        import timm

        if select not in ("patch", "all"):
            raise ValueError(f"timm encoder select={select!r}; expected 'patch' (patch tokens) or 'all' (prefix "
                             f"tokens such as CLS and registers first, then the patch tokens)")
        if model_name not in timm.list_models():
            raise KeyError(f"timm encoder: unknown timm model {model_name!r} (see timm.list_models())")
        layers = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
        kwargs = {"img_size": image_size, **(model_kwargs or {})}
        if dynamic_img_size:
            kwargs["dynamic_img_size"] = True
        load_kwargs: dict[str, Any] = {}
        if pretrained is not None:
            if not Path(pretrained).is_file():
                raise FileNotFoundError(f"timm encoder: pretrained weights file {pretrained!r} does not exist")
            load_kwargs = {"pretrained": True, "pretrained_cfg_overlay": {"file": str(pretrained)}}
        try:
            self.model = _create(timm, model_name, {"features_only": True, "out_indices": tuple(layers), **kwargs,
                                                    **load_kwargs})
        except TypeError as e:
            if not dynamic_img_size:
                raise
            raise ValueError(f"timm encoder: {model_name} cannot be built with dynamic_img_size=True ({e}); only "
                             f"ViT-style models with position embeddings take it (CNNs take any size already)") from e
        inner = getattr(self.model, "model", self.model)  # a ViT's features_only wrapper holds the model itself
        self.has_cls = getattr(inner, "cls_token", None) is not None
        self.num_register_tokens = int(getattr(inner, "num_prefix_tokens", 0)) - int(self.has_cls)
        # learned position embeddings for one grid, not resized per input: only image_size fits
        self.fixed_size = getattr(inner, "pos_embed", None) is not None and not getattr(inner, "dynamic_img_size",
                                                                                     False)
        self.dynamic_img_size = bool(dynamic_img_size)
        reductions = self.model.feature_info.reduction()
        if len(set(reductions)) != 1:
            raise ValueError(f"timm encoder: feature layers {layers} of {model_name} have different strides "
                             f"{reductions}; concatenating them needs one grid")
        data_cfg = timm.data.resolve_data_config({}, model=self.model)
        self.model_name, self.model_kwargs, self.feature_layer = model_name, dict(model_kwargs or {}), feature_layer
        self.select = select
        if pos_embed not in (None, "sincos2d"):
            raise ValueError(f"timm encoder pos_embed={pos_embed!r}; expected null or 'sincos2d'")
        self.pos_embed, self.pos_scale = pos_embed, float(pos_scale)
        self.patch_size = int(reductions[0])
        self.image_size = image_size
        self.hidden_size = int(sum(self.model.feature_info.channels()))
        self.image_mean = tuple(image_mean or data_cfg["mean"])
        self.image_std = tuple(image_std or data_cfg["std"])
        self.grid(image_size)
        if dtype is not None:
            self.model.to(resolve_dtype(dtype))
        if freeze:
            self.requires_grad_(False)

    def check_image_size(self, size: tuple[int, int], grid: tuple[int, int]) -> None:
        """Multiples of the stride; a ViT without ``dynamic_img_size``: exactly ``image_size`` square."""
        super().check_image_size(size, grid)
        if self.fixed_size and tuple(size) != (self.image_size, self.image_size):
            raise ValueError(f"timm encoder: image size {tuple(size)} does not fit {self.model_name}'s position "
                             f"embeddings, which cover the {self.image_size}x{self.image_size} px grid only; "
                             f"expected {self.image_size}x{self.image_size}, or build the encoder with "
                             f"dynamic_img_size=True (timm resizes them per input)")

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W) -> (N, P + h*w, C)``: the ``P = num_prefix_tokens`` prefix tokens, then the patch tokens."""
        x = pixel_values.to(next(self.model.parameters()).dtype)
        prefix = None
        if self.num_prefix_tokens:
            getter = self.model
            outs = getter.model.forward_intermediates(x, indices=getter.out_indices, norm=getter.norm,
                                                     intermediates_only=True, return_prefix_tokens=True)
            maps, prefix = [o[0] for o in outs], torch.cat([o[1] for o in outs], dim=-1)
        else:
            maps = self.model(x)
        fmap = maps[0] if len(maps) == 1 else torch.cat(maps, dim=1)
        tokens = fmap.flatten(2).transpose(1, 2)
        if self.pos_embed is not None:
            h, w = fmap.shape[-2:]
            tokens = tokens + self.pos_scale * sincos_2d(h, w, tokens.shape[-1]).to(tokens)
        return tokens if prefix is None else torch.cat([prefix, tokens], dim=1)

    def export_config(self) -> dict[str, Any]:
        return {"name": "timm", "model_name": self.model_name, "image_size": self.image_size,
                "feature_layer": self.feature_layer, "select": self.select, "model_kwargs": self.model_kwargs,
                "image_mean": list(self.image_mean), "image_std": list(self.image_std),
                "pos_embed": self.pos_embed, "pos_scale": self.pos_scale, "dynamic_img_size": self.dynamic_img_size,
                "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch.")}


def _create(timm_module: Any, model_name: str, kwargs: dict[str, Any]) -> torch.nn.Module:
    """``timm.create_model`` passing ``img_size`` to the architectures that take one (ViT-style), not to CNNs."""
    try:
        return timm_module.create_model(model_name, **kwargs)
    except TypeError as e:
        if "img_size" not in str(e) or "img_size" not in kwargs:
            raise
        return timm_module.create_model(model_name, **{k: v for k, v in kwargs.items() if k != "img_size"})
