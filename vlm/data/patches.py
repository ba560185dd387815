"""Native-resolution pixels as flat patches (Qwen2-VL's layout).

An image or video at its own size becomes ``patches (t*h*w, 3 * temporal_patch_size * patch_size**2)`` plus its grid
``(t, h, w)`` in *patch* units: ``h = H / patch_size``, ``w = W / patch_size``, ``t = ceil(T / temporal_patch_size)``
(an image is ``temporal_patch_size`` identical frames, ``t = 1``; a video with a frame count that is not a multiple
repeats its last frame). Within one item the patches come in transformers' order: every ``merge x merge`` block of
neighbouring patches is contiguous, i.e. rows are ordered ``(t, h/m, w/m, m, m)``; each row holds
``(channel, frame, y, x)`` of one patch. Many items are concatenated row-wise (``pixel_values``) with ``grid_thw
(N, 3)`` (what ``Qwen2VLImageProcessor`` / ``Qwen2VLVideoProcessor`` return).

``smart_resize`` is the size an image or frame is resized to before patching: both sides multiples of ``factor =
patch_size * merge_size``, area inside ``[min_pixels, max_pixels]``, aspect ratio kept as closely as possible.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

#: Qwen2-VL's image-processor defaults (pixels): 4 merged tokens at least, 1280 at most
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 1280
#: the largest aspect ratio ``smart_resize`` accepts (transformers refuses more)
MAX_ASPECT_RATIO = 200


def smart_resize(height: int, width: int, *, factor: int = 28, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """``(height, width)`` in pixels an image of ``height x width`` is resized to (transformers' ``smart_resize``).

    Each side is rounded to the nearest multiple of ``factor``; when the area is then over ``max_pixels`` both sides
    are scaled down by one factor and floored to multiples (at least ``factor``), when under ``min_pixels`` scaled
    up and ceiled. Raises ``ValueError`` naming the size and the rule for a non-positive side or an aspect ratio
    over 200 (``MAX_ASPECT_RATIO``), which the reference refuses too.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image of {width}x{height} pixels (width x height): both sides must be positive")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"image of {width}x{height} pixels (width x height) has an aspect ratio of "
                         f"{max(height, width) / min(height, width):.1f}; native resolution needs at most "
                         f"{MAX_ASPECT_RATIO} (Qwen2-VL's smart_resize rule); crop or pad it first")
    if factor < 1 or min_pixels > max_pixels:
        raise ValueError(f"smart_resize needs factor >= 1 and min_pixels <= max_pixels; got factor={factor}, "
                         f"min_pixels={min_pixels}, max_pixels={max_pixels}")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def resize_uint8(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize ``uint8`` frames ``(N, 3, H, W)`` (or one ``(3, H, W)``) to ``size = (height, width)`` with torchvision's
    antialiased bicubic, rounded back to ``uint8``: what transformers' torchvision backends do
    (``Qwen2VLImageProcessor``, ``Qwen2VLVideoProcessor``); PIL's bicubic (``Qwen2VLImageProcessorPil``, vlm's other
    layouts) differs by a few grey levels."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as tvF

    if frames.dtype != torch.uint8:
        raise ValueError(f"resize_uint8 takes uint8 frames; got {frames.dtype}")
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    return tvF.resize(frames, list(size), interpolation=InterpolationMode.BICUBIC, antialias=True)


def _check(frames: torch.Tensor, patch_size: int, merge_size: int) -> tuple[int, int]:
    _, c, height, width = frames.shape
    factor = patch_size * merge_size
    if c != 3 or height % factor or width % factor:
        raise ValueError(f"pixels of shape {tuple(frames.shape)}: native-resolution patches need 3 channels and "
                         f"height/width multiples of patch_size * merge_size = {patch_size} * {merge_size} = {factor} "
                         f"(resize with smart_resize first)")
    return height // patch_size, width // patch_size


def to_patches(pixels: torch.Tensor, patch_size: int = 14, temporal_patch_size: int = 2,
               merge_size: int = 2) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """One image ``(3, H, W)`` or video ``(T, 3, H, W)`` -> ``(patches (t*h*w, 3*tp*p*p), (t, h, w))``.

    ``H`` and ``W`` must be multiples of ``patch_size * merge_size`` (``ValueError`` otherwise). An image is repeated
    ``temporal_patch_size`` times; a video whose ``T`` is not a multiple of it repeats its last frame. Rows in
    transformers' order (``merge x merge`` blocks contiguous), each row ``(channel, frame, y, x)`` flattened. The
    result is a new contiguous tensor of ``pixels``' dtype.
    """
    if pixels.dim() == 3:
        frames = pixels.unsqueeze(0).expand(temporal_patch_size, -1, -1, -1)
    elif pixels.dim() == 4:
        frames = pixels
        if frames.shape[0] == 0:
            raise ValueError("a video with no frames cannot become patches")
        if pad := -frames.shape[0] % temporal_patch_size:
            frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
    else:
        raise ValueError(f"expected pixels (3, H, W) or frames (T, 3, H, W); got shape {tuple(pixels.shape)}")
    h, w = _check(frames, patch_size, merge_size)
    t, m, p, c = frames.shape[0] // temporal_patch_size, merge_size, patch_size, frames.shape[1]
    x = frames.reshape(t, temporal_patch_size, c, h // m, m, p, w // m, m, p)
    # (t, h/m, w/m, m_y, m_x, c, tp, p_y, p_x)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(t * h * w, c * temporal_patch_size * p * p).contiguous(), (t, h, w)


def from_patches(patches: torch.Tensor, grid_thw: Sequence[int], patch_size: int = 14, temporal_patch_size: int = 2,
                 merge_size: int = 2) -> torch.Tensor:
    """The inverse of ``to_patches`` for one item: ``(t*h*w, 3*tp*p*p)`` -> frames ``(t*tp, 3, h*p, w*p)`` (an image
    comes back as its ``tp`` identical frames). ``ValueError`` when the shapes disagree with ``grid_thw``."""
    t, h, w = (int(v) for v in grid_thw)
    m, p, tp = merge_size, patch_size, temporal_patch_size
    if patches.dim() != 2 or patches.shape[0] != t * h * w or patches.shape[1] % (tp * p * p) or h % m or w % m:
        raise ValueError(f"patches of shape {tuple(patches.shape)} do not match grid_thw {(t, h, w)} with "
                         f"patch_size={p}, temporal_patch_size={tp}, merge_size={m} (expected ({t * h * w}, "
                         f"3*{tp}*{p}*{p}) and h, w multiples of {m})")
    c = patches.shape[1] // (tp * p * p)
    x = patches.reshape(t, h // m, w // m, m, m, c, tp, p, p).permute(0, 6, 5, 1, 3, 7, 2, 4, 8)
    return x.reshape(t * tp, c, h * p, w * p).contiguous()


def concat_patches(items: Sequence[torch.Tensor], patch_size: int = 14, temporal_patch_size: int = 2,
                   merge_size: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Many images ``(3, H, W)`` / videos ``(T, 3, H, W)`` of any sizes -> ``(pixel_values (P, 3*tp*p*p),
    grid_thw (N, 3) long)``, items in order (``P = sum t*h*w``): what ``Qwen2VLImageProcessor`` returns as
    ``pixel_values`` / ``image_grid_thw`` (videos: ``pixel_values_videos`` / ``video_grid_thw``)."""
    if not items:
        raise ValueError("concat_patches needs at least one image or video")
    out = [to_patches(x, patch_size, temporal_patch_size, merge_size) for x in items]
    return torch.cat([p for p, _ in out]), torch.tensor([g for _, g in out], dtype=torch.long)


def check_patches(pixel_values: torch.Tensor, grid_thw: torch.Tensor | Sequence[Sequence[int]], *,
                  patch_size: int = 14, temporal_patch_size: int = 2, merge_size: int = 2, channels: int = 3,
                  names: tuple[str, str] = ("pixel_values", "image_grid_thw")) -> list[tuple[int, int, int]]:
    """Check flat patches against their grids before any model sees them; returns the grids as ``(t, h, w)`` tuples.

    ``ValueError`` naming the keys (``names``, e.g. ``("pixel_values_videos", "video_grid_thw")``) and what disagrees:
    ``grid_thw`` not ``(N, 3)`` or with a non-positive entry, ``h`` or ``w`` not a multiple of ``merge_size``,
    ``pixel_values`` not 2-D with ``channels * temporal_patch_size * patch_size**2`` columns, or ``sum(t*h*w)`` not
    its row count."""
    pv, gk = names
    grid = torch.as_tensor(grid_thw)
    if grid.dim() != 2 or grid.shape[1] != 3:
        raise ValueError(f"{gk} must be (num_items, 3) rows of (t, h, w); got shape {tuple(grid.shape)}")
    grids = [tuple(int(v) for v in row) for row in grid.tolist()]
    for i, (t, h, w) in enumerate(grids):
        if min(t, h, w) < 1 or h % merge_size or w % merge_size:
            raise ValueError(f"{gk}[{i}] = {(t, h, w)}: t, h, w must be positive and h, w multiples of "
                             f"merge_size={merge_size}")
    dim = channels * temporal_patch_size * patch_size * patch_size
    if pixel_values.dim() != 2 or pixel_values.shape[1] != dim:
        raise ValueError(f"{pv} must be (patches, {channels} * {temporal_patch_size} * {patch_size}**2 = {dim}); "
                         f"got shape {tuple(pixel_values.shape)}")
    total = sum(t * h * w for t, h, w in grids)
    if total != pixel_values.shape[0]:
        raise ValueError(f"{gk} {grids} asks for sum(t*h*w) = {total} patches but {pv} has "
                         f"{pixel_values.shape[0]} rows")
    return grids
