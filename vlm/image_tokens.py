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

from vlm import arrangements, connectors, encoders
from vlm.encoders.base import as_pair


class ImageTokens:
    """``(H, W) -> int``: tokens one image (tile) of ``H x W`` pixels becomes (``VLM.num_image_tokens``)."""

    #: ``vlm.data.placeholders.TokenCount`` keeps it when pickled (it holds configs, not the model)
    pickles_without_model = True

    def __init__(self, encoder: nn.Module, connector: nn.Module, arrangement: nn.Module | None = None) -> None:
        self.encoder_config: dict[str, Any] = encoder.export_config()
        self.connector_config: dict[str, Any] = connector.export_config()
        self.arrangement_config: dict[str, Any] | None = \
            arrangement.export_config() if arrangement is not None else None
        self._parts: tuple[Any, Any, Any] | None = (encoder, connector, arrangement)

    def parts(self) -> tuple[Any, Any, Any]:
        """``(encoder, connector, arrangement)``: the model's, or rebuilt from their configs on the ``meta``
        device (``arrangement`` ``None`` when the model has none)."""
        if self._parts is None:
            with torch.device("meta"):
                encoder, connector = encoders.build(self.encoder_config), connectors.build(self.connector_config)
                arrangement = None
                if self.arrangement_config is not None:
                    arrangement = arrangements.build(self.arrangement_config)
                    arrangement.attach(encoder, connector)
            self._parts = (encoder, connector, arrangement)
        return self._parts

    @property
    def arranges(self) -> bool:
        """Whether an image's count depends on its original size (the model has an arrangement): ask
        ``image(height, width)`` then."""
        return self.arrangement_config is not None

    @property
    def lays_out_multi_image(self) -> bool:
        """Whether the arrangement lays out the images of a multi-image sample otherwise than an image alone
        (``Arrangement.lays_out_multi_image``: OneVision)."""
        return self.arrangement_config is not None and bool(self.parts()[2].lays_out_multi_image)

    def image(self, height: int, width: int, alone: bool = True) -> int:
        """Tokens one whole image of original ``height x width`` pixels becomes (``Arrangement.num_tokens``;
        ``alone``: the only image of its sample, for an arrangement that ``lays_out_multi_image``); ``ValueError``
        when the model has no arrangement."""
        arrangement = self.parts()[2]
        if arrangement is None:
            raise ValueError("this model has no arrangement: an image is its views' tokens (call with a view size)")
        if arrangement.lays_out_multi_image:
            return int(arrangement.num_tokens(int(height), int(width), alone=alone))
        return int(arrangement.num_tokens(int(height), int(width)))

    def views(self, height: int, width: int, alone: bool = True) -> int:
        """Views (base + tiles) the arrangement expects for an image of original ``height x width`` pixels."""
        arrangement = self.parts()[2]
        if arrangement.lays_out_multi_image:
            return int(arrangement.num_views(int(height), int(width), alone=alone))
        return int(arrangement.num_views(int(height), int(width)))

    def video(self, num_frames: int) -> int:
        """Tokens of a video of ``num_frames`` fixed-size frames (``Arrangement.video_tokens``: an arrangement that
        takes videos)."""
        return int(self.parts()[2].video_tokens(int(num_frames)))

    def layout(self) -> dict[str, Any]:
        """The image layout (``tiling`` config) the arrangement expects."""
        return self.parts()[2].layout()

    def __call__(self, image_size: int | tuple[int, int]) -> int:
        encoder, connector, _ = self.parts()
        size = as_pair(image_size)
        return int(connector.num_tokens(encoder.num_tokens(size), encoder.grid(size)))

    def __getstate__(self) -> dict[str, Any]:
        return {"encoder_config": self.encoder_config, "connector_config": self.connector_config,
                "arrangement_config": self.arrangement_config, "_parts": None}
