"""Idefics3 / SmolVLM image splitting (``tiling: {kind: idefics3, longest_edge, split}``), the geometry of
transformers' ``Idefics3ImageProcessorPil`` / ``SmolVLMImageProcessorPil`` (``do_resize``, ``do_image_splitting``),
with ``S`` the encoder's image size (their ``max_image_size["longest_edge"]``):

1. the longest edge is resized to ``longest_edge`` pixels (default ``4 * S``; up or down), the other side
   ``int(longest_edge / aspect)`` rounded up to an even number (and both capped at 4096 px, transformers'
   ``MAX_IMAGE_SIZE``);
2. ``split`` (default, ``do_image_splitting``): that image is resized again so that its longest edge is the next
   multiple of ``S`` and its other side ``int(long / aspect)`` rounded up to a multiple of ``S``; when either side
   is over ``S`` it is cut into ``rows x cols`` crops of ``S x S``, row-major, followed by the global image (that
   image resized to ``S x S``); otherwise (an image no larger than one crop) it is one ``S x S`` view. Without
   ``split`` the image of step 1 is resized to ``S x S`` (one view);
3. every resize is PIL Lanczos on uint8 (the processors' ``resample``).

So an image becomes ``rows * cols + 1`` views (or 1), each ``S x S``; its text (``image_text``) is, per crop,
``<fake_token_around_image><row_{r}_col_{c}>`` + its tokens, ``\\n`` after each row of crops, then
``\\n<fake_token_around_image><global-img>`` + the global image's tokens + ``<fake_token_around_image>``; an image of
one view is ``<fake_token_around_image><global-img>`` + its tokens + ``<fake_token_around_image>`` (the processors'
``_prompt_split_image`` / ``_prompt_single_image``). Token counts by size are in docs/data.md. Boxes are written in
the global view's frame.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from PIL import Image

from vlm.data.geometry import Affine
from vlm.data.layouts.base import Layout, Views
from vlm.data.layouts.registry import LAYOUTS

LANCZOS = Image.Resampling.LANCZOS
#: transformers' ``MAX_IMAGE_SIZE``: no side of the step-1 image exceeds it
MAX_IMAGE_SIZE = 4096
#: the strings transformers' Idefics3 / SmolVLM processors write around an image's tokens
FAKE_TOKEN = "<fake_token_around_image>"
GLOBAL_TOKEN = "<global-img>"


def crop_token(row: int, col: int) -> str:
    """``<row_{row}_col_{col}>`` (1-based), the text before crop ``(row, col)``'s tokens."""
    return f"<row_{row}_col_{col}>"


def resized_longest_edge(width: int, height: int, longest_edge: int) -> tuple[int, int]:
    """``(width, height)`` after step 1 (transformers' ``_resize_output_size_rescale_to_max_len`` then
    ``_resize_output_size_scale_below_upper_bound``, their float arithmetic included)."""
    aspect = width / height
    if width >= height:
        w, h = longest_edge, int(longest_edge / aspect)
        h += h % 2
    else:
        h, w = longest_edge, int(longest_edge * aspect)
        w += w % 2
    h, w = max(h, 1), max(w, 1)
    aspect = w / h
    if w >= h and w > MAX_IMAGE_SIZE:
        w, h = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / aspect)
    elif h > w and h > MAX_IMAGE_SIZE:
        h, w = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * aspect)
    return max(w, 1), max(h, 1)


def crop_multiple(width: int, height: int, crop: int) -> tuple[int, int]:
    """``(width, height)`` after step 2 (transformers' ``resize_for_vision_encoder``): both sides multiples of
    ``crop``. A side can come out 0 for an image thinner than ``1 : crop`` (``ValueError`` in ``Idefics3Split``)."""
    aspect = width / height
    if width >= height:
        w = math.ceil(width / crop) * crop
        h = math.ceil(int(w / aspect) / crop) * crop
    else:
        h = math.ceil(height / crop) * crop
        w = math.ceil(int(h * aspect) / crop) * crop
    return w, h


@LAYOUTS.register("idefics3")
class Idefics3Split(Layout):
    """Fixed ``S x S`` crops of the image resized to multiples of ``S`` + the global image (see the module)."""

    mode = "idefics3"

    @classmethod
    def check(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        cls.check_keys(options, {"longest_edge", "split"})
        edge = options.get("longest_edge")
        if edge is not None and int(edge) < 1:
            raise ValueError(f"idefics3 tiling: longest_edge={edge!r}; expected a positive number of pixels (or null: "
                             f"4 x the encoder's image size)")
        return {"kind": "idefics3", "longest_edge": None if edge is None else int(edge),
                "split": bool(options.get("split", True))}

    @classmethod
    def special_tokens(cls, options: Mapping[str, Any]) -> list[str]:
        """``<fake_token_around_image>``, ``<global-img>`` and ``<row_r_col_c>`` for ``r, c`` in 1..6 (the table
        transformers' Idefics3 / SmolVLM processors and tokenizers hold)."""
        return [FAKE_TOKEN, GLOBAL_TOKEN, *(crop_token(r, c) for r in range(1, 7) for c in range(1, 7))]

    @property
    def longest_edge(self) -> int:
        """Step 1's target, in pixels (``4 * S`` unless configured)."""
        return self.options["longest_edge"] or 4 * self.image_size

    def sizes(self, width: int, height: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """``((w1, h1), (w2, h2), (cols, rows))``: the image after step 1, after step 2 and its crop grid (``(0, 0)``:
        one view). ``ValueError`` naming the size for an image so thin that a side would be 0 pixels."""
        if width < 1 or height < 1:
            raise ValueError(f"idefics3 tiling: image size {width}x{height} (width x height); expected positive sizes")
        s = self.image_size
        first = resized_longest_edge(width, height, self.longest_edge)
        if not self.options["split"]:
            return first, (s, s), (0, 0)
        second = crop_multiple(*first, s)
        if min(second) < 1:
            raise ValueError(f"idefics3 tiling: an image of {width}x{height} pixels (width x height) is too thin: "
                             f"resized to {first[0]}x{first[1]}, its short side rounds to 0 crops of {s} px "
                             f"(transformers' processor fails on it too); expected an aspect ratio under "
                             f"{self.longest_edge // 2}:1")
        if second[0] > s or second[1] > s:
            return first, second, (second[0] // s, second[1] // s)
        return first, second, (0, 0)

    def num_views(self, width: int, height: int, *, max_tiles: int | None = None) -> int:
        cols, rows = self.sizes(width, height)[2]
        return cols * rows + 1

    def layout(self, img: Image.Image, *, max_tiles: int | None = None) -> Views:
        (w, h), s = img.size, self.image_size
        first, second, (cols, rows) = self.sizes(w, h)
        img = img.resize(first, LANCZOS)
        if not self.options["split"] or cols == 0:
            view = img.resize((s, s), LANCZOS)  # split: step 2 gave S x S; no split: squashed to S x S
            squash = Affine(s / w, s / h)
            return Views([view], [squash], ["image"], squash, grid=(1, 1), extra={"split": False})
        img = img.resize(second, LANCZOS)
        sx, sy = second[0] / w, second[1] / h
        crops = [img.crop((c * s, r * s, (c + 1) * s, (r + 1) * s)) for r in range(rows) for c in range(cols)]
        transforms = [Affine(sx, sy, -c * s, -r * s) for r in range(rows) for c in range(cols)]
        squash = Affine(s / w, s / h)
        return Views([*crops, img.resize((s, s), LANCZOS)], [*transforms, squash],
                     ["tile"] * len(crops) + ["thumbnail"], squash, grid=(cols, rows),
                     extra={"split": True, "resized": second})

    def image_text(self, info: Any, image_token: str, view_tokens: list[int]) -> str:
        """The text of one image: its crops' ``<fake_token_around_image><row_r_col_c>`` + tokens, ``\\n`` after
        each row, then ``\\n<fake_token_around_image><global-img>`` + the global view's tokens +
        ``<fake_token_around_image>`` (one view: only the global part, without the ``\\n``)."""
        cols, rows = info.grid
        if len(view_tokens) == 1:
            return FAKE_TOKEN + GLOBAL_TOKEN + image_token * view_tokens[0] + FAKE_TOKEN
        if len(view_tokens) != rows * cols + 1:
            raise ValueError(f"idefics3 tiling: {len(view_tokens)} views for a {rows}x{cols} grid of crops (rows x "
                             f"cols); expected {rows * cols + 1}")
        out = ""
        for r in range(rows):
            for c in range(cols):
                out += FAKE_TOKEN + crop_token(r + 1, c + 1) + image_token * view_tokens[r * cols + c]
            out += "\n"
        return out + "\n" + FAKE_TOKEN + GLOBAL_TOKEN + image_token * view_tokens[-1] + FAKE_TOKEN
