"""Attention masks for packed rows: causal attention only within a segment."""
from __future__ import annotations

import torch


def segment_allowed(segment_ids: torch.Tensor) -> torch.Tensor:
    """``segment_ids (B, L)`` (0 = padding, 1..k = sample) -> boolean ``(B, 1, L, L)``, True where attention is allowed.

    Position ``i`` may attend to ``j`` iff ``j <= i`` and both belong to the same non-padding segment. Padding
    queries attend to themselves only (so no row is fully masked and no NaN appears); their outputs are unused.
    """
    if segment_ids.ndim != 2:
        raise ValueError(f"segment_ids must be (B, L); got shape {tuple(segment_ids.shape)}")
    L = segment_ids.shape[1]
    eye = torch.eye(L, dtype=torch.bool, device=segment_ids.device)
    causal = torch.ones(L, L, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    valid = (segment_ids[:, None, :] > 0) | eye
    return (same & causal & valid)[:, None]


def segment_mask(segment_ids: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor | None:
    """The 4D mask a transformers model takes as-is for packed rows.

    SDPA takes the boolean form; eager attention adds the mask to its scores, so it gets 0 / ``finfo(dtype).min``.
    Flash-attention-2 needs no mask: transformers detects packed rows from the restarting ``position_ids``.
    """
    if attn_implementation.startswith("flash"):
        return None
    allowed = segment_allowed(segment_ids)
    if attn_implementation == "sdpa":
        return allowed
    out = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    return out.masked_fill_(~allowed, torch.finfo(dtype).min)


def segment_starts(segment_ids: torch.Tensor) -> torch.Tensor:
    """``(B, L)`` -> boolean ``(B, L)``, True at the first token of every segment."""
    start = torch.ones_like(segment_ids, dtype=torch.bool)
    start[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return start


def positions_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """``(B, L)`` segment ids -> position ids restarting at 0 at each segment start (vectorized)."""
    B, L = segment_ids.shape
    idx = torch.arange(L, device=segment_ids.device).expand(B, L)
    first = torch.where(segment_starts(segment_ids), idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first
