"""Shared helpers for the Qwen-VL tests: a tiny ``qwen.tiktoken`` trained in code (byte-pair merges over Qwen's
pre-tokenized pieces; the 256 single bytes ranked in a shuffled order, so no id equals its byte by construction)."""
from __future__ import annotations

import base64
import itertools
import random
from collections import Counter
from pathlib import Path

TRAIN_TEXT = (
    "The quick brown fox jumps over the lazy dog. It's what we'll see: they're here, I'd say. "
    "Picture 1: <img>a.jpg</img>\nWhat is in the image? The dog is at <box>(12,40),(388,960)</box>. "
    "图中是一只拉布拉多犬。这是什么城市？上面两张图片分别是哪两个城市？请对它们进行对比。 "
    "numbers 2024 1000 3.14159   spaces\n\n  tabs\t\there "
) * 3


def train_ranks(text: str = TRAIN_TEXT, merges: int = 150, seed: int = 0) -> dict[bytes, int]:
    """``{token bytes: rank}``: the 256 bytes (shuffled ranks 0..255), then ``merges`` byte-pair merges, each the most
    frequent adjacent pair of the pieces Qwen's pattern splits ``text`` into (ties: the smaller pair)."""
    import regex

    from vlm.data.qwen_tokenizer import PAT_STR

    order = list(range(256))
    random.Random(seed).shuffle(order)
    ranks = {bytes([b]): i for i, b in enumerate(order)}
    words = Counter(tuple(bytes([b]) for b in piece.encode()) for piece in regex.findall(PAT_STR, text))
    for _ in range(merges):
        pairs: Counter = Counter()
        for word, n in words.items():
            for a, b in itertools.pairwise(word):
                pairs[(a, b)] += n
        if not pairs:
            break
        best = max(pairs.values())
        a, b = min(p for p, n in pairs.items() if n == best)
        if a + b not in ranks:
            ranks[a + b] = len(ranks)
        merged = Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return ranks


def write_tiktoken(path: Path, ranks: dict[bytes, int]) -> Path:
    """``path/qwen.tiktoken`` in the published layout (``base64 rank`` lines in rank order)."""
    path.mkdir(parents=True, exist_ok=True)
    file = path / "qwen.tiktoken"
    file.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in sorted(ranks.items(),
                                                                                    key=lambda kv: kv[1])))
    return file


# ------------------------------------------------------------------------------------------ a tiny Qwen-VL directory
VISUAL = {"heads": 2, "image_size": 56, "layers": 2, "mlp_ratio": 2.0, "output_dim": 128, "patch_size": 14,
          "width": 32, "n_queries": 256}
TEXT = {"hidden_size": 128, "intermediate_size": 192, "kv_channels": 64, "layer_norm_epsilon": 1e-6,
        "max_position_embeddings": 2048, "num_attention_heads": 2, "num_hidden_layers": 2, "no_bias": True,
        "rotary_emb_base": 10000, "rotary_pct": 1.0, "seq_length": 2048, "tie_word_embeddings": False,
        "vocab_size": 640}


def mae_sincos(dim: int, side: int):  # -> torch.Tensor
    """The MAE 2D sin-cos table Qwen-VL's resampler freezes: the first half of the channels encodes the column,
    the second the row, each ``[sin(p w_k), cos(p w_k)]`` with ``w_k = 10000^(-k / (dim / 4))`` (float64, cast)."""
    import torch

    k = torch.arange(dim // 4, dtype=torch.float64) / (dim / 4)
    omega = 1.0 / 10000 ** k
    rows, cols = torch.meshgrid(torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64),
                                indexing="ij")
    parts = []
    for p in (cols.reshape(-1), rows.reshape(-1)):
        a = p[:, None] * omega[None]
        parts += [a.sin(), a.cos()]
    return torch.cat(parts, 1).float()


def original_config(ranks_len: int) -> dict:
    return {"architectures": ["QWenLMHeadModel"], "model_type": "qwen",
            "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                         "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
            **TEXT, "visual": {**VISUAL, "image_start_id": ranks_len + 214}}


def random_visual_state(seed: int = 0) -> dict:
    """Qwen-VL-named vision tensors (``transformer.visual.*``) for :data:`VISUAL`, random."""
    import torch

    g = torch.Generator().manual_seed(seed)
    v = VISUAL
    w, d, mlp = v["width"], v["output_dim"], int(v["width"] * v["mlp_ratio"])

    def r(*shape, scale=0.1):
        return torch.randn(*shape, generator=g) * scale

    def ln(n):
        return {"weight": 1 + r(n), "bias": r(n)}

    s = {"conv1.weight": r(w, 3, v["patch_size"], v["patch_size"]), "positional_embedding": r(256, w, scale=0.5),
         "attn_pool.query": r(v["n_queries"], d, scale=0.5), "attn_pool.pos_embed": mae_sincos(d, 16),
         "attn_pool.kv_proj.weight": r(d, w, scale=0.3), "attn_pool.attn.in_proj_weight": r(3 * d, d),
         "attn_pool.attn.in_proj_bias": r(3 * d), "attn_pool.attn.out_proj.weight": r(d, d),
         "attn_pool.attn.out_proj.bias": r(d), "proj": r(d, d)}
    for name, n in (("ln_pre", w), ("attn_pool.ln_q", d), ("attn_pool.ln_kv", d), ("ln_post", d)):
        s.update({f"{name}.{k}": t for k, t in ln(n).items()})
    for i in range(v["layers"]):
        b = f"transformer.resblocks.{i}."
        s.update({b + "attn.in_proj.weight": r(3 * w, w, scale=0.3), b + "attn.in_proj.bias": r(3 * w),
                  b + "attn.out_proj.weight": r(w, w), b + "attn.out_proj.bias": r(w),
                  b + "mlp.c_fc.weight": r(mlp, w), b + "mlp.c_fc.bias": r(mlp),
                  b + "mlp.c_proj.weight": r(w, mlp), b + "mlp.c_proj.bias": r(w)})
        for name in ("ln_1", "ln_2"):
            s.update({f"{b}{name}.{k}": t for k, t in ln(w).items()})
    return {"transformer.visual." + k: t for k, t in s.items()}


def qwen2_reference(seed: int = 0):
    """A random transformers Qwen2ForCausalLM of :data:`TEXT`'s architecture (fp32, eval)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=TEXT["vocab_size"], hidden_size=TEXT["hidden_size"],
                      intermediate_size=TEXT["intermediate_size"] // 2, num_hidden_layers=TEXT["num_hidden_layers"],
                      num_attention_heads=TEXT["num_attention_heads"], num_key_value_heads=TEXT["num_attention_heads"],
                      rms_norm_eps=1e-6, max_position_embeddings=2048, tie_word_embeddings=False,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1)
    return model


def qwen_text_state(hf, swap_mlp: bool = False) -> dict:
    """``hf`` (Qwen2) written in Qwen's layout: q, k, v fused into ``c_attn``, ``w1`` = up, ``w2`` = gate
    (``swap_mlp``: the wrong way round, to show the test catches it)."""
    import torch

    s = hf.state_dict()
    out = {"transformer.wte.weight": s["model.embed_tokens.weight"], "transformer.ln_f.weight": s["model.norm.weight"],
           "lm_head.weight": s["lm_head.weight"]}
    up, gate = ("gate", "up") if swap_mlp else ("up", "gate")
    for i in range(TEXT["num_hidden_layers"]):
        a, b = f"model.layers.{i}.", f"transformer.h.{i}."
        out.update({
            b + "ln_1.weight": s[a + "input_layernorm.weight"], b + "ln_2.weight": s[a + "post_attention_layernorm.weight"],
            b + "attn.c_attn.weight": torch.cat([s[f"{a}self_attn.{p}_proj.weight"] for p in "qkv"]),
            b + "attn.c_attn.bias": torch.cat([s[f"{a}self_attn.{p}_proj.bias"] for p in "qkv"]),
            b + "attn.c_proj.weight": s[a + "self_attn.o_proj.weight"],
            b + "mlp.w1.weight": s[f"{a}mlp.{up}_proj.weight"], b + "mlp.w2.weight": s[f"{a}mlp.{gate}_proj.weight"],
            b + "mlp.c_proj.weight": s[a + "mlp.down_proj.weight"]})
    return {k: v.clone().contiguous() for k, v in out.items()}


def write_qwen_vl_dir(path: Path, ranks: dict, text_state: dict, visual_state: dict) -> Path:
    """A Qwen-VL-layout directory: config.json, model.safetensors (Qwen's names), qwen.tiktoken, and the
    tokenizer_config.json whose auto_map names the remote code (never run)."""
    import json

    from safetensors.torch import save_file

    write_tiktoken(path, ranks)
    (path / "config.json").write_text(json.dumps(original_config(len(ranks))))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "QWenTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}}))
    save_file({**text_state, **visual_state}, str(path / "model.safetensors"))
    return path
