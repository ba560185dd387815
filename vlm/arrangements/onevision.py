"""LLaVA-OneVision's arrangement (``arrangement: {name: onevision, pinpoints, max_tiles, unpad, newline,
video_pool}``): ``anyres_grid`` (``vlm.arrangements.anyres_grid``) for an image alone in its sample, plus OneVision's
two other token layouts (Li et al. 2024, "LLaVA-OneVision: Easy Visual Task Transfer"; transformers'
``LlavaOnevisionModel.pack_image_features`` / ``get_video_features``):

- **one image in its sample** (``alone``): the ``anyres`` layout's base view + the best pinpoint's tiles, the tiles'
  grid unpadded and, past ``max_tiles`` tiles' worth of tokens (``anyres_max_N``), pooled bilinearly, a newline after
  each row: ``h'w' + rows * (cols + 1)`` tokens (``AnyresGrid.num_tokens``);
- **several images in one sample**: each image is one view (the image padded to a centred square with the mean
  colour, then resized to ``S x S``: ``LlavaOnevisionImageProcessor``'s ``pad_to_square``), its ``h' x w'`` tokens
  then one ``image_newline``: ``h'w' + 1`` tokens;
- **a video** of ``F`` frames (each resized to ``S x S``): every frame's ``h' x w'`` token grid pooled bilinearly to
  ``ceil(h' / p) x ceil(w' / p)`` (``video_pool = p``, 2 in OneVision), the frames one after another, then one
  ``image_newline`` after the whole video: ``F * ceil(h'/p) * ceil(w'/p) + 1`` tokens (``video_tokens``).

Which images are alone comes from ``batch_num_images`` (images per sample, what ``LlavaOnevisionProcessor``
returns); without it every image is laid out alone (as transformers without ``batch_num_images``). Any encoder that
states a grid and any token-wise or grid-keeping connector can be used (``AnyresGrid.attach``).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from vlm.arrangements.anyres_grid import AnyresGrid
from vlm.arrangements.base import alone_flags
from vlm.arrangements.registry import ARRANGEMENTS


@ARRANGEMENTS.register("onevision")
class OneVision(AnyresGrid):
    """``anyres_grid`` with OneVision's ``anyres_max`` budget (``max_tiles``, default 9), one-view images in
    multi-image samples and pooled video frames (``video_pool``)."""

    #: images of a multi-image sample are laid out otherwise than an image alone (``num_views(..., alone=False)``)
    lays_out_multi_image = True
    #: takes fixed-size video frames ``(M, F, 3, S, S)`` (``video_forward``)
    takes_videos = True

    def __init__(self, dim: int, pinpoints: list[list[int]], max_tiles: int | None = 9, unpad: bool = True,
                 newline: bool = True, video_pool: int = 2) -> None:
        super().__init__(dim, pinpoints, unpad=unpad, newline=newline, max_tiles=max_tiles)
        if int(video_pool) < 1:
            raise ValueError(f"onevision: video_pool={video_pool!r}; expected a pooling stride >= 1 (1: no pooling)")
        self.options["video_pool"] = int(video_pool)

    def multi_image_layout(self) -> dict[str, Any]:
        """An image of a multi-image sample: one view, padded to a centred square with ``int(255 * image_mean)``
        then resized to ``S x S`` (``resize_mode: pad``, no tiling; ``LlavaOnevisionImageProcessor.pad_to_square``)."""
        return {"resize_mode": "pad", "tiling": None}

    # ------------------------------------------------------------------------------------------- geometry
    def num_views(self, height: int, width: int, alone: bool = True) -> int:
        if alone:
            return super().num_views(height, width)
        if height < 1 or width < 1:
            raise ValueError(f"onevision: image size (height, width) = {(height, width)}; expected positive sizes")
        return 1

    def num_tokens(self, height: int, width: int, alone: bool = True) -> int:
        if alone:
            return super().num_tokens(height, width)
        num = self.num_views(height, width, alone=False)
        gh, gw = self.tile_grid
        return num * gh * gw + int(self.options["newline"])

    def frame_grid(self) -> tuple[int, int]:
        """``(h, w)`` of one video frame's tokens after pooling: ``ceil(h' / p), ceil(w' / p)``."""
        p = self.options["video_pool"]
        gh, gw = self.tile_grid
        return math.ceil(gh / p), math.ceil(gw / p)

    def video_tokens(self, num_frames: int) -> int:
        """LLM tokens of a video of ``num_frames`` frames: ``F * ceil(h'/p) * ceil(w'/p)`` + one newline."""
        fh, fw = self.frame_grid()
        return int(num_frames) * fh * fw + int(self.options["newline"])

    # -------------------------------------------------------------------------------------------- forward
    def forward(self, features: torch.Tensor, image_sizes: torch.Tensor,
                batch_num_images: Any = None) -> torch.Tensor:
        alone = alone_flags(batch_num_images, int(image_sizes.shape[0]))
        if all(alone):
            return super().forward(features, image_sizes)
        gh, gw = self.tile_grid
        counts = [self.num_views(int(h), int(w), a) for (h, w), a in zip(image_sizes.tolist(), alone)]
        if sum(counts) != features.shape[0] or features.shape[1] != gh * gw:
            raise ValueError(f"onevision: features of shape {tuple(features.shape)} for images of sizes "
                             f"{image_sizes.tolist()} (height, width), which need {counts} views of {gh * gw} tokens")
        out = []
        for feats, size, a in zip(features.split(counts), image_sizes, alone):
            if a:
                out.append(super().forward(feats, size[None]))
            else:
                out.append(self.with_newline(feats.reshape(-1, feats.shape[-1])))
        return torch.cat(out)

    def with_newline(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens (K, D)`` followed by ``image_newline`` (``(K + 1, D)``; unchanged without ``newline``)."""
        if self.image_newline is None:
            return tokens
        return torch.cat([tokens, self.image_newline.to(tokens.dtype)[None]])

    def video_forward(self, features: torch.Tensor, num_frames: list[int]) -> torch.Tensor:
        """``features (F_1 + ... + F_M, h' * w', D)``: every video's frames in order -> ``(K_1 + ... + K_M, D)``,
        ``K_i = video_tokens(F_i)``: each frame's grid pooled bilinearly (``F.interpolate``, ``align_corners=False``,
        as transformers' ``apply_pooling``), the frames joined, one ``image_newline`` after each video."""
        gh, gw = self.tile_grid
        if sum(num_frames) != features.shape[0] or features.shape[1] != gh * gw:
            raise ValueError(f"onevision: video features of shape {tuple(features.shape)} for videos of {num_frames} "
                             f"frames, which need {sum(num_frames)} frames of {gh * gw} tokens")
        d = features.shape[-1]
        grids = features.reshape(-1, gh, gw, d).permute(0, 3, 1, 2)
        if self.options["video_pool"] > 1:
            grids = F.interpolate(grids, list(self.frame_grid()), mode="bilinear")
        pooled = grids.permute(0, 2, 3, 1).reshape(features.shape[0], -1, d)
        return torch.cat([self.with_newline(v.reshape(-1, d)) for v in pooled.split(list(num_frames))])
