"""The image path of ``VLM`` (``vlm.model``): pixels -> LLM-space image and video features.

``MediaFeatures`` is a mixin of ``VLM``: the encoder (or the feature cache), then the connector, and the arrangement
when the model has one (``vlm.arrangements``); fixed-size views ``(N, 3, H, W)``, native-resolution flat patches with
their grids (Qwen2-VL), views padded per sample (Idefics3 / SmolVLM) and video frames; and the stand-in that keeps the
image path in every backward when a batch has no images (``stand_in_zero``). Below ``vlm.model``.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from vlm.connectors.base import Connector
from vlm.dtypes import param_dtype
from vlm.encoders.base import VisionEncoder, as_pair


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Every submodule of ``modules`` in eval mode inside; each one's own ``training`` flag restored after."""
    flags = [(m, m.training) for module in modules for m in module.modules()]
    for m, _ in flags:
        m.training = False
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


class MediaFeatures:
    """Image and video features of a ``VLM``: a mixin reading the parts ``VLM.__init__`` sets (``encoder``,
    ``connector``, ``arrangement``, ``feature_cache``, ``video_token_id``, ``image_path_in_lockstep``) and its
    ``video_geometry()``."""

    encoder: VisionEncoder
    connector: Connector
    arrangement: Any
    feature_cache: Any
    video_token_id: int | None
    image_path_in_lockstep: bool

    def image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None = None,
                       image_sizes: torch.Tensor | None = None, batch_num_images: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """``(N, 3, H, W) -> (N, K, D)`` LLM-space image tokens; for native-resolution images (an encoder stating
        ``native_resolution``), flat patches ``(P, 3 * t * p * p)`` + ``image_grid_thw (N, 3)`` (patch units, the
        Qwen2-VL processor's convention) -> ``(K_1 + ... + K_N, D)``, image by image (``Connector.forward_flat``).
        With an arrangement (``vlm.arrangements``): ``arranged_image_features`` -> ``(K_1 + ... + K_N, D)``
        (``image_sizes (N, 2)`` needed; ``batch_num_images (B,)``: images per sample, for an arrangement that lays
        out the images of a multi-image sample otherwise). Raises ``ValueError`` for ``image_grid_thw`` with an
        encoder that takes fixed-size images."""
        if self.arrangement is not None:
            return self.arranged_image_features(pixel_values, image_sizes, batch_num_images)
        if image_grid_thw is not None:
            return self.native_image_features(pixel_values, image_grid_thw)
        return self.view_features(pixel_values)

    def view_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Views of one size ``(N, 3, H, W)`` -> their LLM-space tokens ``(N, K, D)``: the encoder (or the feature
        cache), then the connector."""
        grid = self.encoder.grid(tuple(pixel_values.shape[-2:])) if pixel_values.ndim == 4 else (0, 0)
        trainable = any(p.requires_grad for p in self.encoder.parameters())
        pixels = pixel_values.to(param_dtype(self.encoder, pixel_values.dtype))
        if self.feature_cache is not None and not trainable:
            feats = self.feature_cache(self.encoder, pixels)
        else:
            with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):
                feats = self.encoder(pixels)
        # each part may have its own dtype: features enter the connector in its dtype (the LLM side is cast by
        # ``inject``); under autocast the matmuls still run in the autocast dtype
        return self.connector(feats.to(param_dtype(self.connector, feats.dtype)), grid)

    def arranged_image_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None,
                                batch_num_images: torch.Tensor | None = None) -> torch.Tensor:
        """Images through the arrangement (``vlm.arrangements``): ``pixel_values`` every image's views
        ``(V, 3, S, S)`` one image after another (vlm's processor), or ``(N, max_views, 3, S, S)`` padded per image
        (LLaVA-NeXT's processor: image ``i``'s first ``num_views`` rows are used); ``image_sizes (N, 2)``: each
        image's original ``(height, width)`` -> ``(K_1 + ... + K_N, D)``; ``batch_num_images (B,)``: images per
        sample (LLaVA-OneVision's processor; an arrangement that ``lays_out_multi_image`` lays out the images of a
        multi-image sample otherwise; ignored by the others). ``ValueError`` naming the counts when the
        pixels do not hold the views the sizes need."""
        from vlm.arrangements.base import views_per_image

        if image_sizes is None:
            raise ValueError(f"the {self.arrangement.registry_name} arrangement needs image_sizes (N, 2): each image's "
                             f"original (height, width), which the processor returns beside pixel_values")
        image_sizes = image_sizes.reshape(-1, 2)
        multi = batch_num_images if self.arrangement.lays_out_multi_image else None
        counts = views_per_image(self.arrangement, image_sizes, multi)
        if pixel_values.ndim == 5:
            if pixel_values.shape[0] != len(counts) or pixel_values.shape[1] < max(counts, default=0):
                raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)} (images, views, 3, H, W) for "
                                 f"image_sizes {image_sizes.tolist()}, which need {counts} views")
            pixel_values = torch.cat([p[:n] for p, n in zip(pixel_values, counts)])
        elif pixel_values.ndim != 4 or pixel_values.shape[0] != sum(counts):
            raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)} for image_sizes "
                             f"{image_sizes.tolist()} (height, width), which need {counts} views ({sum(counts)} in "
                             f"all) of (3, {self.arrangement.tile_size}, {self.arrangement.tile_size})")
        s = self.arrangement.tile_size
        if tuple(pixel_values.shape[-2:]) != (s, s):
            raise ValueError(f"pixel_values views are {tuple(pixel_values.shape[-2:])} pixels; the arrangement's "
                             f"tiles are the encoder's {s} x {s}")
        feats = self.view_features(pixel_values)
        feats = feats.to(param_dtype(self.arrangement, feats.dtype))
        if multi is not None:
            return self.arrangement(feats, image_sizes, multi)
        return self.arrangement(feats, image_sizes)

    def real_views(self, pixel_values: torch.Tensor | None,
                   pixel_attention_mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """Idefics3 / SmolVLM's batch layout -> vlm's: ``pixel_values (B, N, 3, H, W)`` (each sample's views, padded
        to ``N`` with all-zero views) -> the real views ``(V, 3, H, W)`` in order. A view is real when its
        ``pixel_attention_mask (B, N, H, W)`` has any 1, or, without a mask, when any of its values is non-zero
        (transformers' own rule). Anything else (4-D views, flat patches, a model with an arrangement, which reads
        5-D pixels itself) passes unchanged. ``ValueError`` for a mask of another shape, or one that covers part of
        a real view (the towers take whole views; Idefics3's processors pad only with whole padding views)."""
        if pixel_values is None or pixel_values.ndim != 5 or self.arrangement is not None:
            if pixel_attention_mask is not None and not bool(pixel_attention_mask.bool().all()):
                raise ValueError("pixel_attention_mask marks padded pixels, but pixel_values are not (B, N, 3, H, W) "
                                 "views padded per sample (Idefics3's processor): vlm's towers take whole views")
            return pixel_values
        views = pixel_values.flatten(0, 1)
        if pixel_attention_mask is None:
            return views[views.flatten(1).ne(0).any(dim=1)]
        b, n, _, h, w = pixel_values.shape
        if tuple(pixel_attention_mask.shape) != (b, n, h, w):
            raise ValueError(f"pixel_attention_mask has shape {tuple(pixel_attention_mask.shape)}; expected (B, N, H, W) "
                             f"= {(b, n, h, w)} for pixel_values of shape {tuple(pixel_values.shape)}")
        mask = pixel_attention_mask.flatten(0, 1).flatten(1).bool()
        real = mask.any(dim=1)
        partial = (real & ~mask.all(dim=1)).nonzero()
        if len(partial):
            k = int(partial[0, 0])
            raise ValueError(f"pixel_attention_mask covers only part of view {k % n} of sample {k // n} "
                             f"({int(mask[k].sum())} of {h * w} pixels): vlm's towers take whole views (Idefics3's "
                             f"processors pad a batch only with whole, all-zero views)")
        return views[real]

    def native_image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """Flat patches ``(P, D_in)`` of images of their own sizes -> ``(K_total, D)``: the encoder's row-major tokens
        ``(P, C)`` per image, then the connector image by image on each one's grid ``(t, h, w)``."""
        if not getattr(self.encoder, "native_resolution", False):
            raise ValueError(f"image_grid_thw was given (native-resolution images as flat patches) but the "
                             f"{self.encoder.component_name} encoder takes fixed-size images (N, 3, H, W); use an "
                             f"encoder that states native_resolution (qwen2_vl_vit) or a fixed-size image layout")
        trainable = any(p.requires_grad for p in self.encoder.parameters())
        pixels = pixel_values.to(param_dtype(self.encoder, pixel_values.dtype))
        with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):
            tokens = self.encoder(pixels, image_grid_thw)
        grids = [tuple(int(v) for v in g) for g in image_grid_thw.tolist()]
        return self.connector.forward_flat(tokens.to(param_dtype(self.connector, tokens.dtype)), grids)

    def video_features(self, pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor | None) -> torch.Tensor:
        """Flat patches ``(P, D_in)`` of videos + ``video_grid_thw (M, 3)`` (patch units, ``t`` temporal patches) ->
        ``(K_total, D)``: the native-resolution path of ``native_image_features`` (each temporal patch attends
        within itself in the tower; the connector merges each frame group). ``ValueError`` naming the keys for a
        model that takes no videos or patches that disagree with their grids. Without ``video_grid_thw``: fixed-size
        frames ``(M, F, 3, S, S)`` through the arrangement (``arranged_video_features``)."""
        if video_grid_thw is None:
            return self.arranged_video_features(pixel_values_videos)
        geometry = self.video_geometry()
        if geometry is None:
            raise ValueError(f"pixel_values_videos were given with video_grid_thw (flat patches) but this model "
                             f"takes no such videos: the {self.encoder.component_name} encoder states no "
                             f"native_resolution or the model has no video_token_id; give the frames as images, use a "
                             f"native-resolution encoder (qwen2_vl_vit), or, for an arrangement that takes videos "
                             f"(onevision), fixed-size frames (M, F, 3, S, S) without video_grid_thw")
        from vlm.data.patches import check_patches

        check_patches(pixel_values_videos, video_grid_thw, patch_size=geometry["patch_size"],
                      temporal_patch_size=geometry["temporal_patch_size"], merge_size=geometry["merge_size"],
                      names=("pixel_values_videos", "video_grid_thw"))
        return self.native_image_features(pixel_values_videos, video_grid_thw)

    def arranged_video_features(self, pixel_values_videos: torch.Tensor) -> torch.Tensor:
        """Fixed-size video frames ``(M, F, 3, S, S)`` (LLaVA-OneVision's video processor) -> ``(K_1 + ... + K_M,
        D)``: every frame through the encoder and the connector as a view, then the arrangement's
        ``video_forward`` (OneVision: each frame's grid pooled, a newline after each video). ``ValueError`` for a
        model whose arrangement takes no videos, or frames of another shape."""
        arr = self.arrangement
        if arr is None or not getattr(arr, "takes_videos", False):
            raise ValueError(f"pixel_values_videos of shape {tuple(pixel_values_videos.shape)} (videos, frames, 3, H, "
                             f"W) without video_grid_thw: fixed-size video frames need an arrangement that takes "
                             f"videos (onevision); this model's arrangement is "
                             f"{getattr(arr, 'registry_name', None)!r}")
        if self.video_token_id is None:
            raise ValueError("pixel_values_videos were given but the model has no video_token_id (it takes no videos)")
        s = arr.tile_size
        if pixel_values_videos.ndim != 5 or tuple(pixel_values_videos.shape[2:]) != (3, s, s):
            raise ValueError(f"pixel_values_videos of shape {tuple(pixel_values_videos.shape)}; expected (videos, "
                             f"frames, 3, {s}, {s}): every frame resized to the encoder's {s} x {s}")
        m, f = pixel_values_videos.shape[:2]
        feats = self.view_features(pixel_values_videos.reshape(m * f, 3, s, s))
        return arr.video_forward(feats.to(param_dtype(arr, feats.dtype)), [int(f)] * int(m))

    def trains_image_path(self) -> bool:
        """Whether this forward computes gradients for the encoder or the connector (grad enabled and one of their
        parameters trainable)."""
        parts = (self.encoder, self.connector) + ((self.arrangement,) if self.arrangement is not None else ())
        return torch.is_grad_enabled() and any(p.requires_grad for part in parts for p in part.parameters())

    def stand_in_zero(self, device: torch.device) -> torch.Tensor | None:
        """For a forward without images: a scalar that is exactly 0 yet depends on every trainable encoder and
        connector parameter, or ``None`` when none is needed.

        Distributed training needs every process to use the same parameters in each backward: DDP's reducer
        (``find_unused_parameters=false``) expects a gradient for every trainable parameter, FSDP reduce-scatters
        the gradients of each sharded group and gathers each sharded tower layer in its forward. A batch without
        images would leave the tower and connector out, so: when they train (``trains_image_path``) or the
        strategy runs forwards in lockstep (``image_path_in_lockstep``), one stand-in image (zeros,
        ``(1, 3, S, S)`` at the encoder's own ``image_size``) goes through the encoder (when it trains or runs in
        lockstep; otherwise its tokens are zeros) and the connector, in eval mode (no dropout drawn, no BatchNorm
        statistics updated), and the result is ``0 * (features.sum() + sum of every trainable connector
        parameter)`` (the latter reaches parameters outside the connector's ``forward``, such as a fusion
        connector's cross-attention blocks). Adding it changes no value and every such parameter gets a zero
        gradient, the same in one process as in many."""
        trains = self.trains_image_path()
        if not (trains or self.image_path_in_lockstep):
            return None
        size = as_pair(self.encoder.image_size)
        with eval_mode(self.encoder, self.connector):
            if self.image_path_in_lockstep or any(p.requires_grad for p in self.encoder.parameters()):
                pixels = torch.zeros(1, 3, *size, device=device, dtype=param_dtype(self.encoder))
                with torch.set_grad_enabled(trains and any(p.requires_grad for p in self.encoder.parameters())):
                    tokens = self.encoder(pixels)
            else:
                tokens = torch.zeros(1, self.encoder.num_tokens(size), self.encoder.hidden_size, device=device)
            feats = self.connector(tokens.to(param_dtype(self.connector, tokens.dtype)), self.encoder.grid(size))
        total = feats.float().sum()
        arranged = self.arrangement.parameters() if self.arrangement is not None else ()
        for p in [*self.connector.parameters(), *arranged]:
            if p.requires_grad:
                total = total + p.float().sum()
        return total * 0.0
