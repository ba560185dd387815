"""InternViT weight names: transformers' ``InternVLVisionModel`` and the original OpenGVLab ``InternVisionModel``
against ours (``vlm.encoders.internvit``), as tables, and the conversions between the state dicts."""
from __future__ import annotations

import torch

#: transformers ``InternVLVisionModel`` key -> ours (``{i}`` = block index); the tensors are the same
HF_KEYS: dict[str, str] = {
    "embeddings.cls_token": "embeddings.cls_token",
    "embeddings.position_embeddings": "embeddings.pos_embed",
    "embeddings.patch_embeddings.projection.weight": "embeddings.patch_embed.weight",
    "embeddings.patch_embeddings.projection.bias": "embeddings.patch_embed.bias",
    "encoder.layer.{i}.layernorm_before.weight": "layers.{i}.norm1.weight",
    "encoder.layer.{i}.layernorm_before.bias": "layers.{i}.norm1.bias",
    "encoder.layer.{i}.attention.q_proj.weight": "layers.{i}.attn.q_proj.weight",
    "encoder.layer.{i}.attention.q_proj.bias": "layers.{i}.attn.q_proj.bias",
    "encoder.layer.{i}.attention.k_proj.weight": "layers.{i}.attn.k_proj.weight",
    "encoder.layer.{i}.attention.k_proj.bias": "layers.{i}.attn.k_proj.bias",
    "encoder.layer.{i}.attention.v_proj.weight": "layers.{i}.attn.v_proj.weight",
    "encoder.layer.{i}.attention.v_proj.bias": "layers.{i}.attn.v_proj.bias",
    "encoder.layer.{i}.attention.q_norm.weight": "layers.{i}.attn.q_norm.weight",
    "encoder.layer.{i}.attention.k_norm.weight": "layers.{i}.attn.k_norm.weight",
    "encoder.layer.{i}.attention.projection_layer.weight": "layers.{i}.attn.proj.weight",
    "encoder.layer.{i}.attention.projection_layer.bias": "layers.{i}.attn.proj.bias",
    "encoder.layer.{i}.lambda_1": "layers.{i}.ls1",
    "encoder.layer.{i}.layernorm_after.weight": "layers.{i}.norm2.weight",
    "encoder.layer.{i}.layernorm_after.bias": "layers.{i}.norm2.bias",
    "encoder.layer.{i}.mlp.fc1.weight": "layers.{i}.mlp.fc1.weight",
    "encoder.layer.{i}.mlp.fc1.bias": "layers.{i}.mlp.fc1.bias",
    "encoder.layer.{i}.mlp.fc2.weight": "layers.{i}.mlp.fc2.weight",
    "encoder.layer.{i}.mlp.fc2.bias": "layers.{i}.mlp.fc2.bias",
    "encoder.layer.{i}.lambda_2": "layers.{i}.ls2",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}

#: original OpenGVLab ``InternVisionModel`` key (inside ``vision_model.``) -> ours; ``attn.qkv`` is the fused
#: ``[q; k; v]`` projection (split on dim 0 into ``q_proj`` / ``k_proj`` / ``v_proj``)
ORIGINAL_KEYS: dict[str, str] = {
    "embeddings.class_embedding": "embeddings.cls_token",
    "embeddings.position_embedding": "embeddings.pos_embed",
    "embeddings.patch_embedding.weight": "embeddings.patch_embed.weight",
    "embeddings.patch_embedding.bias": "embeddings.patch_embed.bias",
    "encoder.layers.{i}.norm1.weight": "layers.{i}.norm1.weight",
    "encoder.layers.{i}.norm1.bias": "layers.{i}.norm1.bias",
    "encoder.layers.{i}.attn.q_norm.weight": "layers.{i}.attn.q_norm.weight",
    "encoder.layers.{i}.attn.k_norm.weight": "layers.{i}.attn.k_norm.weight",
    "encoder.layers.{i}.attn.proj.weight": "layers.{i}.attn.proj.weight",
    "encoder.layers.{i}.attn.proj.bias": "layers.{i}.attn.proj.bias",
    "encoder.layers.{i}.ls1": "layers.{i}.ls1",
    "encoder.layers.{i}.norm2.weight": "layers.{i}.norm2.weight",
    "encoder.layers.{i}.norm2.bias": "layers.{i}.norm2.bias",
    "encoder.layers.{i}.mlp.fc1.weight": "layers.{i}.mlp.fc1.weight",
    "encoder.layers.{i}.mlp.fc1.bias": "layers.{i}.mlp.fc1.bias",
    "encoder.layers.{i}.mlp.fc2.weight": "layers.{i}.mlp.fc2.weight",
    "encoder.layers.{i}.mlp.fc2.bias": "layers.{i}.mlp.fc2.bias",
    "encoder.layers.{i}.ls2": "layers.{i}.ls2",
}
QKV_KEYS = {"encoder.layers.{i}.attn.qkv.weight": "layers.{i}.attn.{p}_proj.weight",
            "encoder.layers.{i}.attn.qkv.bias": "layers.{i}.attn.{p}_proj.bias"}


def _pattern_map(table: dict[str, str]) -> dict[tuple[str, str], str]:
    """Split each ``a.{i}.b`` key into ``(prefix, suffix)`` (``("", key)`` for keys without a block index)."""
    out = {}
    for theirs, ours in table.items():
        pre, _, post = theirs.partition("{i}")
        out[(pre, post) if _ else ("", theirs)] = ours
    return out


def _rename(key: str, table: dict[str, str]) -> str | None:
    """``table``'s name for ``key`` (block index carried over), or ``None`` if it has none."""
    if key in table:
        return table[key]
    for (pre, post), ours in _pattern_map(table).items():
        if pre and key.startswith(pre) and key.endswith(post):
            idx = key[len(pre):len(key) - len(post)]
            if idx.isdigit():
                return ours.replace("{i}", idx)
    return None


def hf_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers ``InternVLVisionModel`` state dict -> ours. Keys without a counterpart keep their name (they are
    then reported as unexpected by ``load_strict``); ``embeddings.mask_token`` (masked image modelling) is dropped."""
    return {(_rename(k, HF_KEYS) or k): v for k, v in state.items() if k != "embeddings.mask_token"}


def ours_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tower's state dict -> transformers ``InternVLVisionModel`` names."""
    inverse = {v: k for k, v in HF_KEYS.items()}
    return {(_rename(k, inverse) or k): v for k, v in state.items()}


def original_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An original OpenGVLab ``InternVisionModel`` state dict (``vision_model.`` prefix removed) -> ours; each fused
    ``attn.qkv`` splits into three equal parts on dim 0 (q, k, v)."""
    out = {}
    for k, v in state.items():
        qkv = _rename(k, QKV_KEYS)
        if qkv is not None:
            for part, tensor in zip("qkv", v.chunk(3, dim=0)):
                out[qkv.replace("{p}", part)] = tensor.contiguous()
        else:
            out[_rename(k, ORIGINAL_KEYS) or k] = v
    return out


def ours_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tower's state dict -> original OpenGVLab names (``q_proj``/``k_proj``/``v_proj`` fused into ``attn.qkv``);
    the inverse of ``original_to_ours``. The original has no final norm: ``norm.*`` raises ``ValueError``."""
    inverse = {v: k for k, v in ORIGINAL_KEYS.items()}
    fused = {v.replace("{p}", "q"): k for k, v in QKV_KEYS.items()}
    out = {}
    for k, v in state.items():
        if ".attn.k_proj." in k or ".attn.v_proj." in k:
            continue
        qkv = _rename(k, fused)
        if qkv is not None:
            out[qkv] = torch.cat([state[k.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")])
            continue
        name = _rename(k, inverse)
        if name is None:
            raise ValueError(f"internvit: {k!r} has no counterpart in the original InternViT (final_norm=True?)")
        out[name] = v
    return out
