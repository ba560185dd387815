"""``qformer`` (BLIP-2's Querying Transformer): ``K`` learned queries read the image through cross-attention.

``(N, T, C)`` image tokens -> LayerNorm (``input_norm``) -> keys / values of the cross-attention; ``K`` learned queries
``(K, H)`` -> LayerNorm -> ``num_layers`` BERT-style post-norm layers -> Linear ``(H, D)`` -> ``(N, K, D)``. Each layer:

    q = LN(q + Dropout(Wo · SelfAttention(q)))                         every layer
    q = LN(q + Dropout(Wo · CrossAttention(q, image tokens)))          layers i with i % cross_attention_frequency == 0
    q = LN(q + Dropout(W2 · act(W1 · q)))                              every layer

The token count is ``K = num_queries`` whatever the tower, grid or image size: the queries attend to all ``T`` tokens
(CLS included when the encoder keeps it), so any encoder width ``C`` and token count ``T`` work, and any LLM width
``D``. The image tokens are never mixed with the queries in self-attention (BLIP-2's image-to-LLM path).

The parameters map one to one onto transformers' BLIP-2 (``Blip2ForConditionalGeneration``), see ``HF_NAMES``:
``input_norm`` is the vision tower's ``post_layernorm`` (LAVIS's ``ln_vision``, trained with the Q-Former while the
tower is frozen), ``query_tokens`` / ``query_norm`` / ``layers`` are ``query_tokens`` / ``qformer.layernorm`` /
``qformer.encoder.layer``, and ``proj`` is ``language_projection``. Exact equality is tested in
``tests/test_interop_blip2.py``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlm.connectors.base import Connector
from vlm.connectors.mlp import ACTIVATIONS
from vlm.connectors.registry import CONNECTORS

# our parameter prefix -> transformers' Blip2ForConditionalGeneration's (per layer: ``layers.{i}.`` <->
# ``qformer.encoder.layer.{i}.``); the vision tower's post_layernorm is ``input_norm``
HF_NAMES: dict[str, str] = {
    "input_norm.": "vision_model.post_layernorm.",
    "query_tokens": "query_tokens",
    "query_norm.": "qformer.layernorm.",
    "proj.": "language_projection.",
}
HF_LAYER_NAMES: dict[str, str] = {
    "self_attn.query.": "attention.attention.query.",
    "self_attn.key.": "attention.attention.key.",
    "self_attn.value.": "attention.attention.value.",
    "self_attn.out.": "attention.output.dense.",
    "self_attn.norm.": "attention.output.LayerNorm.",
    "cross_attn.query.": "crossattention.attention.query.",
    "cross_attn.key.": "crossattention.attention.key.",
    "cross_attn.value.": "crossattention.attention.value.",
    "cross_attn.out.": "crossattention.output.dense.",
    "cross_attn.norm.": "crossattention.output.LayerNorm.",
    "ffn_in.": "intermediate_query.dense.",
    "ffn_out.": "output_query.dense.",
    "ffn_norm.": "output_query.LayerNorm.",
}
HF_LAYER_PREFIX = "qformer.encoder.layer."


def to_hf_name(name: str) -> str:
    """Our parameter name (e.g. ``layers.0.cross_attn.key.weight``) -> transformers BLIP-2's
    (``qformer.encoder.layer.0.crossattention.attention.key.weight``); ``KeyError`` for a name with no counterpart."""
    if name.startswith("layers."):
        _, index, rest = name.split(".", 2)
        for ours, theirs in HF_LAYER_NAMES.items():
            if rest.startswith(ours):
                return f"{HF_LAYER_PREFIX}{index}.{theirs}{rest.removeprefix(ours)}"
    for ours, theirs in HF_NAMES.items():
        if name.startswith(ours):
            return theirs + name.removeprefix(ours)
    raise KeyError(f"qformer parameter {name!r} has no transformers BLIP-2 counterpart")


class QFormerAttention(nn.Module):
    """BERT attention block: multi-head attention of ``x (N, K, H)`` over ``context (N, T, C)`` (``context = x`` for
    self-attention), output projection, dropout, residual, post-LayerNorm -> ``(N, K, H)``."""

    def __init__(self, dim: int, context_dim: int, num_heads: int, eps: float, dropout: float,
                 attention_dropout: float) -> None:
        super().__init__()
        self.num_heads, self.attention_dropout = num_heads, attention_dropout
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(context_dim, dim)
        self.value = nn.Linear(context_dim, dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        n, k, dim = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # (N, L, H) -> (N, heads, L, H / heads)
            return t.reshape(n, t.shape[1], self.num_heads, -1).transpose(1, 2)

        attn = F.scaled_dot_product_attention(heads(self.query(x)), heads(self.key(context)),
                                              heads(self.value(context)),
                                              dropout_p=self.attention_dropout if self.training else 0.0)
        attn = attn.transpose(1, 2).reshape(n, k, dim)
        return self.norm(x + self.dropout(self.out(attn)))


class QFormerLayer(nn.Module):
    """Self-attention over the queries, cross-attention to the image tokens (when ``cross``), feed-forward."""

    def __init__(self, dim: int, context_dim: int, num_heads: int, intermediate_size: int, act: str, eps: float,
                 dropout: float, attention_dropout: float, cross: bool) -> None:
        super().__init__()
        self.self_attn = QFormerAttention(dim, dim, num_heads, eps, dropout, attention_dropout)
        self.cross_attn = (QFormerAttention(dim, context_dim, num_heads, eps, dropout, attention_dropout)
                           if cross else None)
        self.ffn_in = nn.Linear(dim, intermediate_size)
        self.act = ACTIVATIONS[act]()
        self.ffn_out = nn.Linear(intermediate_size, dim)
        self.dropout = nn.Dropout(dropout)
        self.ffn_norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, q: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """``q (N, K, H)``, ``image (N, T, C)`` -> ``(N, K, H)``."""
        q = self.self_attn(q, q)
        if self.cross_attn is not None:
            q = self.cross_attn(q, image)
        return self.ffn_norm(q + self.dropout(self.ffn_out(self.act(self.ffn_in(q)))))


@CONNECTORS.register("qformer")
class QFormerConnector(Connector):
    """BLIP-2's Q-Former (module docstring). Defaults are BLIP-2's: 32 queries, BERT-base width (768, 12 layers,
    12 heads, feed-forward 3072), cross-attention every 2nd layer, GELU, LayerNorm eps 1e-12 (1e-6 on the image
    tokens, as BLIP-2's ViT). ``dropout`` / ``attention_dropout`` act in training only (BLIP-2 trains with 0.1).
    ``input_norm=False`` feeds the encoder tokens to the cross-attention as they are (an encoder whose output is
    normalized already). Raises ``ValueError`` for sizes that do not fit (``hidden_size`` not divisible by
    ``num_heads``, fewer than one query / layer, an unknown ``act``)."""

    def __init__(self, in_dim: int, out_dim: int, num_queries: int = 32, hidden_size: int = 768, num_layers: int = 12,
                 num_heads: int = 12, intermediate_size: int | None = None, cross_attention_frequency: int = 2,
                 act: str = "gelu", dropout: float = 0.0, attention_dropout: float = 0.0,
                 layer_norm_eps: float = 1e-12, input_norm: bool = True, input_norm_eps: float = 1e-6,
                 init_std: float = 0.02) -> None:
        super().__init__()
        for key, value in (("num_queries", num_queries), ("hidden_size", hidden_size), ("num_layers", num_layers),
                           ("num_heads", num_heads), ("cross_attention_frequency", cross_attention_frequency),
                           ("in_dim", in_dim), ("out_dim", out_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"qformer connector {key}={value!r}; expected an integer >= 1")
        if hidden_size % num_heads:
            raise ValueError(f"qformer connector hidden_size={hidden_size} is not divisible by num_heads={num_heads}; "
                             f"expected hidden_size = num_heads x head size (BLIP-2: 768 = 12 x 64)")
        if act not in ACTIVATIONS:
            raise ValueError(f"qformer connector act={act!r}; expected one of {sorted(ACTIVATIONS)}")
        for key, value in (("dropout", dropout), ("attention_dropout", attention_dropout)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"qformer connector {key}={value}; expected a probability in [0, 1)")
        self.in_dim, self.out_dim = in_dim, out_dim
        self.record_options(locals())
        self.num_queries, self.hidden_size = num_queries, hidden_size
        self.input_norm = nn.LayerNorm(in_dim, eps=input_norm_eps) if input_norm else nn.Identity()
        self.query_tokens = nn.Parameter(torch.empty(1, num_queries, hidden_size))
        self.query_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.query_dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            QFormerLayer(hidden_size, in_dim, num_heads, intermediate_size or 4 * hidden_size, act, layer_norm_eps,
                         dropout, attention_dropout, cross=i % cross_attention_frequency == 0)
            for i in range(num_layers))
        self.proj = nn.Linear(hidden_size, out_dim)
        self.reset_parameters(init_std)

    def reset_parameters(self, std: float = 0.02) -> None:
        """BERT's initialization: queries and Linear weights ~ N(0, std), biases 0, LayerNorms 1 / 0."""
        nn.init.normal_(self.query_tokens, std=std)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def num_tokens(self, num_input_tokens: int, grid: tuple[int, int]) -> int:
        """``num_queries``, for any token count and grid (at least one image token is needed)."""
        if num_input_tokens < 1:
            raise ValueError(f"qformer connector needs at least one image token to attend to; got {num_input_tokens} "
                             f"(grid {tuple(grid)})")
        return self.num_queries

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``(N, T, C) -> (N, num_queries, D)``."""
        self.check_input(x)
        self.num_tokens(x.shape[1], grid)
        image = self.input_norm(x)
        q = self.query_dropout(self.query_norm(self.query_tokens.expand(x.shape[0], -1, -1)))
        for layer in self.layers:
            q = layer(q, image)
        return self.proj(q)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Our weights under transformers BLIP-2's names (``to_hf_name``)."""
        return {to_hf_name(k): v for k, v in self.state_dict().items()}
