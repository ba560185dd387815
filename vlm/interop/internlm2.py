"""InternLM2 <-> transformers Llama, config and tensors, read as data (InternLM2 is published only as remote code).

The LLM of InternVL2 / InternVL2.5 originals (``llm_config.model_type: internlm2``) is a Llama with other names and
one packed projection. Learned from InternLM2's public modeling code and its ``convert2llama`` tool (not copied):

| InternLM2 (``InternLM2ForCausalLM``)            | Llama (``LlamaForCausalLM``)                              |
| ----------------------------------------------- | --------------------------------------------------------- |
| ``model.tok_embeddings``                        | ``model.embed_tokens``                                    |
| ``model.layers.N.attention.wqkv`` (+ bias)      | ``self_attn.q_proj`` / ``k_proj`` / ``v_proj`` (+ bias)   |
| ``model.layers.N.attention.wo`` (+ bias)        | ``self_attn.o_proj``                                      |
| ``model.layers.N.feed_forward.w1 / w3 / w2``    | ``mlp.gate_proj / up_proj / down_proj``                   |
| ``model.layers.N.attention_norm / ffn_norm``    | ``input_layernorm / post_attention_layernorm``            |
| ``model.norm``, ``output``                      | ``model.norm``, ``lm_head``                               |
| ``bias`` (wqkv and wo)                          | ``attention_bias`` (``mlp_bias`` False)                   |
| ``rope_theta``, ``rope_scaling {type, factor}`` | ``rope_parameters {rope_type, factor, rope_theta}``       |

``wqkv``'s output rows come in ``num_key_value_heads`` groups of ``q_per_kv + 2`` heads of ``head_dim`` rows: the
group's ``q_per_kv`` query heads, then its key head, then its value head. Query head ``g * q_per_kv + j`` is group
``g``'s ``j``-th, which is Llama's grouping (query head ``i`` attends with key/value head ``i // q_per_kv``); both use
the same rotate-half rotary layout, so no row is permuted within a head.

``REMOTE_LLMS`` lists the remote LLM types an original checkpoint may name (``internlm2`` only): each row converts a
config and a state dict both ways, so another type is one more row.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

MODEL_TYPE = "internlm2"
ARCHITECTURES = ["InternLM2ForCausalLM"]
#: InternLM2's ``rope_scaling.type`` -> transformers' ``rope_type`` (same formulas: linear divides positions by
#: ``factor``; dynamic NTK grows the base once the sequence passes ``max_position_embeddings``)
ROPE_TYPES = {"linear": "linear", "dynamic": "dynamic"}
#: InternLM2 config key -> Llama config key, with InternLM2's default where the key may be absent
OPTIONAL_KEYS = {"num_key_value_heads": ("num_key_value_heads", None), "hidden_act": ("hidden_act", "silu"),
                 "max_position_embeddings": ("max_position_embeddings", 2048), "rms_norm_eps": ("rms_norm_eps", 1e-6),
                 "initializer_range": ("initializer_range", 0.02), "tie_word_embeddings": ("tie_word_embeddings", False),
                 "bias": ("attention_bias", True), "pad_token_id": ("pad_token_id", 0),
                 "bos_token_id": ("bos_token_id", 1), "eos_token_id": ("eos_token_id", 2)}
REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
#: per-layer tensors renamed one to one (InternLM2 name -> Llama name, after ``model.layers.N.``)
LAYER_KEYS = {"attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj",
              "feed_forward.w3": "mlp.up_proj", "feed_forward.w2": "mlp.down_proj",
              "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
TOP_KEYS = {"model.tok_embeddings.weight": "model.embed_tokens.weight", "model.norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}


def llama_config(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """The transformers Llama config (a dict with ``model_type: llama``) of InternLM2 config ``cfg``. ``where``
    (e.g. ``"'DIR/config.json' llm_config"``) starts every error: a missing dimension, or a ``rope_scaling`` that is
    not ``{type: linear | dynamic, factor}``."""
    missing = [k for k in REQUIRED_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"{where}: InternLM2 config lacks {missing}")
    out: dict[str, Any] = {"model_type": "llama", **{k: cfg[k] for k in REQUIRED_KEYS}}
    for theirs, (ours, default) in OPTIONAL_KEYS.items():
        out[ours] = cfg.get(theirs, default)
    if out["num_key_value_heads"] is None:
        out["num_key_value_heads"] = out["num_attention_heads"]
    out["mlp_bias"] = False
    out["head_dim"] = int(out["hidden_size"]) // int(out["num_attention_heads"])
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(cfg.get("rope_theta", 10000.0))}
    scaling = cfg.get("rope_scaling")
    if scaling:
        kind = scaling.get("type", scaling.get("rope_type")) if isinstance(scaling, dict) else None
        if kind not in ROPE_TYPES:
            raise ValueError(f"{where}: rope_scaling.type={kind!r} ({scaling!r}) is not a rope scaling vlm maps to "
                             f"Llama; expected one of {sorted(ROPE_TYPES)}")
        if not isinstance(scaling.get("factor"), (int, float)) or scaling["factor"] < 1:
            raise ValueError(f"{where}: rope_scaling.factor={scaling.get('factor')!r}; expected a number >= 1")
        rope.update(rope_type=ROPE_TYPES[kind], factor=float(scaling["factor"]))
    out["rope_parameters"] = rope
    return out


def internlm2_config(llama: dict[str, Any]) -> dict[str, Any]:
    """The InternLM2 config (``llm_config`` of an original InternVL) of a Llama config dict (``llama_problems`` of
    it must be empty)."""
    out: dict[str, Any] = {"architectures": list(ARCHITECTURES), "model_type": MODEL_TYPE,
                           **{k: llama[k] for k in REQUIRED_KEYS}}
    for theirs, (ours, _) in OPTIONAL_KEYS.items():
        out[theirs] = llama.get(ours)
    rope = dict(llama.get("rope_parameters") or {})
    out["rope_theta"] = rope.get("rope_theta", 10000.0)
    kind = rope.get("rope_type", "default")
    out["rope_scaling"] = None if kind == "default" else {
        "type": {v: k for k, v in ROPE_TYPES.items()}[kind], "factor": rope["factor"]}
    return out


def llama_problems(llama: dict[str, Any]) -> list[str]:
    """Why a Llama config cannot be written as InternLM2 (empty when it can)."""
    problems = []
    if llama.get("mlp_bias"):
        problems.append("mlp_bias=True (InternLM2's feed-forward has no bias)")
    heads, width = int(llama["num_attention_heads"]), int(llama["hidden_size"])
    if llama.get("head_dim") not in (None, width // heads):
        problems.append(f"head_dim={llama['head_dim']} differs from hidden_size / heads = {width // heads}")
    kind = (llama.get("rope_parameters") or {}).get("rope_type", "default")
    if kind != "default" and kind not in ROPE_TYPES.values():
        problems.append(f"rope_type={kind!r} (InternLM2 has {sorted(ROPE_TYPES)} scaling)")
    return problems


def _dims(llama: dict[str, Any]) -> tuple[int, int, int]:
    heads, kv = int(llama["num_attention_heads"]), int(llama["num_key_value_heads"])
    return heads, kv, int(llama.get("head_dim") or int(llama["hidden_size"]) // heads)


def split_wqkv(wqkv: torch.Tensor, llama: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q, k, v)`` of a packed ``wqkv`` weight ``((heads + 2 kv) * head_dim, in)`` or bias ``((heads + 2 kv) *
    head_dim,)``: rows grouped per key/value head as ``[q_0 .. q_{g-1}, k, v]``."""
    heads, kv, d = _dims(llama)
    groups = wqkv.reshape(kv, heads // kv + 2, d, *wqkv.shape[1:])
    q = groups[:, :-2].reshape(heads * d, *wqkv.shape[1:])
    return q, groups[:, -2].reshape(kv * d, *wqkv.shape[1:]), groups[:, -1].reshape(kv * d, *wqkv.shape[1:])


def pack_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, llama: dict[str, Any]) -> torch.Tensor:
    """The inverse of ``split_wqkv``."""
    heads, kv, d = _dims(llama)
    rest = q.shape[1:]
    groups = torch.cat([q.reshape(kv, heads // kv, d, *rest), k.reshape(kv, 1, d, *rest),
                        v.reshape(kv, 1, d, *rest)], dim=1)
    return groups.reshape((heads + 2 * kv) * d, *rest)


def llama_state(state: dict[str, torch.Tensor], llama: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
    """InternLM2 tensors (keys without the ``language_model.`` prefix) renamed and split into Llama's. ``where``
    (the weights file) starts the error for a ``wqkv`` whose shape disagrees with the config, or a key that is not
    InternLM2's. A tied model's missing ``output.weight`` is left out (the Llama ties it)."""
    heads, kv, d = _dims(llama)
    if heads % kv:
        raise ValueError(f"{where}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in TOP_KEYS:
            out[TOP_KEYS[key]] = value
            continue
        prefix, _, rest = key.partition(".layers.")
        layer, _, name = rest.partition(".")
        module, _, kind = name.rpartition(".")
        if prefix != "model" or not layer.isdigit() or kind not in ("weight", "bias"):
            raise ValueError(f"{where}: {key!r} is not an InternLM2 tensor name (expected {sorted(TOP_KEYS)} or "
                             f"model.layers.N.{{{', '.join(['attention.wqkv', *LAYER_KEYS])}}}.weight / .bias)")
        base = f"model.layers.{layer}."
        if module == "attention.wqkv":
            rows = (heads + 2 * kv) * d
            if value.shape[0] != rows:
                raise ValueError(f"{where}: language_model.{key} has shape {tuple(value.shape)}; the config "
                                 f"(num_attention_heads={heads}, num_key_value_heads={kv}, head_dim={d}) packs "
                                 f"(heads + 2 kv) * head_dim = {rows} rows")
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), split_wqkv(value, llama)):
                out[f"{base}self_attn.{proj}.{kind}"] = part.contiguous()
        elif module in LAYER_KEYS:
            out[f"{base}{LAYER_KEYS[module]}.{kind}"] = value
        else:
            raise ValueError(f"{where}: {key!r} is not an InternLM2 tensor name (layer modules: "
                             f"{['attention.wqkv', *LAYER_KEYS]})")
    return out


def internlm2_state(state: dict[str, torch.Tensor], llama: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The inverse of ``llama_state``: a Llama state dict in InternLM2's names, ``q/k/v_proj`` packed into ``wqkv``."""
    inverse = {v: k for k, v in LAYER_KEYS.items()}
    top = {v: k for k, v in TOP_KEYS.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
            continue
        base, _, name = key.partition(".layers.")[2].partition(".")
        module, _, kind = name.rpartition(".")
        prefix = f"model.layers.{base}."
        if module == "self_attn.q_proj":
            k, v = (state[f"{prefix}self_attn.{p}.{kind}"] for p in ("k_proj", "v_proj"))
            out[f"{prefix}attention.wqkv.{kind}"] = pack_wqkv(value, k, v, llama).contiguous()
        elif module in inverse:
            out[f"{prefix}{inverse[module]}.{kind}"] = value
        elif module not in ("self_attn.k_proj", "self_attn.v_proj"):
            raise ValueError(f"to_hf: the Llama tensor {key!r} has no InternLM2 name")
    return out


@dataclass(frozen=True)
class RemoteLLM:
    """A remote-code LLM type an original checkpoint names in ``llm_config.model_type``, and its exact transformers
    counterpart: configs and state dicts both ways."""

    architectures: list[str]
    to_config: Callable[[dict[str, Any], str], dict[str, Any]]
    from_config: Callable[[dict[str, Any]], dict[str, Any]]
    to_state: Callable[[dict[str, torch.Tensor], dict[str, Any], str], dict[str, torch.Tensor]]
    from_state: Callable[[dict[str, torch.Tensor], dict[str, Any]], dict[str, torch.Tensor]]
    problems: Callable[[dict[str, Any]], list[str]]
    #: the transformers ``model_type`` it becomes
    model_type: str


#: ``llm_config.model_type`` of a remote-code LLM -> its mapping to a transformers architecture
REMOTE_LLMS: dict[str, RemoteLLM] = {
    MODEL_TYPE: RemoteLLM(ARCHITECTURES, llama_config, internlm2_config, llama_state, internlm2_state,
                          llama_problems, "llama"),
}
#: transformers ``model_type`` -> the remote LLM type an original checkpoint writes it as
EXPORT_AS = {remote.model_type: name for name, remote in REMOTE_LLMS.items()}
