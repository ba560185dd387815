"""Collation: processed samples -> a batch dict (``docs/architecture.md``: tensor keys + ``meta``).

- :class:`PadCollator`: one sample per row, padded right (training) or left (generation).
- :class:`PackCollator`: greedy first-fit packing of several samples per row up to ``max_length`` tokens;
  ``position_ids`` restart at 0 per sample, ``segment_ids`` number the samples 1..k within a row (0 = padding), the
  first label of each sample is -100 (never predict across a boundary). The model attends within segments only.
- :class:`PackedDataset`: the same packing as an iterable dataset wrapper (fixed rows per batch; use
  ``PadCollator`` on its output).

Every batch's ``meta`` holds ``ids`` (per row: the sample ids in it), ``padding`` = ``{"tokens": real,
"padded": total, "waste": 1 - real/total}`` and ``skipped`` (bad samples a dataset skipped to build this batch).
``pixel_values`` concatenates every item's tiles in row-major token order (with ``image_grid_thw`` for native-resolution
images: ``MEDIA_KEYS``); it is omitted when no item has images. Videos: ``pixel_values_videos``, ``video_grid_thw`` and
``second_per_grid_ts`` concatenated the same way (present when any item has a video).
"""
from __future__ import annotations

import bisect

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import IterableDataset, get_worker_info

from vlm.labels import IGNORE_INDEX

#: Padding value of each per-token key (``input_ids`` is padded with the collator's ``pad_token_id``).
PAD_VALUES = {"labels": IGNORE_INDEX, "attention_mask": 0, "position_ids": 0, "segment_ids": 0}


def padding_stats(attention_mask: torch.Tensor) -> dict[str, float]:
    """``{"tokens": real, "padded": total, "waste": 1 - real/total}`` of a ``(B, L)`` mask."""
    real, total = int(attention_mask.sum()), int(attention_mask.numel())
    return {"tokens": real, "padded": total, "waste": 1.0 - real / total if total else 0.0}


def _meta(items: Sequence[dict], rows: list[list[Any]] | None = None) -> dict[str, Any]:
    metas = [it.get("meta") or {} for it in items]
    return {"ids": rows if rows is not None else [m.get("ids", m.get("id")) for m in metas],
            "samples": [s for m in metas for s in m.get("samples", [m])],
            "skipped": [s for m in metas for s in m.get("skipped", [])]}


#: Per-image keys concatenated along dim 0 in item order (image ``k``'s rows follow image ``k - 1``'s): the pixels
#: (``(N, 3, H, W)`` tiles, or ``(P, 3 * t * p * p)`` flat patches of native-resolution images) and, for the latter,
#: each image's patch grid ``image_grid_thw (N, 3)`` (Qwen2-VL's convention, ``vlm.data.patches``); videos' flat
#: patches ``pixel_values_videos (P, D)``, their grids ``video_grid_thw (M, 3)`` and ``second_per_grid_ts (M,)``;
#: each image's original ``(height, width)`` ``image_sizes (N, 2)`` for a model that arranges its views by it
#: (``vlm.arrangements``), and, for an arrangement that lays out multi-image samples otherwise (OneVision), each
#: sample's image count ``batch_num_images (B,)`` (samples without images left out)
MEDIA_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts",
              "image_sizes", "batch_num_images")
#: the per-video keys: every item with videos has all three
VIDEO_KEYS = MEDIA_KEYS[2:5]


def _pixels(items: Sequence[dict]) -> torch.Tensor | None:
    pv = [it["pixel_values"] for it in items if it.get("pixel_values") is not None]
    if not pv:
        return None
    shapes = {tuple(p.shape[1:]) for p in pv}
    if len(shapes) > 1:
        raise ValueError(f"cannot batch images of different shapes {sorted(shapes)}: all tiles must share (3, H, W)")
    return torch.cat(pv)


def _media(items: Sequence[dict]) -> dict[str, torch.Tensor]:
    """The batch's ``MEDIA_KEYS`` (those any item has), each concatenated in item order. Raises ``ValueError`` when
    items with flat patches (``image_grid_thw``) meet items with tiles (``(n, 3, H, W)`` pixels): one batch holds one
    kind of pixels."""
    out: dict[str, torch.Tensor] = {}
    frames = {tuple(it["pixel_values_videos"].shape[1:]) for it in items
              if it.get("pixel_values_videos") is not None and it["pixel_values_videos"].ndim == 5}
    if len(frames) > 1:
        raise ValueError(f"cannot batch fixed-size videos of different shapes (frames, 3, H, W) {sorted(frames)}: "
                         f"pixel_values_videos stacks them (videos, frames, 3, H, W); sample every video to one "
                         f"frame count (video option num_frames)")
    for key in (*VIDEO_KEYS, "image_sizes", "batch_num_images"):
        parts = [it[key] for it in items if it.get(key) is not None]
        if parts:
            out[key] = torch.cat(parts)
    pv = _pixels(items)
    if pv is None:
        return out
    out["pixel_values"] = pv
    with_grid = [it.get("image_grid_thw") is not None for it in items if it.get("pixel_values") is not None]
    if any(with_grid) and not all(with_grid):
        raise ValueError("cannot batch native-resolution images (flat patches with image_grid_thw) with fixed-size "
                         "tiles (pixel_values (n, 3, H, W)): every item of a batch must come from the same layout")
    if any(with_grid):
        out["image_grid_thw"] = torch.cat([it["image_grid_thw"] for it in items if it.get("image_grid_thw") is not None])
    return out


class PadCollator:
    """Pad a list of items (processor outputs, or packed rows from :class:`PackedDataset`) into a batch.

    Args:
        pad_token_id: id used for padding ``input_ids``.
        padding_side: ``"right"`` (training) or ``"left"`` (generation).
        pad_to_multiple_of: round the padded length up to a multiple (tensor-core friendly shapes).
        return_position_ids: add ``position_ids`` (0.. over real tokens, 0 on padding) to unpacked batches.

    Returns ``input_ids`` (B, L) long, ``attention_mask`` (B, L) long, ``labels`` (B, L) long (-100 on padding),
    ``pixel_values`` (N, 3, H, W) if any (native-resolution images: flat patches ``(P, D)`` and ``image_grid_thw``
    ``(N, 3)``), ``position_ids``/``segment_ids`` (B, L) when the items carry them, ``meta``.
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right", pad_to_multiple_of: int | None = None,
                 return_position_ids: bool = False) -> None:
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left'; got {padding_side!r}")
        if pad_token_id is None:
            raise ValueError("pad_token_id is None: set tokenizer.pad_token (or pass an id)")
        self.pad_token_id, self.padding_side = int(pad_token_id), padding_side
        self.pad_to_multiple_of, self.return_position_ids = pad_to_multiple_of, return_position_ids

    def _pad(self, seqs: list[torch.Tensor], value: int) -> torch.Tensor:
        out = pad_sequence(seqs, batch_first=True, padding_value=value, padding_side=self.padding_side)
        m = self.pad_to_multiple_of
        if m and out.shape[1] % m:
            extra = m - out.shape[1] % m
            fill = out.new_full((out.shape[0], extra), value)
            out = torch.cat([out, fill] if self.padding_side == "right" else [fill, out], dim=1)
        return out

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        items = [it for it in items if it is not None]
        if not items:
            raise ValueError("empty batch")
        batch: dict[str, Any] = {"input_ids": self._pad([it["input_ids"] for it in items], self.pad_token_id)}
        batch["attention_mask"] = self._pad([torch.ones_like(it["input_ids"]) for it in items], 0)
        batch["labels"] = self._pad([it["labels"] for it in items], IGNORE_INDEX)
        for key in ("position_ids", "segment_ids"):
            if all(key in it for it in items):
                batch[key] = self._pad([it[key] for it in items], PAD_VALUES[key])
        if self.return_position_ids and "position_ids" not in batch:
            batch["position_ids"] = (batch["attention_mask"].cumsum(1) - 1).clamp_min(0) * batch["attention_mask"]
        batch.update(_media(items))
        batch["meta"] = _meta(items)
        batch["meta"]["padding"] = padding_stats(batch["attention_mask"])
        return batch


# ----------------------------------------------------------------------------------------------------- packing
def greedy_pack(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: item indices per row, each row's total length <= ``max_length``.

    Items are placed longest first, each into the open row with the least room that still fits it (a new row when
    none does); a row lists its items in data order, and rows come longest first, so that consecutive rows batched
    together need little padding. Best-fit decreasing needs asymptotically at most 11/9 of the optimal number of rows
    (Johnson, 1973); first-fit in data order wasted about twice as much on LLaVA-like lengths (``vlm.bench packing``,
    docs/performance.md).
    Raises ``ValueError`` naming an item longer than ``max_length``.
    """
    for i, n in enumerate(lengths):
        if n > max_length:
            raise ValueError(f"item {i} has {n} tokens, more than the packing budget max_length={max_length}; set the "
                             f"processor's max_length <= the packing budget")
    rows: list[list[int]] = []
    room: list[int] = []
    by_room: list[tuple[int, int]] = []  # (free tokens, row), sorted: the best fit is the first entry >= n
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        n = lengths[i]
        at = bisect.bisect_left(by_room, (n, -1))
        if at == len(by_room):
            rows.append([i])
            room.append(max_length - n)
            bisect.insort(by_room, (room[-1], len(rows) - 1))
        else:
            _, r = by_room.pop(at)
            rows[r].append(i)
            room[r] -= n
            bisect.insort(by_room, (room[r], r))
    rows = [sorted(r) for r in rows]
    return sorted(rows, key=lambda r: (-sum(lengths[i] for i in r), r[0]))


def concat_items(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate items into one packed row: ``input_ids``/``labels``/``position_ids``/``segment_ids`` (L,),
    ``pixel_values`` in order, ``meta`` with ``ids``. Items that are already packed keep their segments
    (renumbered); the first label of every segment becomes -100."""
    ids, labels, pos, seg = [], [], [], []
    offset = 0
    for it in items:
        x = it["input_ids"]
        s = it.get("segment_ids")
        s = torch.ones_like(x) if s is None else s
        p = it.get("position_ids")
        p = torch.arange(x.numel()) if p is None else p
        lab = it["labels"].clone()
        starts = torch.ones_like(s, dtype=torch.bool)
        starts[1:] = s[1:] != s[:-1]
        lab[starts] = IGNORE_INDEX
        ids.append(x)
        labels.append(lab)
        pos.append(p)
        seg.append(torch.where(s > 0, s + offset, 0))
        offset += int(s.max()) if s.numel() else 0
    row_ids = []
    for it in items:
        m = it.get("meta") or {}
        row_ids += m["ids"] if "ids" in m and isinstance(m["ids"], list) else [m.get("id")]
    meta = {"ids": row_ids, "skipped": [s for it in items for s in (it.get("meta") or {}).get("skipped", [])],
            "samples": [it.get("meta") or {} for it in items]}
    return {"input_ids": torch.cat(ids), "labels": torch.cat(labels), "position_ids": torch.cat(pos),
            "segment_ids": torch.cat(seg), "pixel_values": None, **_media(items), "meta": meta}


class PackCollator:
    """Greedily pack a list of processed items into as few rows of at most ``max_length`` tokens as fit.

    The batch has ``R <= len(items)`` rows (variable); with a fixed row count in mind use :class:`PackedDataset`.
    Output keys as :class:`PadCollator` plus ``position_ids`` and ``segment_ids`` (B, L).
    """

    def __init__(self, pad_token_id: int, max_length: int, pad_to_multiple_of: int | None = None) -> None:
        self.max_length = max_length
        self.pad = PadCollator(pad_token_id, "right", pad_to_multiple_of)

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        items = [it for it in items if it is not None]
        rows = greedy_pack([it["input_ids"].numel() for it in items], self.max_length)
        return self.pad([concat_items([items[i] for i in row]) for row in rows])


class PackedDataset(IterableDataset):
    """Wrap a map-style dataset of processed items; yield packed rows of at most ``max_length`` tokens.

    Items are read in order (or shuffled with ``seed``) in windows of ``buffer_size``, each window packed (best-fit
    decreasing, ``greedy_pack``) and its rows yielded longest first. Workers of a ``DataLoader`` take disjoint
    strided shares of the indices.
    Collate with :class:`PadCollator` (it keeps ``position_ids``/``segment_ids``).
    """

    def __init__(self, dataset: Any, max_length: int, buffer_size: int = 256, seed: int | None = None) -> None:
        self.dataset, self.max_length, self.buffer_size, self.seed = dataset, max_length, buffer_size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> list[int]:
        idx = list(range(len(self.dataset)))
        if self.seed is not None:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            idx = torch.randperm(len(idx), generator=g).tolist()
        info = get_worker_info()
        return idx if info is None else idx[info.id::info.num_workers]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        buf: list[dict[str, Any]] = []
        for i in self._indices():
            buf.append(self.dataset[i])
            if len(buf) >= self.buffer_size:
                yield from self._flush(buf)
                buf = []
        if buf:
            yield from self._flush(buf)

    def _flush(self, buf: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for row in greedy_pack([it["input_ids"].numel() for it in buf], self.max_length):
            yield concat_items([buf[i] for i in row])
