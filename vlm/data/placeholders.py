"""The processor's prompt text around images and videos: how many placeholders each one becomes and the text that
writes them (``Placeholders``, a mixin of ``vlm.data.processor.Processor``), the prompt's ``Piece``s, and the count
rule ``TokenCount`` (``(H, W) -> tokens per tile``).

Each image (all its views, contiguous) becomes ``image_start + image_token * n + image_end`` with ``n`` the sum of
``num_image_tokens((H, W))`` over its views (or, with a model that arranges its views, ``vlm.arrangements``, the
arrangement's count for the image's original size); an image layout that writes text between its views (Idefics3's
``<row_1_col_1>``) gives the middle (``Layout.image_text``). Each video becomes ``image_start + video_token * (t *
num_image_tokens((H, W))) + image_end``, ``t`` its temporal patches. Below ``vlm.data.processor``.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from vlm.data.readers.base import SampleError
from vlm.data.templates import Template, Text, VideoSlot


class Piece(NamedTuple):
    """A character range ``[start, end)`` of the rendered prompt: template text (``trainable`` or not) or an image
    block (``image_tokens`` placeholders between its markers; ``None`` for text)."""

    start: int
    end: int
    trainable: bool = False
    image_tokens: int | None = None


class Placeholders:
    """The prompt text of a ``Processor``'s rendered segments, images and videos written out as their placeholders:
    a mixin reading what ``Processor.__init__`` sets (``template``, ``image_processor``, ``num_image_tokens``,
    ``image_token``, ``video_processor``, ``video_token``)."""

    template: Template
    image_processor: Any
    num_image_tokens: Any
    image_token: str
    video_processor: Any
    video_token: str

    def _video_tokens(self, frames: torch.Tensor) -> int:
        """Placeholders of one video: its temporal patches x the tokens of one frame of its size; fixed-size frames
        (the video processor's ``size``): the arrangement's count for its frame count."""
        if self.video_processor.options.get("size") is not None:
            return self.num_image_tokens.video(frames.shape[0])
        tp = int(self.video_processor.options["temporal_patch_size"])
        return -(-frames.shape[0] // tp) * int(self.num_image_tokens(tuple(frames.shape[-2:])))

    def _layout(self, segments: list[Any], tiles: list[torch.Tensor], add_generation_prompt: bool,
                videos: list[torch.Tensor] = (), infos: list[Any] = (), sample_id: Any = None
                ) -> tuple[str, list[Piece]]:
        """The prompt as one string and its pieces. Each image slot is written as ``image_start``, ``image_token``
        repeated ``tiles x num_image_tokens((H, W))`` times (with a model that arranges its views,
        ``vlm.arrangements``: the arrangement's count for the image's original size), ``image_end`` (what
        ``LlavaProcessor`` puts in the text before it tokenizes); nothing is trainable under
        ``add_generation_prompt``."""
        parts: list[str] = []
        pieces: list[Piece] = []
        pos = 0
        image_iter, video_iter, info_iter = iter(tiles), iter(videos), iter(infos)
        markers = (self.template.image_start or "", self.template.image_end or "")
        for seg in segments:
            if isinstance(seg, Text):
                piece_text, train, n = seg.text, seg.trainable and not add_generation_prompt, None
            elif isinstance(seg, VideoSlot):
                n = self._video_tokens(next(video_iter))
                piece_text, train = markers[0] + self.video_token * n + markers[1], False
            else:
                t, info = next(image_iter), next(info_iter, None)
                n = self._image_tokens(t, info, sample_id, alone=len(tiles) == 1)
                piece_text, train = markers[0] + self._image_text(t, info, n) + markers[1], False
            parts.append(piece_text)
            pieces.append(Piece(pos, pos + len(piece_text), train, n))
            pos += len(piece_text)
        return "".join(parts), pieces

    def _image_text(self, views: torch.Tensor, info: Any, n: int) -> str:
        """The text of one image's ``n`` placeholders: the image layout's (``Layout.image_text``: Idefics3 writes
        ``<row_r_col_c>`` before each crop's tokens), or ``image_token * n`` (no layout, or a model that arranges
        its views)."""
        layout = getattr(self.image_processor, "layout", None)
        if layout is None or info is None or getattr(self.num_image_tokens, "arranges", False):
            return self.image_token * n
        per_view = n // views.shape[0]  # n = views x num_image_tokens((H, W)) (_image_tokens): not counted again
        return layout.image_text(info, self.image_token, [per_view] * views.shape[0])

    def _image_tokens(self, views: torch.Tensor, info: Any, sample_id: Any, alone: bool = True) -> int:
        """Placeholders of one image of ``views (n, 3, H, W)``: ``n x num_image_tokens((H, W))``, or, when the
        count arranges views (``TokenCount.arranges``), its count for the image's original size (and whether it is
        ``alone`` in its sample; ``SampleError`` naming the sample when it refuses the size, or when the image's
        views are not the ones it expects)."""
        if not getattr(self.num_image_tokens, "arranges", False):
            return views.shape[0] * int(self.num_image_tokens(tuple(views.shape[-2:])))
        w, h = info.original_size
        try:
            n = self.num_image_tokens.image(h, w, alone=alone)
            expected = self.num_image_tokens.views(h, w, alone=alone)
        except ValueError as e:
            raise SampleError(str(e), reason="image_size", sample_id=sample_id) from None
        if views.shape[0] != expected:
            what = "a base view + its pinpoint's tiles" if alone else "one view: the image shares its sample"
            raise SampleError(f"an image of {w}x{h} pixels (width x height) became {views.shape[0]} views, but the "
                              f"model's arrangement expects {expected} ({what}): the image layout (tiling) must be "
                              f"the model's ({self.num_image_tokens.layout()})", reason="config", sample_id=sample_id)
        return n


class TokenCount:
    """``(H, W) -> tokens per tile``: a constant, or a model's ``num_image_tokens`` memoized per size.

    Pickles without the model (DataLoader workers must not receive a copy of it): after unpickling only the sizes
    already asked (``for_model`` pre-asks the processor's tile size) are known, unless the source is itself
    picklable without the model (it states ``pickles_without_model``: ``vlm.image_tokens.ImageTokens``, which
    ``for_model`` passes), which then counts any size."""

    def __init__(self, source: int | Callable[[tuple[int, int]], int], known: dict | None = None) -> None:
        self.constant = source if isinstance(source, int) else None
        self.fn = None if isinstance(source, int) else source
        self.known: dict[tuple[int, int], int] = dict(known or {})

    def __call__(self, hw: tuple[int, int]) -> int:
        if self.constant is not None:
            return self.constant
        hw = tuple(int(v) for v in hw)
        if hw not in self.known:
            if self.fn is None:
                raise ValueError(f"num_image_tokens for tile size {hw} unknown in this process (only {sorted(self.known)})")
            self.known[hw] = int(self.fn(hw))
        return self.known[hw]

    @property
    def arranges(self) -> bool:
        """Whether the model arranges each image's views (``vlm.arrangements``): its count then depends on the
        image's original size (``image``)."""
        return bool(getattr(self.fn, "arranges", False))

    @property
    def lays_out_multi_image(self) -> bool:
        """Whether the model's arrangement lays out the images of a multi-image sample otherwise (OneVision)."""
        return bool(getattr(self.fn, "lays_out_multi_image", False))

    def image(self, height: int, width: int, alone: bool = True) -> int:
        """Tokens of one whole image of original ``height x width`` pixels (a model with an arrangement; ``alone``:
        the only image of its sample)."""
        if self.lays_out_multi_image:
            return int(self.fn.image(height, width, alone=alone))
        return int(self.fn.image(height, width))

    def views(self, height: int, width: int, alone: bool = True) -> int:
        """Views the model's arrangement expects for an image of original ``height x width`` pixels."""
        if self.lays_out_multi_image:
            return int(self.fn.views(height, width, alone=alone))
        return int(self.fn.views(height, width))

    def video(self, num_frames: int) -> int:
        """Tokens of a video of ``num_frames`` fixed-size frames (a model whose arrangement takes videos)."""
        return int(self.fn.video(num_frames))

    def layout(self) -> dict:
        """The image layout (``tiling``) the model's arrangement expects."""
        return self.fn.layout()

    def __getstate__(self) -> dict:
        portable = getattr(self.fn, "pickles_without_model", False)
        return {"constant": self.constant, "fn": self.fn if portable else None,
                "known": self.known}
