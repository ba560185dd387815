"""``qwen2_vl_vit``: the native-resolution vision tower of Qwen2-VL and Qwen2.5-VL, written here.

One class covers both towers; the transformers vision config says which (``model_type``):

| ``model_type`` | norm | MLP | attention |
| --- | --- | --- | --- |
| ``qwen2_vl_vision`` (Qwen2-VL) | LayerNorm | ``fc1`` -> ``hidden_act`` -> ``fc2`` (``embed_dim * mlp_ratio``) | full, per frame |
| ``qwen2_5_vl_vision`` (Qwen2.5-VL) | RMSNorm | SwiGLU ``gate_proj`` / ``up_proj`` / ``down_proj`` | windows of ``window_size`` px, full in ``fullatt_block_indexes`` |

A patch is ``temporal_patch_size`` (2) frames of ``patch_size`` px squared, embedded by a bias-free Conv3d
(``patch_embed.proj``); positions are 2-D rotary (row and column of the patch, each on a quarter of the head dim).
Blocks are pre-norm: ``x + attn(norm1(x))``, ``x + mlp(norm2(x))``; there is no final norm (the ``patch_merger``
connector's ``ln_q`` is it). Parameter names are transformers' ``visual.*`` names (under ``model.``), the merger
excepted: that is the ``patch_merger`` connector.

Inputs (``forward``):

- native resolution: ``pixel_values (P, 3 * temporal_patch_size * patch_size**2)`` flat patches of every image
  concatenated and ``image_grid_thw (N, 3)`` in patch units, exactly what transformers' ``Qwen2VLImageProcessor``
  returns (within an image, each ``merge x merge`` block of patches contiguous). Output ``(P, C)``: each image's
  tokens row-major over its ``(t, h, w)`` grid (the block order is undone by a gather, so every connector reads
  it; ``patch_merger`` regroups the blocks itself).
- fixed size: ``pixel_values (N, 3, H, W)`` (square tiles, any other layout): each image is patchified as two
  identical frames (what the image processor does with one image); output ``(N, h * w, C)`` row-major.

Attention is variable-length: no image attends to another, nor a frame to another frame of its video (transformers'
``cu_seqlens``), nor, in Qwen2.5-VL's window blocks, a window to another window. The segments are index sets over
the row-major sequence; segments of equal length are attended to in one batched ``scaled_dot_product_attention``
call without any mask (equivalent to a block-diagonal mask, without the ``P x P`` mask); with
``attn_implementation: flash_attention_2`` on CUDA the sequence is laid out segment by segment and
``flash_attn_varlen_func`` runs it with ``cu_seqlens``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

import torch
from torch import nn
from transformers import PretrainedConfig, Qwen2VLVisionConfig
from transformers.models.qwen2_5_vl import Qwen2_5_VLVisionConfig

from vlm.encoders.base import VisionEncoder
from vlm.encoders.qwen2_vl_blocks import Qwen2VLTower, TowerSpec, block_to_row_major
from vlm.encoders.registry import ENCODERS
from vlm.hf_config import check_config_keys
from vlm.pretrained import (
    CONFIG_FILE,
    FILE_KEYS,
    check_pretrained_dir,
    load_strict,
    read_config,
    read_normalization,
    read_weights,
)

#: OpenAI CLIP's normalization, which Qwen2-VL's image processor uses
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


def _rope_theta(cfg: PretrainedConfig) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    return float(params.get("rope_theta", 10000.0))


def _common(cfg: PretrainedConfig) -> dict[str, Any]:
    return dict(depth=int(cfg.depth), heads=int(cfg.num_heads), act=str(cfg.hidden_act),
                patch_size=int(cfg.patch_size), temporal_patch_size=int(cfg.temporal_patch_size),
                merge_size=int(cfg.spatial_merge_size), in_channels=int(cfg.in_channels), rope_theta=_rope_theta(cfg))


def spec_qwen2_vl(cfg: PretrainedConfig) -> TowerSpec:
    """Qwen2-VL: ``embed_dim`` wide (its ``hidden_size`` is the merger's output, the LLM's width)."""
    return TowerSpec(width=int(cfg.embed_dim), mlp_hidden=int(cfg.embed_dim * cfg.mlp_ratio), gated_mlp=False,
                     norm="layer_norm", **_common(cfg))


def spec_qwen2_5_vl(cfg: PretrainedConfig) -> TowerSpec:
    """Qwen2.5-VL: ``hidden_size`` wide (``out_hidden_size`` is the merger's output), window attention."""
    return TowerSpec(width=int(cfg.hidden_size), mlp_hidden=int(cfg.intermediate_size), gated_mlp=True,
                     norm="rms_norm", window_size=int(cfg.window_size),
                     full_attention_blocks=tuple(int(i) for i in cfg.fullatt_block_indexes), **_common(cfg))


#: vision-config ``model_type`` -> (transformers config class, reader of the architecture)
TOWER_TYPES: dict[str, tuple[type[PretrainedConfig], Callable[[PretrainedConfig], TowerSpec]]] = {
    "qwen2_vl_vision": (Qwen2VLVisionConfig, spec_qwen2_vl),
    "qwen2_5_vl_vision": (Qwen2_5_VLVisionConfig, spec_qwen2_5_vl),
}
#: full-model ``model_type`` whose ``vision_config`` is the tower's, and where its weights live
FULL_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
VISION_PREFIXES = ("model.visual.", "visual.")
MERGER_PREFIX = "merger."


# --------------------------------------------------------------------------------------------- the encoder
@ENCODERS.register("qwen2_vl_vit")
class Qwen2VLViT(VisionEncoder):
    """Qwen2-VL / Qwen2.5-VL vision tower (see the module docstring), built from exactly one of:

    - ``config``: a transformers vision config dict with its ``model_type`` (``qwen2_vl_vision`` or
      ``qwen2_5_vl_vision``; keys checked against its config class unless ``strict_config=False``), random init;
    - ``pretrained``: a local directory of a saved transformers ``Qwen2VLForConditionalGeneration`` /
      ``Qwen2_5_VLForConditionalGeneration`` (its ``visual.*`` weights, the merger left out) or of a saved vision
      model (``Qwen2VisionTransformerPretrainedModel`` / ``Qwen2_5_VisionTransformerPretrainedModel``).

    ``image_size``: the default square side of a fixed-size ``(N, 3, H, W)`` input (any multiple of the patch size
    works). ``attn_implementation``: ``sdpa`` (default), ``eager`` or ``flash_attention_2`` (used on CUDA).
    States ``native_resolution = True``, ``spatial_merge_size``, ``temporal_patch_size`` and ``tokens_per_second``
    (videos' temporal positions).

    Raises:
        ValueError: neither or both of ``config`` / ``pretrained``, an unknown ``model_type``, an unknown
            ``attn_implementation``, a directory without the tower's weights.
        TypeError: an unknown config key (``strict_config``).
    """

    native_resolution = True
    image_mean = CLIP_MEAN
    image_std = CLIP_STD

    def __init__(self, config: dict[str, Any] | None = None, pretrained: str | None = None, *, image_size: int = 448,
                 freeze: bool = False, image_mean: list[float] | None = None, image_std: list[float] | None = None,
                 attn_implementation: str = "sdpa", dtype: str | None = None, strict_config: bool = True) -> None:
        super().__init__()
        name = "qwen2_vl_vit encoder"
        if (config is None) == (pretrained is None):
            raise ValueError(f"{name}: give exactly one of 'config' (a transformers Qwen2-VL / Qwen2.5-VL vision "
                             f"config dict) or 'pretrained' (a local directory)")
        if attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"{name}: attn_implementation={attn_implementation!r}; expected one of "
                             f"{ATTN_IMPLEMENTATIONS}")
        state, norm = None, None
        if pretrained is not None:
            config, state, norm = read_pretrained(pretrained)
            strict_config = False  # the directory's own config is trusted (it may come from another version)
        self.hf_config = build_hf_config(dict(config), strict_config, name)
        spec = TOWER_TYPES[self.hf_config.model_type][1](self.hf_config)
        self.model = Qwen2VLTower(spec, attn_implementation)
        if state is not None:
            load_strict(self.model, state, f"{name}: {pretrained!r}")
        self.spec = spec
        self.pretrained = pretrained
        self.attn_implementation = attn_implementation
        self.strict_config = bool(strict_config)
        self.hidden_size = spec.width
        self.patch_size = spec.patch_size
        self.temporal_patch_size = spec.temporal_patch_size
        self.spatial_merge_size = spec.merge_size
        self.image_size = int(image_size)
        self.grid()  # the default size must be one the tower takes
        self.set_common_options(norm=norm, image_mean=image_mean, image_std=image_std, dtype=dtype, freeze=freeze)

    @property
    def tokens_per_second(self) -> float | None:
        """Temporal mRoPE positions per second of video (Qwen2.5-VL's vision config ``tokens_per_second``: a video's
        temporal step is this times its ``second_per_grid_t``); ``None`` for Qwen2-VL's tower (step 1 per temporal
        patch). ``VLM.time_steps`` asks it."""
        rate = getattr(self.hf_config, "tokens_per_second", None)
        return None if rate is None else float(rate)

    @property
    def patch_dim(self) -> int:
        """Values per flat patch: ``in_channels * temporal_patch_size * patch_size**2``."""
        s = self.spec
        return s.in_channels * s.temporal_patch_size * s.patch_size ** 2

    def blocks(self) -> nn.ModuleList:
        return self.model.blocks

    # ----------------------------------------------------------------------------------------- inputs
    def check_grids(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | Sequence) -> list[tuple]:
        """The ``(t, h, w)`` of each image; ``ValueError`` unless ``pixel_values`` is ``(P, patch_dim)`` with
        ``P = sum t*h*w`` and every ``h``, ``w`` a multiple of the merge size."""
        name, m = self.component_name, self.spatial_merge_size
        grid_t = torch.as_tensor(image_grid_thw)
        if grid_t.ndim != 2 or grid_t.shape[1] != 3:
            raise ValueError(f"{name} encoder: image_grid_thw must have shape (N, 3) (t, h, w per image, in "
                             f"patches); got shape {tuple(grid_t.shape)}")
        if pixel_values.ndim != 2 or pixel_values.shape[1] != self.patch_dim:
            s = self.spec
            raise ValueError(f"{name} encoder: with image_grid_thw, pixel_values must be flat patches of shape "
                             f"(P, {self.patch_dim}) (= {s.in_channels} channels x temporal_patch_size "
                             f"{s.temporal_patch_size} x patch_size {s.patch_size}^2, as Qwen2VLImageProcessor "
                             f"returns); got shape {tuple(pixel_values.shape)}")
        grids = [tuple(int(v) for v in g) for g in grid_t.tolist()]
        for i, (t, h, w) in enumerate(grids):
            if min(t, h, w) < 1 or h % m or w % m:
                raise ValueError(f"{name} encoder: image_grid_thw[{i}] = {(t, h, w)}; expected t, h, w >= 1 with "
                                 f"h and w multiples of spatial_merge_size {m}")
        total = sum(t * h * w for t, h, w in grids)
        if total != pixel_values.shape[0]:
            raise ValueError(f"{name} encoder: image_grid_thw disagrees with the pixels: its {len(grids)} grid(s) "
                             f"{grids} hold {total} patches (sum of t*h*w) but pixel_values has "
                             f"{pixel_values.shape[0]} rows")
        return grids

    def patchify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W) -> (N * h * w, patch_dim)`` row-major flat patches, each image as ``temporal_patch_size``
        identical frames (the image processor's layout of one image)."""
        n, c, hh, ww = pixel_values.shape
        p, tps = self.patch_size, self.temporal_patch_size
        h, w = hh // p, ww // p
        x = pixel_values.reshape(n, c, 1, h, p, w, p).expand(n, c, tps, h, p, w, p)
        return x.permute(0, 3, 5, 1, 2, 4, 6).reshape(n * h * w, c * tps * p * p)

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
        """Flat patches ``(P, patch_dim)`` + ``image_grid_thw (N, 3)`` -> ``(P, C)`` row-major per image; or
        ``(N, 3, H, W)`` -> ``(N, h*w, C)``. Raises ``ValueError`` for pixels and grids that disagree, a wrong
        channel count, or ``H``/``W`` not multiples of the patch size."""
        if image_grid_thw is None:
            if pixel_values.ndim == 2:
                raise ValueError(f"{self.component_name} encoder: flat pixel_values {tuple(pixel_values.shape)} "
                                 f"need image_grid_thw (N, 3); or pass images as (N, 3, H, W)")
            self.check_pixels(pixel_values)
            n = pixel_values.shape[0]
            h, w = self.grid(tuple(pixel_values.shape[-2:]))
            out = self.model(self.patchify(pixel_values), [(1, h, w)] * n)
            return out.reshape(n, h * w, -1)
        grids = self.check_grids(pixel_values, image_grid_thw)
        index = block_to_row_major(grids, self.spatial_merge_size).to(pixel_values.device)
        return self.model(pixel_values[index], grids)

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W) -> (N, h*w, C)`` (no prefix tokens)."""
        return self.forward(pixel_values)

    def export_config(self) -> dict[str, Any]:
        """A config that rebuilds this architecture without any file (the transformers vision config inline)."""
        cfg = {k: v for k, v in self.hf_config.to_dict().items() if k not in FILE_KEYS}
        out: dict[str, Any] = {
            "name": "qwen2_vl_vit", "config": cfg, "image_size": self.image_size,
            "image_mean": list(self.image_mean), "image_std": list(self.image_std),
            "attn_implementation": self.attn_implementation,
            "dtype": str(self.model.patch_embed.proj.weight.dtype).removeprefix("torch."),
        }
        if not self.strict_config:
            out["strict_config"] = False
        return out


def build_hf_config(config: dict[str, Any], strict: bool, name: str) -> PretrainedConfig:
    """The transformers vision config of ``config`` (its ``model_type`` picks the class, ``TOWER_TYPES``)."""
    model_type = config.pop("model_type", None)
    if model_type not in TOWER_TYPES:
        raise ValueError(f"{name}: config has model_type={model_type!r}; expected one of {sorted(TOWER_TYPES)} "
                         f"(Qwen2-VL's or Qwen2.5-VL's vision config)")
    cls = TOWER_TYPES[model_type][0]
    if strict:
        check_config_keys(cls, config, f"{name} config")
    return cls(**{k: v for k, v in config.items() if k not in FILE_KEYS})


def read_pretrained(path: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], tuple | None]:
    """``(vision config dict, tower state dict in our names, normalization or None)`` of a local directory: a full
    Qwen2-VL / Qwen2.5-VL model (``vision_config``; ``visual.*`` weights) or a saved vision model (the tower's
    weights at the top level). The merger's weights are left out (they are the ``patch_merger`` connector's).

    Raises:
        FileNotFoundError: no directory, ``config.json`` or weights.
        ValueError: another ``model_type``, or no tower weights in the directory.
    """
    where = "qwen2_vl_vit encoder"
    root = check_pretrained_dir(path, where)
    expected = (f"a transformers Qwen2-VL / Qwen2.5-VL model (model_type {FULL_MODEL_TYPES}) or its vision model "
                f"(model_type {sorted(TOWER_TYPES)})")
    cfg = read_config(root, where, expected)
    model_type = cfg.get("model_type")
    if model_type in FULL_MODEL_TYPES:
        # the full model's type says which tower (older files state none in vision_config, or the full type)
        cfg, prefixes = {**(cfg.get("vision_config") or {}), "model_type": f"{model_type}_vision"}, VISION_PREFIXES
    elif model_type in TOWER_TYPES:
        prefixes = ("",)
    else:
        raise ValueError(f"{where}: {str(root / CONFIG_FILE)!r} has model_type={model_type!r}; expected {expected}")
    state: dict[str, torch.Tensor] = {}
    for key, value in read_weights(root, where).items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None:
            continue
        key = key[len(prefix):]
        if not key.startswith(MERGER_PREFIX):
            state[key] = value
    if not state:
        raise ValueError(f"{where}: {str(root)!r} holds no vision-tower weights (keys starting with "
                         f"{' or '.join(repr(p) for p in prefixes if p) or 'patch_embed. / blocks.'}); expected "
                         f"{expected}")
    return cfg, state, read_normalization(root)
