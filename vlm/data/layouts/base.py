"""The image-layout contract: how one image becomes the views the vision encoder sees.

A layout takes one RGB image and returns its views (PIL images, in tensor order), the ``Affine`` from original pixels
into each view, each view's role (``image``, ``tile``, ``thumbnail``, ``base``) and the frame boxes are written in.
It states the size ``(H, W)`` of every view *before* decoding any pixels (``view_sizes``); the token grid of a view is
then asked of the model (``model.num_image_tokens((H, W))`` = the encoder's ``grid`` through the connector), never
fixed by the layout. Today's layouts give square ``S x S`` views; a layout whose views have their own sizes
(native resolution, Idefics3 splitting) states them the same way.

To add one: a ``Layout`` subclass in ``vlm/data/layouts/<name>.py`` registered with ``@LAYOUTS.register("<name>")``
and imported in ``vlm/data/layouts/__init__.py``; ``check`` fills defaults and refuses bad options at compose time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from PIL import Image

from vlm.data.geometry import Affine


@dataclass
class Views:
    """One image laid out. ``images[k]`` / ``transforms[k]`` / ``kinds[k]``: view ``k`` in tensor order, the map from
    original pixels into it, its role. ``frame``: the map into the view boxes are written in (the single view, or the
    global view of a tiled image). ``grid``: ``(cols, rows)`` of tiles; ``best_resolution``: anyres ``(height,
    width)``; ``extra``: layout-specific geometry recorded in ``ImageInfo.extra``; ``frame_size``: ``(width, height)``
    of the box frame in pixels when it is not ``S x S`` (native resolution), else ``None``."""

    images: list[Image.Image]
    transforms: list[Affine]
    kinds: list[str]
    frame: Affine
    grid: tuple[int, int] = (1, 1)
    best_resolution: tuple[int, int] | None = None
    extra: dict = field(default_factory=dict)
    frame_size: tuple[int, int] | None = None


class Layout:
    """A tiling layout over ``S x S`` views (``image_size = S`` pixels). Subclasses set ``mode`` (``ImageInfo.mode``)
    and implement ``check``, ``num_views`` and ``layout``."""

    mode: str = ""

    @property
    def patch_options(self) -> dict[str, int] | None:
        """How the encoder takes this layout's views: ``None``: as pixel tensors ``(n, 3, H, W)`` (every tiling
        layout); a dict (``patch_size``, ``temporal_patch_size``, ``merge_size``): as flat patches with a grid per
        view (``vlm.data.patches.concat_patches``: ``pixel_values (P, D)`` + ``image_grid_thw (N, 3)``), which lets
        the views of one batch have different sizes (native resolution)."""
        return None

    def __init__(self, image_size: int, options: Mapping[str, Any]) -> None:
        """``options``: the checked options (``check``'s result, ``kind`` included)."""
        self.image_size = int(image_size)
        self.options = dict(options)

    @classmethod
    def check(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """``options`` (``kind`` included) with defaults filled in. Raises ``TypeError`` for an unknown key and
        ``ValueError`` for a bad value, each naming it."""
        raise NotImplementedError

    @classmethod
    def check_keys(cls, options: Mapping[str, Any], accepted: set[str]) -> None:
        """``TypeError`` naming the keys of ``options`` outside ``accepted`` (``kind`` is always accepted)."""
        bad = set(options) - accepted - {"kind"}
        if bad:
            raise TypeError(f"unknown tiling key(s) {sorted(bad)} for kind={options.get('kind')!r}; "
                            f"accepted: {sorted(accepted | {'kind'})}")

    def num_views(self, width: int, height: int, *, max_tiles: int | None = None) -> int:
        """How many views an image of ``width x height`` pixels becomes (no pixels decoded). ``max_tiles``: the
        sample's tile budget, which only ever lowers the configured one."""
        raise NotImplementedError

    def view_sizes(self, width: int, height: int, *, max_tiles: int | None = None) -> list[tuple[int, int]]:
        """``(H, W)`` pixels of each view of an image of ``width x height``, in tensor order (no pixels decoded)."""
        s = self.image_size
        return [(s, s)] * self.num_views(width, height, max_tiles=max_tiles)

    def layout(self, img: Image.Image, *, max_tiles: int | None = None) -> Views:
        """Lay out one RGB image."""
        raise NotImplementedError

    @classmethod
    def special_tokens(cls, options: Mapping[str, Any]) -> list[str]:
        """Strings ``image_text`` writes that a run adds to its tokenizer as single tokens (``check``ed
        ``options``). Default: none."""
        return []

    def image_text(self, info: Any, image_token: str, view_tokens: list[int]) -> str:
        """The text one laid-out image (``info``: its ``ImageInfo``) is written as, between the template's image
        markers: ``view_tokens[k]`` placeholders for view ``k``. Default: every view's placeholders one after
        another; a layout whose family writes text between its views (Idefics3's ``<row_1_col_1>``) overrides it.
        The processor counts only ``image_token``, so the placeholders must stay ``sum(view_tokens)``."""
        return image_token * sum(view_tokens)
