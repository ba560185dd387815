"""Shared machinery for towers backed by a transformers vision model (CLIP, SigLIP, ...)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from vlm.dtypes import resolve_dtype
from vlm.encoders.base import SELECT_STRATEGIES, VisionEncoder
from vlm.hf_config import check_config_keys
from vlm.pretrained import FILE_KEYS, check_pretrained_dir, read_normalization
from vlm.recompute import enable_for_transformers

FeatureLayer = int | list[int]
# keys of a saved transformers config that describe the file, not the architecture


class HFVisionEncoder(VisionEncoder):
    """A transformers vision model whose ``hidden_states`` give the features.

    Subclasses set ``model_class``, ``config_class``, ``has_cls``, default ``image_mean``/``image_std``,
    ``config_overrides`` (applied however the tower is built: dimensions, ``config`` or a ``pretrained``
    directory) and the image-size rule (``fixed_position_grid``, ``native_size_only``).

    Build from exactly one of: ``pretrained`` (a local directory holding a transformers vision model, or a full
    CLIP/SigLIP model whose vision part is used), ``config`` (a transformers config dict), or dimensions
    (``hidden_size``, ``num_layers``, ``num_heads``, ``intermediate_size``, ``image_size``, ``patch_size``).
    A ``config`` key that ``config_class`` does not accept is a ``TypeError`` naming it and the closest accepted keys
    (transformers would ignore it silently); ``strict_config=False`` skips that check.

    Image sizes (CLIP, SigLIP): the patch convolution floors, so ``grid((H, W)) = (H // p, W // p)`` (SigLIP
    So400m/14 at 384 px -> 27 x 27). The learned position embeddings cover the native grid
    ``image_size // patch_size`` only, so without ``interpolate_pos_encoding`` a size must give that grid (CLIP: be
    exactly ``image_size``, transformers' own check). With ``interpolate_pos_encoding=True`` other grids work, the
    position embeddings being resized by transformers; such sizes must be multiples of the patch size (a partial
    patch would be cut off silently while the resized embeddings claim to span the image).
    """

    model_class: type[PreTrainedModel]
    config_class: type[PretrainedConfig]
    config_overrides: dict[str, Any] = {}
    # learned position embeddings for one grid (``image_size // patch_size``); False: the tower resizes them itself
    fixed_position_grid: bool = True
    # without interpolation the tower rejects any input other than image_size x image_size (transformers' CLIP)
    native_size_only: bool = False
    #: appended to the error for a ``pretrained`` directory that lacks the tower's weights
    pretrained_hint: str = " (or a full model whose vision part it loads)"

    def __init__(
        self,
        pretrained: str | None = None,
        config: dict[str, Any] | None = None,
        *,
        hidden_size: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        intermediate_size: int | None = None,
        image_size: int = 32,
        patch_size: int = 8,
        feature_layer: FeatureLayer = -1,
        select: str = "patch",
        freeze: bool = False,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        attn_implementation: str = "sdpa",
        dtype: str | None = None,
        interpolate_pos_encoding: bool = False,
        strict_config: bool = True,
    ) -> None:
        super().__init__()
        name = self.component_name
        if pretrained is not None and config is not None:
            raise ValueError(f"{name} encoder: give either 'pretrained' or 'config', not both")
        if select not in SELECT_STRATEGIES:
            raise ValueError(f"{name} encoder: select={select!r}; expected one of {SELECT_STRATEGIES}")
        if interpolate_pos_encoding and not self.fixed_position_grid:
            raise ValueError(f"{name} encoder: interpolate_pos_encoding does not apply: this tower resizes its "
                             f"position embeddings for every input size; leave it False")
        norm = None
        if pretrained is not None:
            self.model, norm = self.load_pretrained(pretrained, attn_implementation, dtype)
        else:
            cfg = self.build_config(
                config, strict_config, hidden_size=hidden_size, num_hidden_layers=num_layers,
                num_attention_heads=num_heads, intermediate_size=intermediate_size or 4 * hidden_size,
                image_size=image_size, patch_size=patch_size)
            cfg._attn_implementation = attn_implementation
            self.model = self.model_class(cfg)
            if dtype is not None:
                self.model.to(resolve_dtype(dtype))
        cfg = self.model.config
        layers = self.check_feature_layers(feature_layer, cfg.num_hidden_layers)
        self.feature_layer: FeatureLayer = feature_layer if isinstance(feature_layer, int) else layers
        self.layers = layers
        self.select = select
        self.interpolate_pos_encoding = bool(interpolate_pos_encoding)
        self.strict_config = bool(strict_config)
        self.patch_size = cfg.patch_size
        self.image_size = self.config_image_size(cfg)
        self.grid()  # the native size itself must be one the tower takes (e.g. at least one patch)
        self.hidden_size = cfg.hidden_size * len(layers)
        self.set_common_options(norm=norm, image_mean=image_mean, image_std=image_std, freeze=freeze)

    def load_pretrained(self, pretrained: str, attn_implementation: str,
                        dtype: str | None) -> tuple[PreTrainedModel, tuple | None]:
        """The tower of a local transformers directory and its normalization constants (``None`` when the directory
        states none).

        Raises:
            FileNotFoundError: the directory, its ``config.json`` or weights are missing.
            ValueError: the directory holds no weights for some of the tower's tensors (transformers would leave them
                randomly initialized, silently).
        """
        name = self.component_name
        path = check_pretrained_dir(pretrained, f"{name} encoder")
        # overrides (e.g. no SigLIP pooling head) hold for real checkpoints too; their weights are then ignored
        model, info = self.model_class.from_pretrained(
            str(path), attn_implementation=attn_implementation, dtype=resolve_dtype(dtype) or torch.float32,
            local_files_only=True, output_loading_info=True, **self.config_overrides)
        missing = sorted(info.get("missing_keys") or [])
        if missing:
            raise ValueError(f"{name} encoder: {str(path)!r} holds no weights for {len(missing)} tensors of "
                             f"transformers' {self.model_class.__name__} (e.g. {missing[:4]}); expected a "
                             f"directory saved from that model{self.pretrained_hint}")
        return model, read_normalization(path)

    def build_config(self, config: dict[str, Any] | None, strict_config: bool, **dims: int) -> PretrainedConfig:
        """The transformers config of a random tower: from ``config`` (keys checked against ``config_class`` when
        ``strict_config``; raises ``TypeError`` naming an unknown key) or else from the dimensions ``dims``; either
        way with ``config_overrides`` applied, as for a ``pretrained`` directory."""
        if config is None:
            return self.config_class(**self.dims_config(**dims), **self.config_overrides)
        if strict_config:
            check_config_keys(self.config_class, config, f"{self.component_name} encoder config")
        # the overrides hold here too (a SigLIP config saying vision_use_head: true still builds no pooling head)
        return self.config_class(**{**{k: v for k, v in config.items() if k != "model_type" and k not in FILE_KEYS},
                                    **self.config_overrides})

    @staticmethod
    def check_feature_layers(feature_layer: FeatureLayer, num_layers: int) -> list[int]:
        """``feature_layer`` as a list of ``hidden_states`` indices (``num_layers + 1`` entries: the embeddings, then
        one per block). Raises ``ValueError`` for an index out of range."""
        layers = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
        n_states = num_layers + 1
        for layer in layers:
            if not -n_states <= layer < n_states:
                raise ValueError(f"feature_layer {layer} out of range for a tower with {num_layers} "
                                 f"layers (hidden_states has {n_states} entries; valid {-n_states}..{n_states - 1})")
        return layers

    @staticmethod
    def dims_config(**dims: int) -> dict[str, int]:
        """Transformers config keys for a tower built from dimensions."""
        return dims

    @staticmethod
    def config_image_size(cfg: PretrainedConfig) -> int:
        return int(cfg.image_size)

    @property
    def hf_config(self) -> PretrainedConfig:
        return self.model.config

    def native_grid(self) -> tuple[int, int]:
        """The patch grid the position embeddings were made for: ``image_size // patch_size`` per side."""
        n = self.image_size // self.patch_size
        return (n, n)

    def check_image_size(self, size: tuple[int, int], grid: tuple[int, int]) -> None:
        """The rule in the class docstring: the native grid (CLIP: the exact native size) always; another grid only
        with ``interpolate_pos_encoding`` and ``H``, ``W`` multiples of the patch size."""
        if not self.fixed_position_grid:
            return super().check_image_size(size, grid)
        native, p, s = self.native_grid(), self.patch_size, self.image_size
        if self.interpolate_pos_encoding:
            if grid != native:
                super().check_image_size(size, grid)
            return
        accepted = (f"exactly {s}x{s} (transformers' {self.model_class.__name__} takes no other size)"
                    if self.native_size_only else
                    f"H and W in {native[0] * p}..{native[0] * p + p - 1} (the patch convolution floors)")
        fix = f"resize the image to {s}x{s}, or build the encoder with interpolate_pos_encoding=True"
        if grid != native:
            raise ValueError(f"{self.component_name} encoder: image size {size} gives a {grid[0]}x{grid[1]} patch "
                             f"grid, but the tower's position embeddings cover its native {native[0]}x{native[1]} "
                             f"grid (image_size {s}, patch_size {p}); expected {accepted}: {fix}")
        if self.native_size_only and size != (s, s):
            raise ValueError(f"{self.component_name} encoder: image size {size} is not the tower's native size; "
                             f"expected {accepted}: {fix}")

    def blocks(self) -> nn.ModuleList:
        """The transformer layers of the tower (``encoder.layers`` of transformers' CLIP / SigLIP / SigLIP2 vision
        models)."""
        return self.model.encoder.layers

    def enable_gradient_checkpointing(self, mode: bool | str = "full") -> bool:
        return enable_for_transformers(self.model, mode)

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W) -> (N, T_all, C)``: the selected hidden states, concatenated on channels."""
        dtype = next(self.model.parameters()).dtype
        extra = {"interpolate_pos_encoding": True} if self.interpolate_pos_encoding else {}
        out = self.model(pixel_values=pixel_values.to(dtype), output_hidden_states=True, return_dict=True, **extra)
        states = [out.hidden_states[i] for i in self.layers]
        return states[0] if len(states) == 1 else torch.cat(states, dim=-1)

    def export_config(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.registry_name,
            "config": self.model.config.to_dict(),
            "feature_layer": self.feature_layer,
            "select": self.select,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "attn_implementation": self.model.config._attn_implementation or "sdpa",
            "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
            "interpolate_pos_encoding": self.interpolate_pos_encoding,
        }
        if not self.strict_config:  # built from a dict with exotic keys: the rebuilt tower must accept them too
            out["strict_config"] = False
        return out
