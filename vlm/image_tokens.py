"""``ImageTokens``: how many placeholder tokens an image (or tile) of ``(H, W)`` pixels becomes in a model, as a
small picklable object the data pipeline can carry into DataLoader workers (which must not receive the model).

The count is the model's own: the encoder's patch grid for that size (``VisionEncoder.grid`` / ``num_tokens``)
through the connector's ``num_tokens``. In the process that built it the object asks the model's parts; unpickled
elsewhere it holds only their configs (``export_config``) and rebuilds the two parts once, on the ``meta`` device
(no memory, no weights), the first time a size is asked. Fixed-size models ask one size; native-resolution layouts
(each image at its own size) ask many.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlm import connectors, encoders
from vlm.encoders.base import as_pair


class ImageTokens:
    """``(H, W) -> int``: tokens one image (tile) of ``H x W`` pixels becomes (``VLM.num_image_tokens``)."""

    #: ``vlm.data.processor.TokenCount`` keeps it when pickled (it holds configs, not the model)
    pickles_without_model = True

    def __init__(self, encoder: nn.Module, connector: nn.Module) -> None:
        self.encoder_config: dict[str, Any] = encoder.export_config()
        self.connector_config: dict[str, Any] = connector.export_config()
        self._parts: tuple[Any, Any] | None = (encoder, connector)

    def parts(self) -> tuple[Any, Any]:
        """``(encoder, connector)``: the model's, or rebuilt from their configs on the ``meta`` device."""
        if self._parts is None:
            with torch.device("meta"):
                self._parts = (encoders.build(self.encoder_config), connectors.build(self.connector_config))
        return self._parts

    def __call__(self, image_size: int | tuple[int, int]) -> int:
        encoder, connector = self.parts()
        size = as_pair(image_size)
        return int(connector.num_tokens(encoder.num_tokens(size), encoder.grid(size)))

    def __getstate__(self) -> dict[str, Any]:
        return {"encoder_config": self.encoder_config, "connector_config": self.connector_config, "_parts": None}
