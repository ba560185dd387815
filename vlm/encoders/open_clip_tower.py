"""``open_clip``: the vision tower of any open_clip model, built from open_clip's bundled model config by name
(``ViT-bigG-14``, ``ViT-L-14``, ``ViT-B-16-SigLIP``, ...) or from a config dict; weights from a local file.

The features are the patch tokens (plus, with ``select='all'``, the prefix tokens: CLS, registers) of hidden state
``feature_layer`` (0: the embeddings after ``ln_pre``; ``k``: the output of block ``k``; -1: the last block),
before any final norm, pooling or projection: those head modules are removed, as are the blocks after
``feature_layer``, so every parameter left feeds the features. Two kinds of tower, told apart by type:

- open_clip's own ``VisionTransformer`` (OpenAI / LAION CLIP, ViT-bigG-14 as Qwen-VL uses it): ``image_size``
  rebuilds it at another resolution, and a weights file made for another grid gets its position embeddings resized
  (bicubic, open_clip's ``resize_pos_embed``), as Qwen-VL's 448 px ViT-bigG was made from the 224 px one;
- the same without a class token, with one learned position table resized to each image's grid at every forward
  (``class_token=False``, ``pos_grid``: Qwen-VL's own ViT, imported by ``vlm.interop.qwen_vl``);
- a ``TimmModel`` around a timm ViT trunk (the SigLIP variants): its native size only.

``pretrained``: a ``.safetensors`` or ``torch.load``-able (``weights_only=True``) file holding a full open_clip model
(its ``visual.*`` keys are used; ``module.`` prefixes and a ``state_dict`` wrapper are accepted) or the vision tower
alone. Keys that do not match the architecture are an error listing them.

Normalization constants: ``image_mean`` / ``image_std`` when given, else those of the published weights
``pretrained_tag`` names (open_clip's table, nothing downloaded), else those every published tag of the model agrees
on, else the model config's ``preprocess_cfg``, the timm trunk's, or OpenAI CLIP's.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from vlm.dtypes import resolve_dtype
from vlm.encoders.base import SELECT_STRATEGIES, VisionEncoder
from vlm.encoders.registry import ENCODERS


class NativeViT:
    """open_clip's ``VisionTransformer``: CLS + learned position embeddings, ``transformer.resblocks``."""

    def __init__(self, visual: nn.Module) -> None:
        self.visual = visual
        self.hidden_size = visual.transformer.width
        self.patch_size = int(visual.patch_size[0])
        self.image_size = int(visual.image_size[0])
        self.has_cls, self.num_register_tokens = True, 0

    def blocks(self) -> nn.ModuleList:
        return self.visual.transformer.resblocks

    def prune(self, keep_blocks: int) -> None:
        v = self.visual
        v.attn_pool, v.attn_pool_contrastive, v.ln_post, v.proj = None, None, nn.Identity(), None
        v.transformer.resblocks = v.transformer.resblocks[:keep_blocks]

    def tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.visual.transformer(self.visual._embeds(pixel_values))

    def resize_pos_embed(self, state: dict[str, torch.Tensor]) -> None:
        from open_clip.model import resize_pos_embed

        wrapped = {"visual.positional_embedding": state["positional_embedding"]}
        resize_pos_embed(wrapped, SimpleNamespace(visual=self.visual))
        state["positional_embedding"] = wrapped["visual.positional_embedding"]


class GridPosViT(NativeViT):
    """open_clip's ``VisionTransformer`` without a class token, its learned positions one ``pos_grid x pos_grid``
    table (``positional_embedding``: ``(pos_grid**2, C)``) resized bicubically to each image's patch grid at every
    forward (``align_corners=False``, in fp32): Qwen-VL's ViT (``get_abs_pos``), whose 16 x 16 table serves its
    32 x 32 grid at 448 px."""

    def __init__(self, visual: nn.Module, pos_grid: int) -> None:
        super().__init__(visual)
        self.has_cls = False
        self.pos_grid = (int(pos_grid), int(pos_grid))
        visual.class_embedding = None
        visual.positional_embedding = nn.Parameter(
            self.hidden_size ** -0.5 * torch.randn(self.pos_grid[0] * self.pos_grid[1], self.hidden_size))

    def tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W) -> (N, h*w, C)``: patches + resized positions, ``ln_pre``, the blocks."""
        from vlm.pos_embed import resize_pos_grid

        v = self.visual
        x = v.conv1(pixel_values)
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        x = x + resize_pos_grid(v.positional_embedding, self.pos_grid, grid).to(x.dtype)
        return v.transformer(v.ln_pre(x))

    def resize_pos_embed(self, state: dict[str, torch.Tensor]) -> None:
        pass  # the table is resized at every forward


class TimmTrunkViT:
    """open_clip's ``TimmModel`` around a timm ViT (``trunk``): the model's own prefix tokens."""

    def __init__(self, visual: nn.Module) -> None:
        self.visual, trunk = visual, visual.trunk
        self.hidden_size = int(trunk.embed_dim)
        self.patch_size = int(trunk.patch_embed.patch_size[0])
        self.image_size = int(trunk.patch_embed.img_size[0])
        self.has_cls = getattr(trunk, "cls_token", None) is not None
        self.num_register_tokens = int(trunk.num_prefix_tokens) - int(self.has_cls)

    def blocks(self) -> nn.ModuleList:
        return self.visual.trunk.blocks

    def prune(self, keep_blocks: int) -> None:
        trunk = self.visual.trunk
        self.visual.head = nn.Identity()
        for name in ("attn_pool", "fc_norm", "head_drop", "head", "norm"):
            if getattr(trunk, name, None) is not None:
                setattr(trunk, name, nn.Identity())
        trunk.blocks = trunk.blocks[:keep_blocks]

    def tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.visual.trunk.forward_features(pixel_values)  # its final norm is pruned to the identity

    def resize_pos_embed(self, state: dict[str, torch.Tensor]) -> None:
        pass  # native size only: a mismatch is reported as a shape error


def tower_kinds() -> dict[type, type]:
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import VisionTransformer

    return {VisionTransformer: NativeViT, TimmModel: TimmTrunkViT}


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """The vision tower's tensors in a weights file (keys relative to the tower)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"open_clip encoder: pretrained weights file {path!r} does not exist (expected a "
                                f".safetensors or torch weights file of the open_clip model)")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(file))
    else:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"open_clip encoder: {path!r} holds a {type(state).__name__}; expected a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("visual.") for k in state):
        state = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    return state


@ENCODERS.register("open_clip")
class OpenCLIPEncoder(VisionEncoder):
    """``(N, 3, S, S) -> (N, T, C)`` with ``S = image_size``; ``T = (S / patch)^2`` patch tokens (+ prefix tokens
    with ``select='all'``). Build with ``model_name`` (see ``open_clip.list_models()``) or ``model_config`` (an
    open_clip model config dict: ``embed_dim``, ``vision_cfg``, optional ``quick_gelu``, ``preprocess_cfg``)."""

    def __init__(self, model_name: str | None = None, model_config: dict[str, Any] | None = None,
                 image_size: int | None = None, pretrained: str | None = None, pretrained_tag: str | None = None,
                 feature_layer: int = -1, select: str = "patch", freeze: bool = False,
                 image_mean: list[float] | None = None, image_std: list[float] | None = None,
                 dtype: str | None = None, class_token: bool = True, pos_grid: int | None = None) -> None:
        super().__init__()
        from open_clip.model import _build_vision_tower

        if select not in SELECT_STRATEGIES:
            raise ValueError(f"open_clip encoder: select={select!r}; expected one of {SELECT_STRATEGIES}")
        config = model_config if model_config is not None else self.named_config(model_name)
        if "vision_cfg" not in config or "embed_dim" not in config:
            raise ValueError(f"open_clip encoder: model_config needs 'embed_dim' and 'vision_cfg' (an open_clip "
                             f"model config); got keys {sorted(config)}")
        label = model_name or "model_config"
        vision_cfg = dict(config["vision_cfg"])
        if image_size is not None and not vision_cfg.get("timm_model_name"):
            vision_cfg["image_size"] = int(image_size)
        visual = _build_vision_tower(config["embed_dim"], vision_cfg, quick_gelu=bool(config.get("quick_gelu")))
        kind = tower_kinds().get(type(visual))
        if kind is None:
            raise ValueError(f"open_clip encoder: {label}'s vision tower is a {type(visual).__name__}; expected a "
                             f"ViT (open_clip's VisionTransformer or a timm ViT trunk) whose patch tokens are the "
                             f"features")
        if not class_token:
            if kind is not NativeViT:
                raise ValueError(f"open_clip encoder: class_token=False needs open_clip's own VisionTransformer; "
                                 f"{label}'s tower is a {type(visual).__name__}")
            self.tower = GridPosViT(visual, pos_grid or int(vision_cfg["image_size"]) // int(vision_cfg["patch_size"]))
        elif pos_grid is not None:
            raise ValueError("open_clip encoder: pos_grid (a position table resized per image) needs class_token=False")
        else:
            self.tower = kind(visual)
        self.model = visual
        if image_size is not None and int(image_size) != self.tower.image_size:
            raise ValueError(f"open_clip encoder: {label}'s timm trunk takes its native {self.tower.image_size} px "
                             f"only; got image_size={image_size}")
        n_blocks = len(self.tower.blocks())
        if not -(n_blocks + 1) <= feature_layer <= n_blocks:
            raise ValueError(f"open_clip encoder: feature_layer {feature_layer} out of range for {label} with "
                             f"{n_blocks} blocks (valid {-(n_blocks + 1)}..{n_blocks}; 0 = the embeddings)")
        full_keys = set(visual.state_dict())
        self.tower.prune(feature_layer % (n_blocks + 1))
        if pretrained is not None:
            self.load_weights(pretrained, label, dropped=full_keys - set(visual.state_dict()))
        # the resolved config is saved: a saved model rebuilds without the name being registered with open_clip
        self.model_name, self.model_config, self.pretrained_tag = model_name, dict(config), pretrained_tag
        self.feature_layer, self.select = feature_layer, select
        self.class_token, self.pos_grid = bool(class_token), (self.tower.pos_grid[0] if not class_token else None)
        self.hidden_size, self.patch_size = self.tower.hidden_size, self.tower.patch_size
        self.image_size = self.tower.image_size
        self.has_cls, self.num_register_tokens = self.tower.has_cls, self.tower.num_register_tokens
        mean, std = self.normalization(config, pretrained is not None)
        self.image_mean = tuple(float(v) for v in (image_mean or mean))
        self.image_std = tuple(float(v) for v in (image_std or std))
        if dtype is not None:
            self.model.to(resolve_dtype(dtype))
        if freeze:
            self.requires_grad_(False)

    @staticmethod
    def named_config(model_name: str | None) -> dict[str, Any]:
        import open_clip

        if model_name is None:
            raise ValueError("open_clip encoder: give model_name (see open_clip.list_models()) or model_config")
        config = open_clip.get_model_config(model_name)
        if config is None:
            close = difflib.get_close_matches(model_name, open_clip.list_models(), n=5)
            raise KeyError(f"open_clip encoder: unknown model {model_name!r}; closest: {close} (all: "
                           f"open_clip.list_models())")
        return config

    def load_weights(self, path: str, label: str, dropped: set[str]) -> None:
        """Load the tower's tensors from ``path``; head and pruned-block keys (``dropped``) are skipped."""
        state = {k: v for k, v in read_weights(path).items() if k not in dropped}
        if "positional_embedding" in state:
            self.tower.resize_pos_embed(state)
        own = self.model.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in sorted(own)
                  if k in state and state[k].shape != own[k].shape]
        if missing or unexpected or shapes:
            raise ValueError(f"open_clip encoder: {path!r} does not match the {label} vision tower: "
                             f"{len(missing)} missing key(s) {missing[:10]}, {len(unexpected)} unexpected key(s) "
                             f"{unexpected[:10]}, {len(shapes)} shape mismatch(es) {shapes[:5]}")
        self.model.load_state_dict(state)

    def normalization(self, config: dict[str, Any], loaded: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """``(mean, std)`` by the rule in the module docstring."""
        from open_clip import get_pretrained_cfg, list_pretrained_tags_by_model
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        name = self.model_name
        tags = list_pretrained_tags_by_model(name) if name else []
        if self.pretrained_tag is not None:
            if self.pretrained_tag not in tags:
                raise ValueError(f"open_clip encoder: pretrained_tag {self.pretrained_tag!r} is not a published tag "
                                 f"of {name!r}; expected one of {tags}")
            tags = [self.pretrained_tag]
        published = {(tuple(c.get("mean", OPENAI_DATASET_MEAN)), tuple(c.get("std", OPENAI_DATASET_STD)))
                     for c in (get_pretrained_cfg(name, t) for t in tags)}
        if len(published) == 1:
            return published.pop()
        if len(published) > 1 and loaded:
            raise ValueError(f"open_clip encoder: {name}'s published weights use different normalization "
                             f"constants ({sorted(published)}); say which weights the file holds with "
                             f"pretrained_tag (one of {tags}) or give image_mean and image_std")
        pre = config.get("preprocess_cfg") or {}
        if "mean" in pre and "std" in pre:
            return tuple(pre["mean"]), tuple(pre["std"])
        trunk_cfg = getattr(getattr(self.model, "trunk", None), "pretrained_cfg", None) or {}
        if "mean" in trunk_cfg and "std" in trunk_cfg:
            return tuple(trunk_cfg["mean"]), tuple(trunk_cfg["std"])
        return tuple(OPENAI_DATASET_MEAN), tuple(OPENAI_DATASET_STD)

    def check_image_size(self, size: tuple[int, int], grid: tuple[int, int]) -> None:
        """Exactly ``image_size`` square: the learned position embeddings cover that grid only."""
        s = self.image_size
        if tuple(size) != (s, s):
            raise ValueError(f"open_clip encoder: image size {tuple(size)} does not fit {self.model_name or 'the'} "
                             f"tower's position embeddings, which cover the {s}x{s} px grid ({s // self.patch_size}"
                             f"x{s // self.patch_size} patches); expected {s}x{s}: resize the image, or build the "
                             f"encoder with image_size={size[0]} if it is square (the weights' position "
                             f"embeddings are resized when loaded)")

    def blocks(self) -> nn.ModuleList:
        return self.tower.blocks()

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(N, 3, S, S) -> (N, P + h*w, C)``: prefix tokens, then patch tokens, row-major."""
        return self.tower.tokens(pixel_values.to(next(self.model.parameters()).dtype))

    def export_config(self) -> dict[str, Any]:
        return {"name": "open_clip", "model_name": self.model_name, "model_config": self.model_config,
                "image_size": self.image_size, "pretrained_tag": self.pretrained_tag,
                "feature_layer": self.feature_layer, "select": self.select, "image_mean": list(self.image_mean),
                "image_std": list(self.image_std), "class_token": self.class_token, "pos_grid": self.pos_grid,
                "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch.")}
