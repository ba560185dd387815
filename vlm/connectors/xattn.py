"""``xattn`` (Flamingo): gated cross-attention blocks installed before every n-th decoder layer of the LLM.

A fusion connector: images do not become tokens of the LLM's sequence. Each image is one ``<image>`` text token
(``num_tokens`` is 1); its features, optionally reduced first by a token ``reducer`` (any token connector: ``mlp``,
``linear``, ``perceiver``, ...), are what the installed blocks attend to::

    pixel_values -> encoder -> reducer (optional) -> media (N, K, Dm)
                                                        |  keys / values
    h -> [x = h + tanh(a_attn) * CrossAttn(LN(h), media)  -> x + tanh(a_ff) * FF(LN(x))] -> decoder layer i -> ...
          (before layer i for every i with (i + 1) % every_n_layers == 0)

Media masking: text token ``l`` of a row has ``text_time(l)`` = the number of ``<image>`` tokens at or before ``l``;
it attends only to image ``text_time(l)`` (``only_immediate=True``, Flamingo's default) or to images
``1..text_time(l)``; a token before any image attends to none (its attention output is zero). Packed rows
(``segment_ids``) never attend to another segment's images. Tokens generated after the prompt continue the prompt's
last ``text_time``.

The gates ``a_attn``, ``a_ff`` start at 0, so an untrained model's logits are exactly the plain LLM's. The blocks are
this connector's parameters (``connector.blocks.<layer>.*``): the stage policy of the connector trains them, the
LLM's policy (frozen / full / LoRA) is untouched, and they are saved with the model. They reach the LLM through a
forward pre-hook on its decoder layers (``HFCausalLM.decoder_layers``), so any transformers causal LM works, its
layers stay where FSDP and LoRA expect them, and transformers' gradient checkpointing (which checkpoints
``forward``, not the hooks) leaves the blocks outside the recomputation.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlm.connectors.base import Connector
from vlm.connectors.registry import CONNECTORS, build
from vlm.registry import check_kwargs, to_dict


class GatedCrossAttentionBlock(nn.Module):
    """``x (B, L, D)`` + ``media (B, S, Dm)`` + ``allowed (B, L, S)`` -> ``(B, L, D)``; the identity at init."""

    def __init__(self, dim: int, media_dim: int, heads: int, head_dim: int, ff_mult: int) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(media_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * ff_mult, bias=False), nn.GELU(),
                                nn.Linear(dim * ff_mult, dim, bias=False))
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def attend(self, x: torch.Tensor, media: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """Masked multi-head cross-attention; rows with no allowed key get 0."""
        B, L, _ = x.shape
        q = self.to_q(self.norm(x)).view(B, L, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.to_kv(media).view(B, media.shape[1], 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        any_key = allowed.any(-1, keepdim=True)                          # (B, L, 1)
        mask = allowed | ~any_key                                        # a fully masked row would give NaN
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
        out = out.transpose(1, 2).reshape(B, L, -1) * any_key.to(out.dtype)
        return self.to_out(out)

    def forward(self, x: torch.Tensor, media: torch.Tensor | None, allowed: torch.Tensor | None) -> torch.Tensor:
        h = x.to(self.norm.weight.dtype)
        if media is not None:
            h = h + torch.tanh(self.attn_gate) * self.attend(h, media.to(h.dtype), allowed)
        h = h + torch.tanh(self.ff_gate) * self.ff(h)
        return h.to(x.dtype)


@dataclass
class Media:
    """The images of one LLM call, as the blocks read them.

    ``features (B, S, Dm)``: each row's images' tokens, image after image (``S = max images x K``, zero-padded);
    ``key_image (B, S)``: which image (1-based, 0 = padding) each key belongs to; ``text_time (B, L)``: images seen
    at or before each text position; ``segments`` (packed rows): ``(B, L)`` segment of each text position and
    ``(B, S)`` of each key."""

    features: torch.Tensor | None
    key_image: torch.Tensor | None
    text_time: torch.Tensor
    text_segment: torch.Tensor | None = None
    key_segment: torch.Tensor | None = None

    def extend(self, t: torch.Tensor, length: int) -> torch.Tensor:
        """``(B', L0)`` -> ``(B, length)`` for a call on ``length`` positions: the prompt's, then (tokens generated
        after it) its last value; a cached decoding step (``length < L0``) gets the last value only."""
        L0 = t.shape[1]
        if length >= L0:
            return torch.cat([t, t[:, -1:].expand(-1, length - L0)], 1)
        return t[:, -1:].expand(-1, length)

    def allowed(self, batch: int, length: int, all_previous: bool) -> torch.Tensor | None:
        """``(B, L, S)`` boolean: which keys each of the call's ``L`` positions may attend to."""
        if self.features is None:
            return None
        rows = self.text_time.shape[0]
        if batch % rows:
            raise ValueError(f"xattn: the LLM was called on {batch} rows but the images were given for {rows}")
        rep = batch // rows  # e.g. beam search repeats each row
        t = self.extend(self.text_time, length).repeat_interleave(rep, 0)[:, :, None]
        key = self.key_image.repeat_interleave(rep, 0)[:, None, :]
        ok = (key >= 1) & (key <= t) if all_previous else (key == t)
        if self.text_segment is not None:
            seg = self.extend(self.text_segment, length).repeat_interleave(rep, 0)
            ok = ok & (seg[:, :, None] == self.key_segment.repeat_interleave(rep, 0)[:, None, :])
        return ok


def layout_media(features: torch.Tensor | None, input_ids: torch.Tensor, image_token_id: int,
                 segment_ids: torch.Tensor | None = None) -> Media:
    """Place ``features (N, K, Dm)`` (images in batch order) by the ``<image>`` tokens of ``input_ids (B, L)``: one
    token per image. Raises ``ValueError`` when images and ``<image>`` tokens do not match one to one."""
    is_image = input_ids == image_token_id
    per_row = is_image.sum(1)
    n_tokens, n_images = int(per_row.sum()), 0 if features is None else features.shape[0]
    if n_tokens != n_images:
        rows = {i: int(c) for i, c in enumerate(per_row.tolist()) if c}
        raise ValueError(f"xattn: {n_images} image(s) were given but input_ids hold {n_tokens} <image> token(s) "
                         f"(id {image_token_id}; per row {rows}); an xattn model needs exactly one <image> token "
                         f"per image, at the place the image belongs in the text")
    text_time = is_image.long().cumsum(1)
    if features is None or n_images == 0:
        return Media(None, None, text_time)
    B, M = input_ids.shape[0], int(per_row.max())
    K = features.shape[1]
    row = torch.repeat_interleave(torch.arange(B, device=input_ids.device), per_row)
    slot = torch.arange(n_images, device=input_ids.device) - (per_row.cumsum(0) - per_row)[row]
    grid = features.new_zeros(B, M, K, features.shape[-1])
    grid[row, slot] = features
    image_of_slot = torch.arange(1, M + 1, device=input_ids.device)
    key_image = torch.where(image_of_slot[None] <= per_row[:, None], image_of_slot[None], 0)  # (B, M)
    media = Media(grid.reshape(B, M * K, -1), key_image.repeat_interleave(K, 1), text_time)
    if segment_ids is not None:
        seg_of_image = segment_ids.new_zeros(B, M)
        seg_of_image[row, slot] = segment_ids[is_image]
        media.text_segment, media.key_segment = segment_ids, seg_of_image.repeat_interleave(K, 1)
    return media


@CONNECTORS.register("xattn")
class GatedCrossAttentionFusion(Connector):
    """Flamingo's gated cross-attention fusion (see the module docstring).

    ``every_n_layers``: a block before decoder layer ``i`` when ``(i + 1) % every_n_layers == 0`` (OpenFlamingo's
    convention: 1 = every layer). ``heads`` x ``head_dim``: the cross-attention width. ``ff_mult``: the gated
    feed-forward's expansion. ``reducer``: a token connector config (``{name: perceiver, ...}``) applied to the
    encoder tokens first, built with ``in_dim`` = the encoder width and ``out_dim`` = the LLM width unless it sets
    them; ``None``: the encoder tokens themselves are the media. ``only_immediate``: attend only to the latest
    preceding image (else to all preceding images).
    """

    fuses_by_cross_attention = True
    injection_site = "cross_attention"

    @staticmethod
    def check_options(reducer: Any = None, every_n_layers: int = 1, heads: int = 8, head_dim: int = 64,
                      ff_mult: int = 4, **_: Any) -> None:
        """Check the options without building (what ``vlm.train`` runs at compose time): positive sizes and a
        reducer that names a token connector with arguments it takes. Raises ``ValueError`` / ``KeyError`` /
        ``TypeError``."""
        for key, value in (("every_n_layers", every_n_layers), ("heads", heads), ("head_dim", head_dim),
                           ("ff_mult", ff_mult)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"xattn {key}={value!r}; expected a positive integer")
        if reducer is None:
            return
        cfg = to_dict(reducer)
        if "name" not in cfg:
            raise KeyError(f"xattn reducer needs a 'name' (a token connector: {CONNECTORS.names()}); got {cfg}")
        factory = CONNECTORS.get(cfg.pop("name"))
        if getattr(factory, "fuses_by_cross_attention", False):
            raise ValueError("xattn reducer must be a token connector (it emits the media tokens), not a fusion one")
        cfg.pop("dtype", None)
        check_kwargs(factory, {"in_dim": 1, "out_dim": 1, **cfg}, f"xattn reducer {factory.registry_name!r}")
        checker = getattr(factory, "check_options", None)
        if checker is not None:
            checker(**cfg)

    def __init__(self, in_dim: int, out_dim: int, every_n_layers: int = 1, heads: int = 8, head_dim: int = 64,
                 ff_mult: int = 4, reducer: dict[str, Any] | None = None, only_immediate: bool = True) -> None:
        super().__init__()
        reducer = None if reducer is None else to_dict(reducer)
        self.check_options(reducer, every_n_layers, heads, head_dim, ff_mult)
        self.in_dim, self.out_dim = in_dim, out_dim
        self.record_options(locals())
        self.every_n_layers, self.heads, self.head_dim, self.ff_mult = every_n_layers, heads, head_dim, ff_mult
        self.only_immediate = only_immediate
        if reducer is not None:
            self.reducer: Connector | None = build(reducer, in_dim=in_dim, out_dim=out_dim)
            self.media_dim = self.reducer.out_dim
        else:
            self.reducer, self.media_dim = None, in_dim
        self.blocks = nn.ModuleDict()   # filled by ``install``: {str(layer index): block}
        # the dtype / device this connector was moved to (``connectors.build`` casts it before the blocks exist)
        self.register_buffer("_placement", torch.empty(0), persistent=False)
        self._media: Media | None = None
        self._hooks: list[Any] = []

    # -- what the model asks ---------------------------------------------------------------------------------
    def num_tokens(self, num_input_tokens: int, grid: tuple[int, int]) -> int:
        """One ``<image>`` text token per image: the image itself reaches the LLM by cross-attention."""
        return 1

    def num_media_tokens(self, num_input_tokens: int, grid: tuple[int, int]) -> int:
        """The keys per image the blocks attend to: the reducer's token count, else the encoder's."""
        return self.reducer.num_tokens(num_input_tokens, grid) if self.reducer is not None else num_input_tokens

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Encoder tokens ``(N, T, C)`` -> media ``(N, K, Dm)`` (the reducer's tokens, or ``x`` itself)."""
        self.check_input(x)
        return self.reducer(x, grid) if self.reducer is not None else x

    # -- installation ----------------------------------------------------------------------------------------
    def install(self, llm: Any) -> None:
        """Create the blocks for ``llm`` (an ``HFCausalLM``) and hook them in front of its decoder layers."""
        if self._hooks:
            raise RuntimeError("xattn: this connector is already installed into an LLM")
        layers = llm.decoder_layers()
        chosen = [i for i in range(len(layers)) if (i + 1) % self.every_n_layers == 0]
        if not chosen:
            raise ValueError(f"xattn every_n_layers={self.every_n_layers} leaves no block in an LLM of "
                             f"{len(layers)} decoder layers; use every_n_layers <= {len(layers)}")
        if llm.hidden_size != self.out_dim:
            raise ValueError(f"xattn was built for an LLM of width {self.out_dim}; this one is {llm.hidden_size}")
        for i in chosen:
            self.blocks[str(i)] = GatedCrossAttentionBlock(self.out_dim, self.media_dim, self.heads, self.head_dim,
                                                           self.ff_mult).to(self._placement)
            self._hooks.append(layers[i].register_forward_pre_hook(self._hook(self.blocks[str(i)]), with_kwargs=True))

    def _hook(self, block: GatedCrossAttentionBlock) -> Any:
        def pre_forward(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            hidden = args[0] if args else kwargs["hidden_states"]
            media = self._media
            allowed = None if media is None else media.allowed(hidden.shape[0], hidden.shape[1],
                                                               not self.only_immediate)
            out = block(hidden, None if allowed is None else media.features, allowed)
            if args:
                return (out, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": out}
        return pre_forward

    @contextlib.contextmanager
    def media(self, features: torch.Tensor | None, input_ids: torch.Tensor, image_token_id: int,
              segment_ids: torch.Tensor | None = None) -> Iterator[None]:
        """While inside: the LLM's blocks attend to ``features (N, K, Dm)`` placed by the ``<image>`` tokens of
        ``input_ids (B, L)`` (``VLM.forward`` / ``generate`` enter it around the LLM call). Outside, the blocks see
        no image (their attention adds 0)."""
        if not self._hooks:
            raise RuntimeError("xattn: the connector is not installed into an LLM (vlm.VLM installs it)")
        previous = self._media
        self._media = layout_media(features, input_ids, image_token_id, segment_ids)
        try:
            yield
        finally:
            self._media = previous
