"""What a saved ``VLM`` directory holds and how it is written: ``config.json`` (``VLMConfig``, tagged ``"format":
"vlm"``) and ``model.safetensors`` (+ the tokenizer's files). Nothing pickled.

Below ``vlm.model`` (``VLM.config`` and ``VLM.save_pretrained`` use it); reading a directory back builds a ``VLM``, so
it lives above: ``vlm.compose.from_config`` (the architecture) and ``vlm.loading`` (weights and tokenizer).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import save_model
from torch import nn

from vlm.data.image_placement import DEFAULT as DEFAULT_IMAGE_LAYOUT, ImagePlacement
from vlm.pretrained import CONFIG_FILE, WEIGHTS_FILE

#: ``config.json``'s ``format`` for a directory written by ``VLM.save_pretrained`` (others are transformers')
FORMAT = "vlm"
FORMAT_VERSION = 1
# how images were preprocessed when nothing recorded it (``vlm.data.images.ImageProcessor``'s default)
DEFAULT_IMAGE_PREPROCESSING = {"resize_mode": "resize"}


def placement_record(placement: ImagePlacement | dict[str, Any] | None) -> dict[str, Any] | None:
    """``config.json``'s ``image_placement`` entry for a placement (an ``ImagePlacement`` or its dict; ``None``
    stays)."""
    placement = ImagePlacement.from_dict(placement)
    return None if placement is None else placement.to_dict()


@dataclass
class VLMConfig:
    """What ``config.json`` holds: each component's rebuildable config plus the image-token convention."""

    encoder: dict[str, Any]
    connector: dict[str, Any]
    llm: dict[str, Any]
    image_token_id: int
    image_token: str = "<image>"
    extra: dict[str, Any] = field(default_factory=dict)
    generation: dict[str, Any] = field(default_factory=dict)  # vlm.generation: eos (list), pad, bos ids
    # ImageProcessor settings the model was trained with: resize_mode (resize | pad | crop), pad_color (pad only)
    image_preprocessing: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_IMAGE_PREPROCESSING))
    # how a turn's images and text are joined (vlm.data.image_placement): recorded from the training data; None: the
    # chat template places images (imported transformers directories)
    image_placement: dict[str, Any] | None = field(default_factory=lambda: DEFAULT_IMAGE_LAYOUT.to_dict())
    # the video placeholder token (None: the model takes no videos; configs written before videos: None)
    video_token_id: int | None = None
    video_token: str = "<video>"
    # how each image's view tokens are arranged (vlm.arrangements; None: one view after another)
    arrangement: dict[str, Any] | None = None
    # the vlm.interop format (FORMATS name) the model was imported from (None: built by vlm); to_hf without format=
    # writes it again when it can hold the model
    source_format: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **asdict(self)}


def save_directory(model: nn.Module, config: VLMConfig, tokenizer: Any, directory: str | os.PathLike) -> Path:
    """Write ``model``'s state dict to ``model.safetensors``, ``config`` to ``config.json`` and the ``tokenizer``
    (when not ``None``) into ``directory`` (created if missing). Each file is written beside its final name and
    replaced atomically, so a reader never sees a half-written one. Returns the directory."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tmp_weights = out / f".{WEIGHTS_FILE}.tmp"
    save_model(model, str(tmp_weights), metadata={"format": "pt"})
    tmp_cfg = out / f".{CONFIG_FILE}.tmp"
    tmp_cfg.write_text(json.dumps(config.to_dict(), indent=2, default=str))
    os.replace(tmp_weights, out / WEIGHTS_FILE)
    os.replace(tmp_cfg, out / CONFIG_FILE)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
