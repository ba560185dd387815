"""Injection sites: where a connector's image features enter the LLM, stated by the connector
(``Connector.injection_site``) and carried out by ``VLM`` through this registry, never by a branch on a connector's
name.

- ``input_embeddings`` (the LLaVA family, Q-Former, resampler, ...): the features replace the embeddings of the image
  placeholder tokens (``HFCausalLM.inject``, in order, with a count check) before the LLM runs.
- ``cross_attention`` (Flamingo's gated cross-attention, ``xattn``): ``<image>`` stays a text token; the connector's
  blocks, installed before decoder layers, read the media while the LLM runs (``Connector.media``).

To add one (e.g. DeepStack: features added to the hidden states of the first decoder layers): an ``InjectionSite``
subclass registered with ``@INJECTION_SITES.register(name)`` here or in a module imported by ``vlm.model``, and a
connector stating ``injection_site = "<name>"``.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from vlm.registry import Registry

INJECTION_SITES: Registry = Registry("injection site")


class InjectionSite:
    """``embed(model, embeds, input_ids, pixel_values, image_grid_thw, image_sizes, batch_num_images)`` -> the LLM's input embeddings ``(B, L, D)``;
    ``context(model, input_ids, pixel_values, segment_ids)`` -> the context the LLM runs in. ``model`` is the ``VLM``
    (``image_features``, ``llm``, ``connector``, ``image_token_id``)."""

    def embed(self, model: Any, embeds: torch.Tensor, input_ids: torch.Tensor, pixel_values: torch.Tensor,
              image_grid_thw: torch.Tensor | None = None, image_sizes: torch.Tensor | None = None,
              batch_num_images: torch.Tensor | None = None) -> torch.Tensor:
        return embeds

    def embed_videos(self, model: Any, embeds: torch.Tensor, input_ids: torch.Tensor,
                     pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor | None) -> torch.Tensor:
        """``embeds (B, L, D)`` with the videos' features at the video placeholders. Default: ``ValueError`` (this
        site takes no videos)."""
        raise ValueError(f"the {model.connector.component_name} connector injects features at "
                         f"{model.connector.injection_site!r}, which takes no videos; use a connector that replaces "
                         f"placeholder embeddings (injection_site 'input_embeddings')")

    @contextlib.contextmanager
    def context(self, model: Any, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                segment_ids: torch.Tensor | None = None) -> Iterator[None]:
        yield


@INJECTION_SITES.register("input_embeddings")
class InputEmbeddings(InjectionSite):
    """Features ``(N, K, D)`` (or ``(K_total, D)`` for native-resolution images) written into the placeholder
    positions of ``input_ids`` in row-major order."""

    def embed(self, model: Any, embeds: torch.Tensor, input_ids: torch.Tensor, pixel_values: torch.Tensor,
              image_grid_thw: torch.Tensor | None = None, image_sizes: torch.Tensor | None = None,
              batch_num_images: torch.Tensor | None = None) -> torch.Tensor:
        feats = model.image_features(pixel_values, image_grid_thw, image_sizes, batch_num_images)
        return model.llm.inject(embeds, input_ids, feats.reshape(-1, feats.shape[-1]), model.image_token_id)

    def embed_videos(self, model: Any, embeds: torch.Tensor, input_ids: torch.Tensor,
                     pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor | None) -> torch.Tensor:
        """Video features ``(K_total, D)`` written into the ``video_token_id`` positions in row-major order."""
        feats = model.video_features(pixel_values_videos, video_grid_thw)
        return model.llm.inject(embeds, input_ids, feats, model.video_token_id, kind="video")


@INJECTION_SITES.register("cross_attention")
class CrossAttention(InjectionSite):
    """The connector's cross-attention blocks read the images' media while the LLM runs (one ``<image>`` token per
    image in ``input_ids``; without images the blocks are skipped)."""

    @contextlib.contextmanager
    def context(self, model: Any, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                segment_ids: torch.Tensor | None = None) -> Iterator[None]:
        feats = model.image_features(pixel_values) if pixel_values is not None else None
        with model.connector.media(feats, input_ids, model.image_token_id, segment_ids):
            yield
