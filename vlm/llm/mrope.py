"""``mrope``: Qwen2-VL's multimodal rotary positions, ``(3, B, L)`` (temporal, height, width).

Text tokens get the same index on all three axes, counting on from the previous token. An image / video of LLM-token
grid ``(t, h, w)`` starting where the next text index would be, ``s``, fills its ``t * h * w`` placeholder tokens
(row-major over ``(t, h, w)``) with ``(s + floor(k * step), s + i, s + j)`` for frame ``k``, row ``i``, column ``j``
(``step``: ``MediaTokens.time_steps``, 1 for images); the text after it continues at ``s + max(h, w)``: the same
numbering as transformers' ``Qwen2VLModel.get_rope_index`` / ``Qwen2_5_VLModel.get_rope_index`` (which also continues
at ``s + max(h, w)`` after a video, whatever its ``t``).

Per sequence: numbering starts at 0 after left padding (``attention_mask``; padding gets 0) and at each packed sample
(``segment_ids``; ``position_ids`` then also carries the 1-D positions as a first row, ``(4, B, L)``). Each image is counted by its grid's size (two images whose placeholders touch stay two).

Generation: the rope delta of a row is ``max position + 1 - tokens``; a new token ``n`` (counting the prompt's
non-padding tokens) sits at ``n + delta`` on all three axes, which is the prompt's last position + 1 per new token
when the prompt ends with text. ``generation_inputs`` gives ``generate`` the prompt's ``(3, B, L)`` positions;
transformers' ``generate`` extends them by one per new token on every axis (what it does for Qwen2-VL itself).
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch

from vlm.llm.masks import positions_from_segments, segment_starts
from vlm.llm.positions import POSITION_SCHEMES, MediaTokens, PositionScheme


def grid_positions(start: int, grid: tuple[int, int, int], step: float = 1.0,
                   device: torch.device | None = None) -> torch.Tensor:
    """``(3, t*h*w)`` positions of one image / video of LLM-token ``grid (t, h, w)`` starting at ``start``, row-major
    over ``(t, h, w)``. The temporal index of frame ``k`` is ``floor(k * step)`` (float32, as transformers)."""
    t, h, w = grid
    temporal = (torch.arange(t, device=device, dtype=torch.float32) * torch.tensor(step, dtype=torch.float32)).long()
    axes = torch.meshgrid(temporal, torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack(axes).reshape(3, -1) + start


def sequence_positions(is_media: torch.Tensor, entries: Iterator[tuple[tuple[int, int, int], float]],
                       where: str) -> tuple[torch.Tensor, int]:
    """Positions of one sequence: ``is_media (n,)`` bool -> ``((3, n) long, rope delta)``. ``entries`` yields
    ``(grid, time step)`` per image / video in order. Raises ``ValueError`` (naming ``where``) when the placeholders
    and the grids disagree."""
    n = is_media.shape[0]
    device = is_media.device
    out = torch.empty(3, n, dtype=torch.long, device=device)
    media_at = is_media.nonzero().flatten().tolist()
    cur = i = j = 0
    while j < len(media_at):
        start = media_at[j]
        out[:, i:start] = torch.arange(start - i, device=device) + cur
        cur += start - i
        try:
            grid, step = next(entries)
        except StopIteration:
            raise ValueError(f"mrope: {where} holds more image/video placeholder tokens than the grids cover "
                             f"({len(media_at) - j} left over)") from None
        size = grid[0] * grid[1] * grid[2]
        end = start + size
        if j + size > len(media_at) or media_at[j + size - 1] != end - 1:
            run = int(torch.cumprod(is_media[start:end].long(), 0).sum())
            raise ValueError(f"mrope: {where}: the image/video at position {start} has grid {grid} ({size} tokens) "
                             f"but only {run} consecutive placeholder tokens are there")
        out[:, start:end] = grid_positions(cur, grid, step, device)
        cur += max(grid[1], grid[2])
        i, j = end, j + size
    out[:, i:] = torch.arange(n - i, device=device) + cur
    delta = int(out.max()) + 1 - n if n else 0
    return out, delta


@POSITION_SCHEMES.register("mrope")
class MRope(PositionScheme):
    """3-D positions ``(3, B, L)`` from ``MediaTokens`` (see the module docstring); the caller's ``position_ids``
    are kept."""

    reads_media = True

    def rope_index(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                   segment_ids: torch.Tensor | None = None,
                   media: MediaTokens | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids (B, L)`` -> ``(positions (3, B, L) long, rope deltas (B, 1) long)``.

        ``attention_mask (B, L)``: padding (0) is skipped and gets position 0. ``segment_ids (B, L)``: positions
        restart at every packed sample (each run of equal ids, padding 0 included); a row's delta is its last
        sample's. ``media``: the placeholder tokens and their grids, consumed row-major over the batch. Raises
        ``ValueError`` naming the row when placeholders and grids disagree or a placeholder is padding."""
        if input_ids.ndim != 2:
            raise ValueError(f"mrope: input_ids must be (B, L); got shape {tuple(input_ids.shape)}")
        B, L = input_ids.shape
        device = input_ids.device
        is_media = torch.zeros(B, L, dtype=torch.bool, device=device)
        entries: Iterator[tuple[tuple[int, int, int], float]] = iter(())
        if media is not None:
            if tuple(media.mask.shape) != (B, L):
                raise ValueError(f"mrope: media.mask has shape {tuple(media.mask.shape)}; input_ids {(B, L)}")
            is_media = media.mask.to(device)
            steps = media.time_steps if media.time_steps is not None else [1.0] * len(media.grids)
            entries = iter(list(zip(media.grids, steps)))
        keep = None
        if attention_mask is not None and segment_ids is None:
            keep = attention_mask.to(device).bool()
            padded_media = (is_media & ~keep).nonzero()
            if len(padded_media):
                b, pos = padded_media[0].tolist()
                raise ValueError(f"mrope: row {b} has an image/video placeholder at position {pos}, which the "
                                 f"attention mask marks as padding")
        positions = torch.zeros(3, B, L, dtype=torch.long, device=device)
        deltas = torch.zeros(B, 1, dtype=torch.long, device=device)
        starts = segment_starts(segment_ids.to(device)) if segment_ids is not None else None
        for b in range(B):
            if starts is not None:
                bounds = starts[b].nonzero().flatten().tolist() + [L]
                for s, e in itertools.pairwise(bounds):
                    pos, deltas[b, 0] = sequence_positions(is_media[b, s:e], entries, f"row {b}, sample at {s}")
                    positions[:, b, s:e] = pos
            elif keep is not None:
                pos, deltas[b, 0] = sequence_positions(is_media[b][keep[b]], entries, f"row {b}")
                positions[:, b, keep[b]] = pos
            else:
                positions[:, b], deltas[b, 0] = sequence_positions(is_media[b], entries, f"row {b}")
        left = sum(1 for _ in entries)
        if left:
            raise ValueError(f"mrope: {left} image/video grid(s) left over after the last placeholder token of the "
                             f"batch: the grids do not match the placeholders")
        return positions, deltas

    def position_ids(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                     segment_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                     media: MediaTokens | None = None) -> torch.Tensor | None:
        """``(3, B, L)``; packed rows (``segment_ids``) get ``(4, B, L)``: row 0 the 1-D positions restarting per
        sample, then the three mRoPE rows. transformers' mRoPE text models (Qwen2-VL, Qwen2.5-VL, ...) read row 0 to
        find packed samples' boundaries where no mask says them (flash-attention) and rotate by rows 1-3.

        The caller's ``position_ids`` are kept when they are 3-D (already mRoPE's), or 1-D ``(B, L)`` in a batch
        without image / video tokens (text: the same on all three axes). 1-D positions cannot place image tokens
        on their grid: with ``media`` tokens they are replaced by this numbering (the collator's 1-D positions,
        restarting per packed sample or counting real tokens, are what it derives from ``segment_ids`` /
        ``attention_mask``)."""
        has_media = media is not None and bool(media.mask.any())
        if position_ids is not None and (position_ids.ndim == 3 or not has_media):
            return position_ids
        positions = self.rope_index(input_ids, attention_mask=attention_mask, segment_ids=segment_ids, media=media)[0]
        if segment_ids is None:
            return positions
        return torch.cat([positions_from_segments(segment_ids.to(positions.device))[None], positions])

    def generation_inputs(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                          media: MediaTokens | None = None) -> dict[str, Any]:
        """``{"position_ids": (3, B, L)}``: the prompt's positions (left padding skipped). transformers' ``generate``
        continues them by one per new token on every axis, i.e. at ``tokens so far + rope delta`` for a prompt
        that ends with text (the chat templates' generation prompt always does)."""
        return {"position_ids": self.position_ids(input_ids, attention_mask=attention_mask, media=media)}
