"""The blocks of Qwen2-VL's / Qwen2.5-VL's native-resolution tower (``vlm.encoders.qwen2_vl_vit`` builds the encoder
from them): the tower's shape (``TowerSpec``), its variable-length attention segments (``Segments``: images, frames,
Qwen2.5-VL's windows; attended to without attending across), the patch embedding, the blocks and the tower.
Parameter names are transformers' ``visual.*`` names, so checkpoints load by name.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from vlm.layers import RMSNorm

HALF_DTYPES = (torch.float16, torch.bfloat16)  # flash-attention's; other dtypes take the sdpa path

@dataclass(frozen=True)
class TowerSpec:
    """The architecture read off a transformers vision config (one reader per ``model_type``, ``TOWER_TYPES``)."""

    width: int
    depth: int
    heads: int
    mlp_hidden: int
    gated_mlp: bool  # SwiGLU (gate/up/down) vs fc1 -> act -> fc2
    norm: str  # "layer_norm" | "rms_norm"
    act: str
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    in_channels: int
    rope_theta: float
    window_size: int | None = None  # pixels; None: full attention in every block
    full_attention_blocks: tuple[int, ...] = ()


@dataclass
class Segments:
    """A partition of the row-major token sequence into attention segments (frames, or windows).

    ``groups``: ``(S, L)`` index tensors, the ``S`` segments of length ``L`` (one tensor per distinct length);
    ``inverse``: puts the concatenated, flattened groups back in sequence order; ``order`` / ``cu_seqlens`` /
    ``max_len`` / ``order_inverse``: the sequence laid out segment after segment, for ``flash_attn_varlen_func``.
    """

    groups: list[torch.Tensor]
    order: torch.Tensor
    inverse: torch.Tensor
    cu_seqlens: torch.Tensor
    max_len: int
    order_inverse: torch.Tensor

    @classmethod
    def from_ids(cls, ids: torch.Tensor) -> "Segments":
        """From ``ids (P,)``: the segment of each token (``0..S-1``, every segment non-empty)."""
        order = torch.argsort(ids, stable=True)
        counts = torch.bincount(ids)
        starts = torch.cumsum(counts, 0) - counts
        groups, flat = [], []
        for length in torch.unique(counts).tolist():
            idx = order[starts[counts == length][:, None] + torch.arange(length)]
            groups.append(idx)
            flat.append(idx.reshape(-1))
        grouped = torch.cat(flat)
        cu = F.pad(torch.cumsum(counts, 0), (1, 0)).to(torch.int32)
        return cls(groups, order, torch.argsort(grouped), cu, int(counts.max()), torch.argsort(order))

    def to(self, device: torch.device) -> "Segments":
        return Segments([g.to(device) for g in self.groups], self.order.to(device), self.inverse.to(device),
                        self.cu_seqlens.to(device), self.max_len, self.order_inverse.to(device))


def segment_ids(grids: Sequence[tuple[int, int, int]], window: int | None) -> torch.Tensor:
    """``(P,)`` segment id of each row-major token: one segment per frame (``window=None``), or per
    ``window x window``-patch window of a frame, tiled from the top-left corner (edge windows smaller)."""
    ids, base = [], 0
    for t, h, w in grids:
        if window is None:
            per_frame, n = torch.zeros(h * w, dtype=torch.long), 1
        else:
            cols = -(-w // window)
            per_frame = ((torch.arange(h) // window)[:, None] * cols + (torch.arange(w) // window)[None]).reshape(-1)
            n = -(-h // window) * cols
        ids.append((torch.arange(t)[:, None] * n + per_frame[None] + base).reshape(-1))
        base += t * n
    return torch.cat(ids)


def block_to_row_major(grids: Sequence[tuple[int, int, int]], merge: int) -> torch.Tensor:
    """``(P,)`` gather index: ``row_major = block_order[index]``, for images whose patches come in transformers'
    order ``(t, h/m, w/m, m, m)``."""
    out, base = [], 0
    for t, h, w in grids:
        n = t * h * w
        idx = torch.arange(n).reshape(t, h // merge, w // merge, merge, merge).permute(0, 1, 3, 2, 4)
        out.append(idx.reshape(-1) + base)
        base += n
    return torch.cat(out)


def row_major_positions(grids: Sequence[tuple[int, int, int]]) -> torch.Tensor:
    """``(P, 2)``: (row, column) of each row-major token in its frame."""
    pos = []
    for t, h, w in grids:
        yx = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(-1, 2)
        pos.append(yx.repeat(t, 1))
    return torch.cat(pos)


# --------------------------------------------------------------------------------------------- modules
class PatchEmbed(nn.Module):
    """``(P, 3 * tps * p * p) -> (P, C)``: Conv3d with kernel = stride = ``(tps, p, p)``, no bias (computed as the
    equivalent matrix product over each flat patch)."""

    def __init__(self, spec: TowerSpec) -> None:
        super().__init__()
        k = (spec.temporal_patch_size, spec.patch_size, spec.patch_size)
        self.proj = nn.Conv3d(spec.in_channels, spec.width, kernel_size=k, stride=k, bias=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight
        return F.linear(patches.to(weight.dtype), weight.reshape(weight.shape[0], -1))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Attention(nn.Module):
    """Self-attention over segments: ``(P, C) -> (P, C)``, 2-D rotary on q and k (in float32)."""

    def __init__(self, spec: TowerSpec, attn_implementation: str) -> None:
        super().__init__()
        self.heads = spec.heads
        self.qkv = nn.Linear(spec.width, 3 * spec.width, bias=True)
        self.proj = nn.Linear(spec.width, spec.width)
        self.attn_implementation = attn_implementation

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], segments: Segments) -> torch.Tensor:
        p = x.shape[0]
        q, k, v = self.qkv(x).reshape(p, 3, self.heads, -1).unbind(1)  # (P, H, d) each
        cos, sin = (r[:, None] for r in rope)
        q, k = ((y.float() * cos + rotate_half(y.float()) * sin).to(y.dtype) for y in (q, k))
        if self.attn_implementation == "flash_attention_2" and x.is_cuda and x.dtype in HALF_DTYPES:
            out = flash_varlen(q, k, v, segments)
        else:
            out = grouped_attention(q, k, v, segments, self.attn_implementation == "eager")
        return self.proj(out.reshape(p, -1))


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments,
                      eager: bool = False) -> torch.Tensor:
    """``(P, H, d)`` x3 -> ``(P, H, d)``: each segment attends to itself only; one batched call per segment length."""
    outs = []
    for idx in segments.groups:  # (S, L)
        qs, ks, vs = (y[idx].transpose(1, 2) for y in (q, k, v))  # (S, H, L, d)
        if eager:
            weights = torch.softmax((qs @ ks.transpose(-1, -2)).float() * qs.shape[-1] ** -0.5, -1).to(qs.dtype)
            o = weights @ vs
        else:
            o = F.scaled_dot_product_attention(qs, ks, vs)
        outs.append(o.transpose(1, 2).reshape(-1, *q.shape[1:]))
    return torch.cat(outs)[segments.inverse]


def flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments) -> torch.Tensor:
    """The same as :func:`grouped_attention` with flash-attention's variable-length kernel (CUDA, fp16/bf16)."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as e:
        raise ImportError("qwen2_vl_vit encoder: attn_implementation='flash_attention_2' needs the flash-attn "
                          "package (pip install flash-attn); or use 'sdpa'") from e
    order, cu = segments.order, segments.cu_seqlens
    out = flash_attn_varlen_func(q[order], k[order], v[order], cu, cu, segments.max_len, segments.max_len)
    return out[segments.order_inverse]


class MLP(nn.Module):
    """``fc2(act(fc1(x)))`` (Qwen2-VL)."""

    def __init__(self, spec: TowerSpec) -> None:
        super().__init__()
        self.fc1 = nn.Linear(spec.width, spec.mlp_hidden)
        self.act = ACT2FN[spec.act]
        self.fc2 = nn.Linear(spec.mlp_hidden, spec.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class GatedMLP(nn.Module):
    """``down_proj(act(gate_proj(x)) * up_proj(x))`` with biases (Qwen2.5-VL)."""

    def __init__(self, spec: TowerSpec) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(spec.width, spec.mlp_hidden)
        self.up_proj = nn.Linear(spec.width, spec.mlp_hidden)
        self.down_proj = nn.Linear(spec.mlp_hidden, spec.width)
        self.act = ACT2FN[spec.act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """One pre-norm block ``(P, C) -> (P, C)``; ``windowed`` blocks attend within windows, the others per frame."""

    def __init__(self, spec: TowerSpec, windowed: bool, attn_implementation: str) -> None:
        super().__init__()
        norm: Callable[[], nn.Module] = ((lambda: nn.LayerNorm(spec.width, eps=1e-6)) if spec.norm == "layer_norm"
                                         else (lambda: RMSNorm(spec.width, eps=1e-6)))
        self.norm1, self.norm2 = norm(), norm()
        self.attn = Attention(spec, attn_implementation)
        self.mlp = GatedMLP(spec) if spec.gated_mlp else MLP(spec)
        self.windowed = windowed

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], frames: Segments,
                windows: Segments | None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, windows if self.windowed else frames)
        return x + self.mlp(self.norm2(x))


class Qwen2VLTower(nn.Module):
    """``patch_embed`` + ``blocks``: row-major flat patches ``(P, D_patch)`` of ``grids`` -> ``(P, C)``."""

    def __init__(self, spec: TowerSpec, attn_implementation: str) -> None:
        super().__init__()
        self.spec = spec
        self.patch_embed = PatchEmbed(spec)
        if spec.width % spec.heads:
            raise ValueError(f"qwen2_vl_vit encoder: width {spec.width} is not divisible by num_heads {spec.heads}")
        windowed = spec.window_size is not None
        if windowed and spec.window_size // spec.merge_size // spec.patch_size < 1:
            raise ValueError(f"qwen2_vl_vit encoder: window_size {spec.window_size} px is smaller than one merged "
                             f"block of {spec.merge_size} x {spec.patch_size} px; expected a multiple of "
                             f"{spec.merge_size * spec.patch_size}")
        self.blocks = nn.ModuleList([Block(spec, windowed and i not in spec.full_attention_blocks,
                                           attn_implementation) for i in range(spec.depth)])

    def window_patches(self) -> int | None:
        """The side of an attention window in patches (``None``: no window attention)."""
        s = self.spec
        if s.window_size is None:
            return None
        return s.window_size // s.merge_size // s.patch_size * s.merge_size

    def rope(self, grids: Sequence[tuple[int, int, int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``, ``(P, head_dim)`` each, float32: row angles then column angles, twice. The inverse
        frequencies are computed here in float32 (a buffer would follow the tower to bfloat16)."""
        quarter = self.spec.width // self.spec.heads // 2
        inv_freq = 1.0 / self.spec.rope_theta ** (torch.arange(0, quarter, 2, device=device).float() / quarter)
        pos = row_major_positions(grids).to(device)
        freqs = (pos[..., None].float() * inv_freq).flatten(1)  # (P, 2 * d/4): rows, then columns
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()

    def forward(self, patches: torch.Tensor, grids: Sequence[tuple[int, int, int]]) -> torch.Tensor:
        device = patches.device
        x = self.patch_embed(patches)
        rope = self.rope(grids, device)
        frames = Segments.from_ids(segment_ids(grids, None)).to(device)
        window = self.window_patches()
        windows = Segments.from_ids(segment_ids(grids, window)).to(device) if window is not None else None
        for block in self.blocks:
            x = block(x, rope, frames, windows)
        return x

