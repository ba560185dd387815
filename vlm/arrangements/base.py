"""The feature-arrangement contract: how the LLM tokens of one image's views (a base image and its tiles, laid out by
an image layout, ``vlm.data.layouts``) become that image's token sequence.

Without an arrangement (the default) an image's tokens are its views' connector outputs one after another, and an
image of ``n`` views of ``S x S`` is ``n * num_image_tokens((S, S))`` placeholders. An arrangement can reorder them
on the tiles' spatial grid, drop the ones that fall on padding, and add learned tokens (LLaVA-NeXT's
``image_newline``), so an image's count depends on its original size: the arrangement states it
(``num_tokens(height, width)``), and both the processor (placeholders) and the model (features) ask it.

It works on the connector's output grid of one tile ``(h', w')`` (``Connector.output_grid`` of the encoder's patch
grid), so any encoder that states a grid and any token-wise or grid-keeping connector can be used with it. It states
the image layout it expects (``layout()``: the data side's ``tiling`` config), and the number of views each image
has (``num_views``), so the model takes the processor's pixels whole.

To add one: an ``Arrangement`` subclass in ``vlm/arrangements/<name>.py`` registered with
``@ARRANGEMENTS.register("<name>")`` and imported in ``vlm/arrangements/__init__.py``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Arrangement(nn.Module):
    """Arranges each image's view tokens. ``dim``: the LLM's hidden size (filled in by ``vlm.build``). Subclasses
    store their constructor arguments (besides ``dim``) in ``self.options`` (``export_config`` rebuilds them)."""

    dim: int
    options: dict[str, Any]
    #: whether an image that shares its sample with others is laid out otherwise than an image alone (OneVision:
    #: one view each); such an arrangement's ``num_views`` / ``num_tokens`` / ``forward`` take ``alone`` /
    #: ``batch_num_images``; the others lay every image out alone
    lays_out_multi_image: bool = False
    #: whether it arranges fixed-size video frames ``(M, F, 3, S, S)`` (``video_tokens``, ``video_forward``)
    takes_videos: bool = False

    def attach(self, encoder: Any, connector: Any) -> None:
        """Check that the parts fit (``ValueError`` naming what does not) and record the tile size ``S`` and the
        LLM-token grid of one tile ``(h', w')``: ``self.tile_size``, ``self.tile_grid``. Called when the model is
        composed (``VLM.__init__``), so a misfit is refused before any data is read."""
        raise NotImplementedError

    def layout(self) -> dict[str, Any]:
        """The image layout (``tiling`` config, ``vlm.data.layouts``) whose views this arrangement expects."""
        return self.expected_layout(self.options)

    @classmethod
    def expected_layout(cls, options: dict[str, Any]) -> dict[str, Any]:
        """``layout()`` from a config's options, nothing built (a run's config check compares a stage's
        ``tiling`` with it)."""
        raise NotImplementedError

    def multi_image_layout(self) -> dict[str, Any] | None:
        """How an image that shares its sample with others is preprocessed (``ImageProcessor`` options:
        ``resize_mode``, ``tiling``) when the arrangement ``lays_out_multi_image``; ``None``: as an image alone."""
        return None

    def num_views(self, height: int, width: int) -> int:
        """How many views (base + tiles) an image of ``height x width`` original pixels has."""
        raise NotImplementedError

    def num_tokens(self, height: int, width: int) -> int:
        """How many LLM tokens (placeholders) an image of ``height x width`` original pixels becomes."""
        raise NotImplementedError

    def forward(self, features: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """``features (V, h' * w', D)``: every image's views in order (its ``num_views`` rows each), ``image_sizes
        (N, 2)``: each image's original ``(height, width)`` in pixels -> ``(K_1 + ... + K_N, D)``."""
        raise NotImplementedError

    def whole_views(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """Each image's view of the whole image ``(N, 3, S, S)``, out of every image's views ``pixel_values (V, 3,
        S, S)`` (``num_views`` per image, ``image_sizes (N, 2)``): what an objective that takes one image per sample
        reads (the stem's own stages). Default: the first view of each image (a base view first, as anyres)."""
        counts = views_per_image(self, image_sizes)
        if sum(counts) != pixel_values.shape[0]:
            raise ValueError(f"pixel_values holds {pixel_values.shape[0]} views; image_sizes {image_sizes.tolist()} "
                             f"need {counts}")
        starts = torch.tensor([0, *counts[:-1]], device=pixel_values.device).cumsum(0)
        return pixel_values[starts]

    def export_config(self) -> dict[str, Any]:
        """The config that rebuilds this arrangement."""
        return {"name": self.registry_name, "dim": self.dim, **self.options}


def views_per_image(arrangement: Arrangement, image_sizes: torch.Tensor, batch_num_images: Any = None) -> list[int]:
    """``[num_views(h, w) for each (h, w) row of image_sizes (N, 2)]``; with ``batch_num_images`` (images per
    sample) and an arrangement that ``lays_out_multi_image``, each image's count for being alone in its sample or
    not."""
    sizes = [(int(h), int(w)) for h, w in image_sizes.tolist()]
    if batch_num_images is None or not arrangement.lays_out_multi_image:
        return [arrangement.num_views(h, w) for h, w in sizes]
    alone = alone_flags(batch_num_images, len(sizes))
    return [arrangement.num_views(h, w, alone=a) for (h, w), a in zip(sizes, alone)]


def alone_flags(batch_num_images: Any, num_images: int) -> list[bool]:
    """Whether each of ``num_images`` images (in batch order) is the only image of its sample, from
    ``batch_num_images`` (images per sample, ``(B,)`` tensor or list; samples without images may be listed as 0);
    ``None``: all of them. ``ValueError`` when the counts do not add up to ``num_images``."""
    if batch_num_images is None:
        return [True] * num_images
    counts = [int(n) for n in (batch_num_images.reshape(-1).tolist() if torch.is_tensor(batch_num_images)
                               else batch_num_images)]
    if sum(counts) != num_images or min(counts, default=0) < 0:
        raise ValueError(f"batch_num_images={counts} (images per sample) adds up to {sum(counts)} images, but "
                         f"image_sizes holds {num_images}")
    return [n == 1 for n in counts for _ in range(n)]
