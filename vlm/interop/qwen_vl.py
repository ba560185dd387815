"""Qwen-VL / Qwen-VL-Chat checkpoints in their original layout (``model_type: qwen`` with a ``visual`` sub-config,
the remote-code ``QWenLMHeadModel``), imported and exported without running their code: the config is read as data,
the tensors are renamed (and the fused ones split or re-packed), the tokenizer is built from ``qwen.tiktoken``.

| original (``config.json`` / tensor)                         | vlm                                                    |
| ----------------------------------------------------------- | ------------------------------------------------------ |
| ``visual``: ``width``, ``layers``, ``heads``, ``mlp_ratio``  | ``open_clip`` tower, ``class_token=False``, 16x16     |
| ``image_size``, ``patch_size``                              | position table resized per image (``pos_grid=16``)    |
| ``transformer.visual.conv1`` / ``positional_embedding``     | ``encoder.model.conv1`` / ``positional_embedding``    |
| ``transformer.visual.ln_pre``                               | ``encoder.model.ln_pre``                              |
| ``...transformer.resblocks.N.attn.in_proj`` (per head q,k,v) | ``...resblocks.N.attn.in_proj_weight/bias`` (q; k; v) |
| ``...resblocks.N.{ln_1,ln_2,attn.out_proj,mlp.c_fc,mlp.c_proj}`` | the same names                                    |
| ``transformer.visual.attn_pool.{query,kv_proj,attn,ln_q,ln_kv}`` | ``connector.*`` (``resampler``)                   |
| ``transformer.visual.attn_pool.pos_embed`` (frozen sin-cos)  | ``connector.pos_embed`` (computed; checked equal)    |
| ``transformer.visual.ln_post`` / ``proj`` (``x @ proj``)     | ``connector.ln_post`` / ``connector.proj.weight`` = proj^T |
| ``transformer.wte`` / ``transformer.ln_f`` / ``lm_head``     | ``llm.model.model.embed_tokens`` / ``model.norm`` / ``lm_head`` |
| ``transformer.h.N.ln_1`` / ``ln_2`` (RMSNorm)                | ``layers.N.input_layernorm`` / ``post_attention_layernorm`` |
| ``transformer.h.N.attn.c_attn`` (q; k; v, with bias)         | ``layers.N.self_attn.q_proj`` / ``k_proj`` / ``v_proj`` |
| ``transformer.h.N.attn.c_proj`` (no bias)                    | ``layers.N.self_attn.o_proj``                         |
| ``transformer.h.N.mlp.w1`` / ``w2`` / ``c_proj``             | ``layers.N.mlp.up_proj`` / ``gate_proj`` / ``down_proj`` |

Qwen's MLP is ``c_proj(w1(x) * silu(w2(x)))``: ``w2`` is the gate, ``w1`` the up projection. The text model is a
transformers Qwen2 (``hidden_size``, ``intermediate_size / 2``, ``num_attention_heads`` key/value heads too,
``layer_norm_epsilon``, ``rotary_emb_base``). Qwen's ``use_dynamic_ntk`` / ``use_logn_attn`` change nothing up to
``seq_length`` tokens (2048), the length it was trained at; past it the two models differ. The image token is
``<imgpad>`` (``visual.image_start_id + 2``): each image is ``<img>`` + 256 of them + ``</img>``.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from vlm import connectors, encoders
from vlm import llm as llms
from vlm.dtypes import resolve_dtype
from vlm.interop.common import dtype_name
from vlm.interop.formats import FORMATS, HFFormat
from vlm.model import VLM
from vlm.pretrained import CONFIG_FILE, check_weights, read_config, read_weights

MODEL_TYPE = "qwen"
V, T = "transformer.visual.", "transformer."
#: OpenAI CLIP's normalization, which Qwen-VL's image transform uses
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
POS_GRID = 16  # Qwen-VL's ViT position table: 256 rows, a 16 x 16 grid
#: Qwen-VL's ``visual`` keys and the defaults of its published config
VISUAL_DEFAULTS = {"heads": 16, "image_size": 448, "layers": 48, "mlp_ratio": 4.9231, "output_dim": 4096,
                   "patch_size": 14, "width": 1664, "n_queries": 256}
#: ``config.json`` keys of the text model and their published values (Qwen-VL-Chat)
TEXT_DEFAULTS = {"hidden_size": 4096, "intermediate_size": 22016, "kv_channels": 128, "layer_norm_epsilon": 1e-6,
                 "max_position_embeddings": 8192, "num_attention_heads": 32, "num_hidden_layers": 32,
                 "no_bias": True, "rotary_emb_base": 10000, "rotary_pct": 1.0, "seq_length": 2048,
                 "tie_word_embeddings": False, "vocab_size": 151936}


class Dims:
    """The architecture a Qwen-VL ``config.json`` states (defaults: the published Qwen-VL-Chat's)."""

    def __init__(self, cfg: dict[str, Any], where: str) -> None:
        visual = cfg.get("visual") if isinstance(cfg.get("visual"), dict) else None
        if visual is None:
            raise ValueError(f"{where}: model_type 'qwen' without a 'visual' sub-config is a Qwen text model; vlm "
                             f"imports Qwen-VL (a 'visual' dict with width, layers, heads, ...)")
        self.v = {k: visual.get(k, d) for k, d in VISUAL_DEFAULTS.items()}
        self.t = {k: cfg.get(k, d) for k, d in TEXT_DEFAULTS.items()}
        self.image_start_id = visual.get("image_start_id")
        t = self.t
        problems = []
        if t["kv_channels"] * t["num_attention_heads"] != t["hidden_size"]:
            problems.append(f"kv_channels={t['kv_channels']} x num_attention_heads={t['num_attention_heads']} != "
                            f"hidden_size={t['hidden_size']}")
        if t["rotary_pct"] != 1.0:
            problems.append(f"rotary_pct={t['rotary_pct']} (Qwen2 rotates every channel: 1.0)")
        if not t["no_bias"]:
            problems.append("no_bias=false (Qwen2's o_proj and MLP have no bias)")
        if self.v["output_dim"] != t["hidden_size"]:
            problems.append(f"visual.output_dim={self.v['output_dim']} != hidden_size={t['hidden_size']} (the "
                            f"resampler's tokens enter the LLM as they are)")
        if math.isqrt(self.v["n_queries"]) ** 2 != self.v["n_queries"]:
            problems.append(f"visual.n_queries={self.v['n_queries']} is not a square number")
        if problems:
            raise ValueError(f"{where}: " + "; ".join(problems))
        self.mlp_width = int(self.v["width"] * self.v["mlp_ratio"])
        self.image_token_id = None if self.image_start_id is None else int(self.image_start_id) + 2

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every original tensor name -> the shape this config gives it."""
        v, t = self.v, self.t
        w, d, h, m = v["width"], v["output_dim"], t["hidden_size"], t["intermediate_size"] // 2
        out: dict[str, tuple[int, ...]] = {
            V + "conv1.weight": (w, 3, v["patch_size"], v["patch_size"]),
            V + "positional_embedding": (POS_GRID * POS_GRID, w),
            V + "ln_pre.weight": (w,), V + "ln_pre.bias": (w,),
            V + "attn_pool.query": (v["n_queries"], d), V + "attn_pool.pos_embed": (v["n_queries"], d),
            V + "attn_pool.attn.in_proj_weight": (3 * d, d), V + "attn_pool.attn.in_proj_bias": (3 * d,),
            V + "attn_pool.attn.out_proj.weight": (d, d), V + "attn_pool.attn.out_proj.bias": (d,),
            V + "attn_pool.ln_q.weight": (d,), V + "attn_pool.ln_q.bias": (d,),
            V + "attn_pool.ln_kv.weight": (d,), V + "attn_pool.ln_kv.bias": (d,),
            V + "ln_post.weight": (d,), V + "ln_post.bias": (d,), V + "proj": (d, d),
            T + "wte.weight": (t["vocab_size"], h), T + "ln_f.weight": (h,), "lm_head.weight": (t["vocab_size"], h),
        }
        if w != d:
            out[V + "attn_pool.kv_proj.weight"] = (d, w)
        for i in range(v["layers"]):
            b = f"{V}transformer.resblocks.{i}."
            out.update({b + "ln_1.weight": (w,), b + "ln_1.bias": (w,), b + "ln_2.weight": (w,), b + "ln_2.bias": (w,),
                        b + "attn.in_proj.weight": (3 * w, w), b + "attn.in_proj.bias": (3 * w,),
                        b + "attn.out_proj.weight": (w, w), b + "attn.out_proj.bias": (w,),
                        b + "mlp.c_fc.weight": (self.mlp_width, w), b + "mlp.c_fc.bias": (self.mlp_width,),
                        b + "mlp.c_proj.weight": (w, self.mlp_width), b + "mlp.c_proj.bias": (w,)})
        for i in range(t["num_hidden_layers"]):
            b = f"{T}h.{i}."
            out.update({b + "ln_1.weight": (h,), b + "ln_2.weight": (h,), b + "attn.c_attn.weight": (3 * h, h),
                        b + "attn.c_attn.bias": (3 * h,), b + "attn.c_proj.weight": (h, h),
                        b + "mlp.w1.weight": (m, h), b + "mlp.w2.weight": (m, h), b + "mlp.c_proj.weight": (h, m)})
        return out

    def text_config(self) -> dict[str, Any]:
        """The transformers Qwen2 config of the text model."""
        t = self.t
        return {"model_type": "qwen2", "vocab_size": t["vocab_size"], "hidden_size": t["hidden_size"],
                "intermediate_size": t["intermediate_size"] // 2, "num_hidden_layers": t["num_hidden_layers"],
                "num_attention_heads": t["num_attention_heads"], "num_key_value_heads": t["num_attention_heads"],
                "hidden_act": "silu", "max_position_embeddings": t["max_position_embeddings"],
                "rms_norm_eps": t["layer_norm_epsilon"], "tie_word_embeddings": bool(t["tie_word_embeddings"]),
                "rope_parameters": {"rope_type": "default", "rope_theta": float(t["rotary_emb_base"])},
                "use_sliding_window": False, "attention_dropout": 0.0}

    def encoder_config(self, dtype: torch.dtype) -> dict[str, Any]:
        v = self.v
        vision_cfg = {"image_size": v["image_size"], "patch_size": v["patch_size"], "width": v["width"],
                      "layers": v["layers"], "head_width": v["width"] // v["heads"], "mlp_ratio": v["mlp_ratio"],
                      "norm_kwargs": {"eps": 1e-6}}
        return {"name": "open_clip", "model_config": {"embed_dim": v["output_dim"], "vision_cfg": vision_cfg},
                "class_token": False, "pos_grid": POS_GRID, "feature_layer": -1, "select": "patch",
                "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "dtype": dtype_name(dtype)}


def check_shapes(state: dict[str, torch.Tensor], dims: Dims, file: Path) -> None:
    """``ValueError`` naming ``file`` and each key that is missing, unexpected or shaped unlike the config says."""
    expected = dims.shapes()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs config {expected[k]}" for k in sorted(set(expected) & set(state))
              if tuple(state[k].shape) != expected[k]]
    if missing or unexpected or shapes:
        raise ValueError(f"from_hf: {str(file)!r} does not match its config.json (Qwen-VL layout): "
                         f"{len(shapes)} shape mismatch(es) {shapes[:6]}, {len(missing)} missing key(s) "
                         f"{missing[:6]}, {len(unexpected)} unexpected key(s) {unexpected[:6]}")


def heads_interleaved_to_stacked(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Qwen-VL's ViT ``in_proj`` rows (per head: q, k, v) -> ``nn.MultiheadAttention``'s (all q; all k; all v)."""
    return x.reshape(heads, 3, -1, *x.shape[1:]).transpose(0, 1).reshape(x.shape)


def heads_stacked_to_interleaved(x: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of :func:`heads_interleaved_to_stacked`."""
    return x.reshape(3, heads, -1, *x.shape[1:]).transpose(0, 1).reshape(x.shape)


def to_ours(state: dict[str, torch.Tensor], dims: Dims) -> dict[str, dict[str, torch.Tensor]]:
    """Original tensors -> ``{"encoder": ..., "connector": ..., "llm": ...}`` state dicts (of ``encoder.model``,
    the connector, ``llm.model``). ``attn_pool.pos_embed`` is left out (the resampler computes it)."""
    enc, con, lm = {}, {}, {}
    heads = dims.v["heads"]
    for k, x in state.items():
        if k.startswith(V + "attn_pool."):
            name = k[len(V + "attn_pool."):]
            if name != "pos_embed":
                con[name] = x
        elif k.startswith(V + "ln_post."):
            con[k[len(V):]] = x
        elif k == V + "proj":
            con["proj.weight"] = x.t().contiguous()
        elif k.startswith(V):
            name = k[len(V):]
            if name.endswith(("attn.in_proj.weight", "attn.in_proj.bias")):
                name = name.replace("attn.in_proj.", "attn.in_proj_")
                x = heads_interleaved_to_stacked(x, heads)
            enc[name] = x
    h = dims.t["hidden_size"]
    lm["model.embed_tokens.weight"] = state[T + "wte.weight"]
    lm["model.norm.weight"] = state[T + "ln_f.weight"]
    lm["lm_head.weight"] = state["lm_head.weight"]
    for i in range(dims.t["num_hidden_layers"]):
        src, dst = f"{T}h.{i}.", f"model.layers.{i}."
        for part, (w, b) in zip(("q", "k", "v"), zip(state[src + "attn.c_attn.weight"].split(h),
                                                     state[src + "attn.c_attn.bias"].split(h))):
            lm[f"{dst}self_attn.{part}_proj.weight"], lm[f"{dst}self_attn.{part}_proj.bias"] = w, b
        for theirs, ours in LAYER_NAMES.items():
            lm[dst + ours] = state[src + theirs]
    return {"encoder": enc, "connector": con, "llm": lm}


#: per text layer: original name -> Qwen2 name (the fused ``c_attn`` is split apart)
LAYER_NAMES = {"ln_1.weight": "input_layernorm.weight", "ln_2.weight": "post_attention_layernorm.weight",
               "attn.c_proj.weight": "self_attn.o_proj.weight", "mlp.w1.weight": "mlp.up_proj.weight",
               "mlp.w2.weight": "mlp.gate_proj.weight", "mlp.c_proj.weight": "mlp.down_proj.weight"}


def to_original(model: VLM, dims: Dims) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_ours` on a model's tensors (``attn_pool.pos_embed`` from the resampler)."""
    out: dict[str, torch.Tensor] = {}
    heads = dims.v["heads"]
    for k, x in model.encoder.model.state_dict().items():
        if ".attn.in_proj_" in k:
            x = heads_stacked_to_interleaved(x, heads)
            k = k.replace("attn.in_proj_", "attn.in_proj.")
        out[V + k] = x
    con = model.connector.state_dict()
    for k, x in con.items():
        if k.startswith("ln_post."):
            out[V + k] = x
        elif k == "proj.weight":
            out[V + "proj"] = x.t().contiguous()
        else:
            out[V + "attn_pool." + k] = x
    out[V + "attn_pool.pos_embed"] = model.connector.pos_embed.to(model.connector.query.dtype)
    lm = model.llm.model.state_dict()
    out[T + "wte.weight"], out[T + "ln_f.weight"] = lm["model.embed_tokens.weight"], lm["model.norm.weight"]
    out["lm_head.weight"] = lm["lm_head.weight"]
    for i in range(dims.t["num_hidden_layers"]):
        src, dst = f"model.layers.{i}.", f"{T}h.{i}."
        out[dst + "attn.c_attn.weight"] = torch.cat([lm[f"{src}self_attn.{p}_proj.weight"] for p in "qkv"])
        out[dst + "attn.c_attn.bias"] = torch.cat([lm[f"{src}self_attn.{p}_proj.bias"] for p in "qkv"])
        for theirs, ours in LAYER_NAMES.items():
            out[dst + theirs] = lm[src + ours]
    return {k: v.contiguous() for k, v in out.items()}


def from_original(path: str | os.PathLike, *, dtype: str | torch.dtype | None = None, tokenizer: bool = True,
                  attn_implementation: str = "sdpa") -> VLM:
    """Import a local Qwen-VL / Qwen-VL-Chat directory (``config.json`` with ``model_type: qwen`` and ``visual``,
    safetensors or ``pytorch_model.bin`` read with ``weights_only``, ``qwen.tiktoken``) as a ``vlm.VLM``. Every
    tensor is checked against the config before anything is built."""
    from vlm.data.qwen_tokenizer import IMAGE_PAD, load_qwen_tokenizer
    from vlm.data.templates import build_template
    from vlm.generation import generation_settings

    path = Path(path)
    where = f"from_hf: {str(path / CONFIG_FILE)!r}"
    cfg = read_config(path, "from_hf", "an original Qwen-VL directory (model_type 'qwen' with 'visual')")
    dims = Dims(cfg, where)
    tok = load_qwen_tokenizer(path) if tokenizer else None  # a missing qwen.tiktoken is named before the weights
    token_id = tok.convert_tokens_to_ids(IMAGE_PAD) if tok is not None else dims.image_token_id
    if token_id is None:
        raise ValueError(f"{where}: visual.image_start_id is missing; without the tokenizer the image token id "
                         f"(<imgpad> = image_start_id + 2) is unknown")
    if dims.image_token_id is not None and token_id != dims.image_token_id:
        raise ValueError(f"{where}: visual.image_start_id={dims.image_start_id}, but qwen.tiktoken puts <img> at "
                         f"{token_id - 2}; the vocabulary file does not belong to this config")
    file = check_weights(path, "from_hf")
    state = read_weights(path, "from_hf")
    check_shapes(state, dims, file)
    torch_dtype = resolve_dtype(dtype) or torch.float32
    encoder = encoders.build(dims.encoder_config(torch_dtype))
    lm = llms.build({"name": "hf_causal_lm", "config": dims.text_config(), "attn_implementation": attn_implementation,
                     "dtype": dtype_name(torch_dtype)})
    v = dims.v
    connector = connectors.build({"name": "resampler", "num_queries": v["n_queries"], "dim": v["output_dim"],
                                  "num_heads": v["output_dim"] // 128, "eps": 1e-6},
                                 in_dim=encoder.hidden_size, out_dim=lm.hidden_size).to(torch_dtype)
    pos = state[V + "attn_pool.pos_embed"].float()
    if not torch.allclose(pos, connector.pos_embed.float(), atol=1e-5, rtol=0):
        raise ValueError(f"from_hf: {str(file)!r} key {V}attn_pool.pos_embed is not the 2D sin-cos table the "
                         f"resampler computes (max diff {(pos - connector.pos_embed.float()).abs().max():.3g}); "
                         f"expected Qwen-VL's frozen MAE-layout position codes")
    from vlm.pretrained import load_strict

    parts = to_ours(state, dims)
    with torch.no_grad():
        connector.pos_embed.copy_(pos.to(connector.pos_embed.dtype))  # the file's own table, written back on export
        load_strict(encoder.model, parts["encoder"], f"from_hf: {str(file)!r} transformer.visual")
        load_strict(connector, parts["connector"], f"from_hf: {str(file)!r} transformer.visual.attn_pool")
        load_strict(lm.model, parts["llm"], f"from_hf: {str(file)!r} transformer")
    model = VLM(encoder, connector, lm, image_token_id=int(token_id), image_token=IMAGE_PAD)
    model.tokenizer = tok
    model.image_preprocessing = {"resize_mode": "resize"}
    model.generation = generation_settings(tok, build_template("qwen_vl")) if tok is not None else {}
    return model.eval()


def qwen_vl_problems(model: Any) -> list[str]:
    """Why ``model`` cannot be written in Qwen-VL's layout (empty when it can)."""
    from vlm.connectors.resampler import Resampler
    from vlm.encoders.open_clip_tower import GridPosViT, OpenCLIPEncoder
    from vlm.llm.hf_causal_lm import HFCausalLM

    problems = []
    enc, con, lm = model.encoder, model.connector, model.llm
    if not (isinstance(enc, OpenCLIPEncoder) and isinstance(enc.tower, GridPosViT)
            and enc.tower.pos_grid == (POS_GRID, POS_GRID)):
        problems.append(f"the encoder must be open_clip with class_token=False, pos_grid={POS_GRID} (Qwen-VL's ViT)")
    elif len(enc.blocks()) != enc.model_config["vision_cfg"]["layers"]:
        problems.append("the encoder's feature_layer must be the last block (Qwen-VL reads the last one)")
    if not isinstance(con, Resampler):
        problems.append(f"the connector is {type(con).__name__}; Qwen-VL's is the resampler")
    elif con.attn.embed_dim != con.out_dim or con.attn.num_heads != con.out_dim // 128:
        problems.append("the resampler must be as wide as the LLM (dim = out_dim) with dim // 128 heads")
    if not isinstance(lm, HFCausalLM) or lm.text_config.model_type != "qwen2":
        problems.append("the LLM must be a transformers Qwen2 (hf_causal_lm)")
    elif lm.text_config.num_key_value_heads != lm.text_config.num_attention_heads:
        problems.append("the Qwen2 LLM must have as many key/value heads as heads (Qwen-7B has no GQA)")
    tok = getattr(model, "tokenizer", None)
    if tok is None or "<imgpad>" not in tok.get_vocab():
        problems.append("the tokenizer must be Qwen's (qwen.tiktoken, <imgpad>)")
    return problems


def to_original_dir(model: Any, path: str | os.PathLike, *, dtype: str | torch.dtype | None = None,
                    processor: bool = True) -> Path:
    """Write ``model`` in Qwen-VL's original layout: ``config.json``, ``model.safetensors``, ``qwen.tiktoken`` and
    ``tokenizer_config.json`` (the remote-code ``*.py`` files are not vlm's to ship: copy them from the published
    checkpoint to run the original code)."""
    from safetensors.torch import save_file

    from vlm.data.qwen_tokenizer import save_qwen_tiktoken

    problems = qwen_vl_problems(model)
    if problems:
        raise ValueError("to_hf: this model cannot be exported as Qwen-VL: " + "; ".join(problems))
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tcfg, enc, con = model.llm.text_config, model.encoder, model.connector
    vision_cfg = enc.model_config["vision_cfg"]
    tok = model.tokenizer
    rope = (getattr(tcfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    visual = {"heads": vision_cfg["width"] // vision_cfg["head_width"], "image_size": enc.image_size,
              "image_start_id": tok.convert_tokens_to_ids("<img>"), "layers": vision_cfg["layers"],
              "mlp_ratio": vision_cfg["mlp_ratio"], "output_dim": con.out_dim, "patch_size": enc.patch_size,
              "width": vision_cfg["width"], "n_queries": con.query.shape[0]}
    cfg = {"architectures": ["QWenLMHeadModel"], "model_type": MODEL_TYPE,
           "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                        "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
           "hidden_size": tcfg.hidden_size, "intermediate_size": 2 * tcfg.intermediate_size,
           "kv_channels": tcfg.hidden_size // tcfg.num_attention_heads,
           "layer_norm_epsilon": tcfg.rms_norm_eps, "max_position_embeddings": tcfg.max_position_embeddings,
           "no_bias": True, "num_attention_heads": tcfg.num_attention_heads,
           "num_hidden_layers": tcfg.num_hidden_layers, "rotary_emb_base": rope, "rotary_pct": 1.0,
           "seq_length": 2048, "tie_word_embeddings": False, "tokenizer_type": "QWenTokenizer",
           "vocab_size": model.llm.vocab_size, "visual": visual}
    dims = Dims(cfg, "to_hf")
    state = to_original(model, dims)
    torch_dtype = resolve_dtype(dtype)
    if torch_dtype is not None:
        state = {k: v.to(torch_dtype) for k, v in state.items()}
    save_file({k: v.detach().cpu() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    if processor:
        save_qwen_tiktoken(tok, out)
        (out / "tokenizer_config.json").write_text(json.dumps({
            "model_max_length": 8192, "tokenizer_class": "QWenTokenizer",
            "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}}, indent=2) + "\n")
    return out


@FORMATS.register("qwen_vl")
class QwenVLFormat(HFFormat):
    """Qwen-VL / Qwen-VL-Chat in the original remote-code layout, read and written as data."""

    model_type = MODEL_TYPE
    hf_class = "QWenLMHeadModel (original Qwen-VL checkpoint, imported without its remote code)"
    loads_in_transformers = False
    from_hf = staticmethod(from_original)
    to_hf = staticmethod(to_original_dir)
    problems = staticmethod(qwen_vl_problems)
