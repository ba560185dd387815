"""``internvit``: InternViT, the vision tower of InternVL 1.5 / 2 / 2.5 / 3, written here (no remote code).

A ViT with a CLS token and learned absolute position embeddings for the native grid ``image_size // patch_size``
(bicubically resized for any other grid, as InternVL does), then pre-norm blocks::

    x = x + ls1 * attn(norm1(x))        # norm: LayerNorm or RMSNorm; attn: optional QK-norm over all heads
    x = x + ls2 * mlp(norm2(x))         # ls1 / ls2: layer scale; both branches with drop path

``feature_layer`` counts hidden states as transformers does (0 = embeddings, ``k`` = output of block ``k``,
``-1`` = the tower's output, after the optional final LayerNorm ``final_norm``; InternViT-6B V1.0 used ``-4``).
``select='patch'`` drops the CLS token (InternVL's ``vit_embeds[:, 1:]``).

Weights: ``pretrained`` = a local transformers ``InternVLVisionModel`` directory (``config.json`` with
``model_type: internvl_vision`` + safetensors), or a full ``InternVLForConditionalGeneration`` directory whose vision
tower is taken. Key names and the original OpenGVLab names: ``vlm.encoders.internvit_keys`` and
docs/encoders.md.
"""
from __future__ import annotations

import json
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlm.encoders.base import SELECT_STRATEGIES, VisionEncoder
from vlm.encoders.internvit_keys import hf_to_ours
from vlm.encoders.registry import ENCODERS
from vlm.layers import RMSNorm
from vlm.pretrained import CONFIG_FILE, check_pretrained_dir, load_strict, read_weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORM_TYPES = ("layer_norm", "rms_norm")
ACTS = {"gelu": nn.GELU}


def make_norm(norm_type: str, dim: int, eps: float) -> nn.Module:
    return nn.LayerNorm(dim, eps=eps) if norm_type == "layer_norm" else RMSNorm(dim, eps)


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a sample's residual branch with probability ``p`` (rescaling the rest)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Attention(nn.Module):
    """Multi-head self-attention ``(N, T, C) -> (N, T, C)``; ``qk_norm`` RMS-normalizes q and k over all heads."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool, qk_norm: bool, eps: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"internvit encoder: hidden_size {dim} is not divisible by num_heads {heads}")
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.q_norm = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        q = self.q_norm(self.q_proj(x))
        k = self.k_norm(self.k_proj(x))
        v = self.v_proj(x)
        q, k, v = (y.reshape(n, t, self.heads, c // self.heads).transpose(1, 2) for y in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, t, c))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = ACTS[act]()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """One pre-norm InternViT block with layer scale ``ls1`` / ``ls2`` (``(C,)`` each) and drop path."""

    def __init__(self, dim: int, heads: int, hidden: int, norm_type: str, eps: float, qkv_bias: bool, qk_norm: bool,
                 layer_scale: float, drop_path: float, act: str) -> None:
        super().__init__()
        self.norm1 = make_norm(norm_type, dim, eps)
        self.attn = Attention(dim, heads, qkv_bias, qk_norm, eps)
        self.ls1 = nn.Parameter(torch.full((dim,), float(layer_scale)))
        self.norm2 = make_norm(norm_type, dim, eps)
        self.mlp = MLP(dim, hidden, act)
        self.ls2 = nn.Parameter(torch.full((dim,), float(layer_scale)))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.ls1 * self.attn(self.norm1(x)))
        return x + self.drop_path(self.ls2 * self.mlp(self.norm2(x)))


class Embeddings(nn.Module):
    """``(N, 3, H, W) -> (N, 1 + h*w, C)``: CLS + patch embeddings, plus position embeddings resized to ``(h, w)``."""

    def __init__(self, dim: int, patch_size: int, native_grid: int) -> None:
        super().__init__()
        self.patch_size, self.native_grid = patch_size, native_grid
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, native_grid * native_grid + 1, dim))

    def position(self, h: int, w: int) -> torch.Tensor:
        """``(1, 1 + h*w, C)`` position embeddings; the patch part bicubically resized when ``(h, w)`` is not the
        native grid (``align_corners=False``, like InternVL and transformers)."""
        if (h, w) == (self.native_grid, self.native_grid):
            return self.pos_embed
        cls_pos, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        n, c = self.native_grid, grid.shape[-1]
        grid = grid.reshape(1, n, n, c).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(h, w), mode="bicubic", align_corners=False).to(grid.dtype)
        return torch.cat([cls_pos, grid.permute(0, 2, 3, 1).reshape(1, h * w, c)], dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixel_values)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        return x + self.position(h, w).to(x.dtype)


class InternViT(nn.Module):
    """The tower itself: ``embeddings``, ``layers`` (blocks), optional final ``norm``."""

    def __init__(self, *, hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int, image_size: int,
                 patch_size: int, norm_type: str, norm_eps: float, qkv_bias: bool, qk_norm: bool, layer_scale: float,
                 drop_path: float, final_norm: bool, act: str) -> None:
        super().__init__()
        self.embeddings = Embeddings(hidden_size, patch_size, image_size // patch_size)
        rates = [drop_path * i / (num_layers - 1) for i in range(num_layers)] if num_layers > 1 else [drop_path]
        self.layers = nn.ModuleList([
            Block(hidden_size, num_heads, intermediate_size, norm_type, norm_eps, qkv_bias, qk_norm, layer_scale,
                  rate, act) for rate in rates])
        # transformers' use_mean_pooling=False: a final LayerNorm (always LayerNorm) on the last hidden state
        self.norm = nn.LayerNorm(hidden_size, eps=norm_eps) if final_norm else None

    def forward(self, pixel_values: torch.Tensor, upto: int) -> list[torch.Tensor]:
        """Hidden states ``0..upto`` (``(N, 1 + h*w, C)`` each; 0 = embeddings); blocks past ``upto`` are not run."""
        x = self.embeddings(pixel_values)
        states = [x]
        for block in self.layers[:upto]:
            x = block(x)
            states.append(x)
        return states


@ENCODERS.register("internvit")
class InternViTEncoder(VisionEncoder):
    """InternViT from dimensions (random init) or from ``pretrained`` (a local transformers ``InternVLVisionModel``
    or ``InternVLForConditionalGeneration`` directory; dimension arguments are then read from its config).

    Options: ``norm_type`` (``layer_norm`` | ``rms_norm``), ``norm_eps``, ``qkv_bias``, ``qk_norm``, ``layer_scale``
    (initial value of ``ls1``/``ls2``), ``drop_path`` (maximum rate, linearly increasing over blocks),
    ``final_norm`` (a final LayerNorm on the last hidden state), ``feature_layer`` (int), ``select``
    (``patch`` drops CLS, ``all`` keeps it), ``freeze``, ``image_mean``/``image_std`` (default ImageNet's, as
    InternVL), ``dtype``. Any ``H, W`` that are multiples of ``patch_size`` work (position embeddings resized).
    """

    has_cls = True
    image_mean = IMAGENET_MEAN
    image_std = IMAGENET_STD

    def __init__(self, pretrained: str | None = None, *, hidden_size: int = 64, num_layers: int = 2,
                 num_heads: int = 4, intermediate_size: int | None = None, image_size: int = 448,
                 patch_size: int = 14, norm_type: str = "layer_norm", norm_eps: float = 1e-6, qkv_bias: bool = True,
                 qk_norm: bool = False, layer_scale: float = 0.1, drop_path: float = 0.0, final_norm: bool = False,
                 act: str = "gelu", feature_layer: int = -1, select: str = "patch", freeze: bool = False,
                 image_mean: list[float] | None = None, image_std: list[float] | None = None,
                 dtype: str | None = None) -> None:
        super().__init__()
        dims = dict(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                    intermediate_size=intermediate_size or 4 * hidden_size, image_size=image_size,
                    patch_size=patch_size, norm_type=norm_type, norm_eps=norm_eps, qkv_bias=qkv_bias,
                    qk_norm=qk_norm, layer_scale=layer_scale, drop_path=drop_path, final_norm=final_norm, act=act)
        state = None
        if pretrained is not None:
            hf_config, state = read_pretrained(pretrained)
            dims.update(dims_from_hf(hf_config, f"internvit encoder: {pretrained!r}"))
            dims["drop_path"] = drop_path
        if dims["norm_type"] not in NORM_TYPES:
            raise ValueError(f"internvit encoder: norm_type={dims['norm_type']!r}; expected one of {NORM_TYPES}")
        if dims["act"] not in ACTS:
            raise ValueError(f"internvit encoder: act={dims['act']!r}; expected one of {sorted(ACTS)}")
        if select not in SELECT_STRATEGIES:
            raise ValueError(f"internvit encoder: select={select!r}; expected one of {SELECT_STRATEGIES}")
        if dims["image_size"] % dims["patch_size"]:
            raise ValueError(f"internvit encoder: image_size {dims['image_size']} is not a multiple of patch_size "
                             f"{dims['patch_size']}; the position embeddings need a whole native grid")
        n_states = dims["num_layers"] + 1
        if not isinstance(feature_layer, int) or not -n_states <= feature_layer < n_states:
            raise ValueError(f"internvit encoder: feature_layer {feature_layer!r} out of range for a tower with "
                             f"{dims['num_layers']} layers (an int in {-n_states}..{n_states - 1})")
        self.dims = dims
        self.model = InternViT(**dims)
        if state is not None:
            load_strict(self.model, hf_to_ours(state), f"internvit encoder: {pretrained!r}")
        self.pretrained = pretrained
        self.feature_layer, self.select = feature_layer, select
        self.patch_size, self.image_size = int(dims["patch_size"]), int(dims["image_size"])
        self.hidden_size = int(dims["hidden_size"])
        self.set_common_options(image_mean=image_mean, image_std=image_std, dtype=dtype, freeze=freeze)

    def blocks(self) -> nn.ModuleList:
        return self.model.layers

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W) -> (N, 1 + h*w, C)``: hidden state ``feature_layer`` (``-1``: the tower's output)."""
        n = len(self.model.layers)
        index = self.feature_layer % (n + 1)
        x = self.model(pixel_values.to(self.model.embeddings.patch_embed.weight.dtype), index)[index]
        if self.feature_layer == -1 and self.model.norm is not None:
            x = self.model.norm(x)
        return x

    def export_config(self) -> dict[str, Any]:
        return {"name": "internvit", **self.dims, "feature_layer": self.feature_layer, "select": self.select,
                "image_mean": list(self.image_mean), "image_std": list(self.image_std),
                "dtype": str(self.model.embeddings.pos_embed.dtype).removeprefix("torch.")}

    def hf_config(self) -> dict[str, Any]:
        """This tower as a transformers ``InternVLVisionConfig`` dict."""
        return dims_to_hf(self.dims)


# --------------------------------------------------------------------------------------------- configs and keys
def dims_from_hf(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """Our dimension arguments from a transformers ``InternVLVisionConfig`` dict (``ValueError`` for a setting we
    do not model: no absolute position embeddings, non-square sizes)."""
    def square(v: Any, key: str) -> int:
        if isinstance(v, (list, tuple)):
            if len(set(v)) != 1:
                raise ValueError(f"{where}: {key}={list(v)} is not square; internvit takes square tiles")
            v = v[0]
        return int(v)

    if cfg.get("use_absolute_position_embeddings", True) is False:
        raise ValueError(f"{where}: use_absolute_position_embeddings=False is not an InternViT layout")
    return dict(hidden_size=int(cfg.get("hidden_size", 1024)), num_layers=int(cfg.get("num_hidden_layers", 24)),
                num_heads=int(cfg.get("num_attention_heads", 16)),
                intermediate_size=int(cfg.get("intermediate_size", 4096)),
                image_size=square(cfg.get("image_size", 448), "image_size"),
                patch_size=square(cfg.get("patch_size", 14), "patch_size"),
                norm_type=cfg.get("norm_type", "layer_norm"), norm_eps=float(cfg.get("layer_norm_eps", 1e-6)),
                qkv_bias=bool(cfg.get("attention_bias", False)), qk_norm=bool(cfg.get("use_qk_norm", False)),
                layer_scale=float(cfg.get("layer_scale_init_value", 0.1)),
                final_norm=not cfg.get("use_mean_pooling", True), act=cfg.get("hidden_act", "gelu"))


def dims_to_hf(dims: dict[str, Any]) -> dict[str, Any]:
    """A transformers ``InternVLVisionConfig`` dict for our dimension arguments."""
    return {"hidden_size": dims["hidden_size"], "num_hidden_layers": dims["num_layers"],
            "num_attention_heads": dims["num_heads"], "intermediate_size": dims["intermediate_size"],
            "image_size": [dims["image_size"]] * 2, "patch_size": [dims["patch_size"]] * 2,
            "norm_type": dims["norm_type"], "layer_norm_eps": dims["norm_eps"], "attention_bias": dims["qkv_bias"],
            "use_qk_norm": dims["qk_norm"], "layer_scale_init_value": dims["layer_scale"],
            "use_mean_pooling": not dims["final_norm"], "hidden_act": dims["act"],
            "use_absolute_position_embeddings": True, "use_mask_token": False}


VISION_PREFIXES = ("model.vision_tower.", "vision_tower.")


def read_pretrained(path: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(vision config dict, vision-tower state dict in transformers names)`` of a local ``InternVLVisionModel``
    directory, or of the vision tower of an ``InternVLForConditionalGeneration`` directory."""
    where = "internvit encoder"
    root = check_pretrained_dir(path, where)
    cfg = json.loads((root / CONFIG_FILE).read_text())
    model_type = cfg.get("model_type")
    if model_type == "internvl":
        cfg, prefixes = cfg.get("vision_config") or {}, VISION_PREFIXES
    elif model_type == "internvl_vision":
        prefixes = ("",)
    else:
        raise ValueError(f"{where}: {str(root / CONFIG_FILE)!r} has model_type={model_type!r}; expected "
                         f"'internvl_vision' (InternVLVisionModel) or 'internvl' (InternVLForConditionalGeneration)")
    state: dict[str, torch.Tensor] = {}
    for k, v in read_weights(root, where).items():
        p = next((p for p in prefixes if k.startswith(p)), None)
        if p is not None:
            state[k[len(p):]] = v
    return cfg, state
