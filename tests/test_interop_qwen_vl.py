"""Original Qwen-VL checkpoints (vlm.interop.qwen_vl): a tiny Qwen-VL-layout directory (Qwen's tensor names, config
keys and qwen.tiktoken) imports without remote code; its text logits equal transformers' Qwen2 with the same weights,
its image features equal Qwen-VL's vision forward written out here from the public semantics (per-head q,k,v rows,
16x16 position table resized bicubically, attn_pool, ln_post, x @ proj); export writes the original layout back bit
for bit, both ways through python -m vlm.convert; bad directories fail naming the file and key."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.nn import functional as F

import vlm
from tests.qwen_vl_fixtures import (
    VISUAL,
    qwen2_reference,
    qwen_text_state,
    random_visual_state,
    train_ranks,
    write_qwen_vl_dir,
)
from vlm.interop import from_hf, to_hf

ATOL = 1e-4


@pytest.fixture(scope="module")
def ranks():
    return train_ranks()


@pytest.fixture(scope="module")
def parts():
    return qwen2_reference(), random_visual_state()


@pytest.fixture(scope="module")
def original(tmp_path_factory, ranks, parts):
    hf, visual = parts
    return write_qwen_vl_dir(tmp_path_factory.mktemp("qwen_vl_orig"), ranks, qwen_text_state(hf), visual)


@pytest.fixture(scope="module")
def model(original):
    return from_hf(original)


def qwen_visual_forward(state: dict, pixel_values: torch.Tensor) -> torch.Tensor:
    """Qwen-VL's ``VisionTransformer.forward`` on ``state`` (its own tensor names), written from its public
    semantics: (N, 3, S, S) -> (N, n_queries, output_dim)."""
    v = VISUAL
    s = {k.removeprefix("transformer.visual."): t for k, t in state.items() if k.startswith("transformer.visual.")}
    w, heads = v["width"], v["heads"]
    hd = w // heads

    def ln(x, name):
        return F.layer_norm(x, x.shape[-1:], s[name + ".weight"], s[name + ".bias"], eps=1e-6)

    def abs_pos(table, n):  # get_abs_pos: a square table resized to a square grid of n positions
        src, dst = math.isqrt(table.shape[0]), math.isqrt(n)
        if src == dst:
            return table
        grid = table.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
        return F.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).flatten(0, 2)

    x = F.conv2d(pixel_values, s["conv1.weight"], stride=v["patch_size"]).flatten(2).transpose(1, 2)
    n, length = x.shape[:2]
    x = ln(x + abs_pos(s["positional_embedding"], length), "ln_pre")
    for i in range(v["layers"]):
        b = f"transformer.resblocks.{i}."
        qkv = F.linear(ln(x, b + "ln_1"), s[b + "attn.in_proj.weight"], s[b + "attn.in_proj.bias"])
        q, k, val = qkv.view(n, length, heads, 3 * hd).split(hd, dim=-1)  # per head: q, k, v
        att = (q.transpose(1, 2) / math.sqrt(hd)) @ k.transpose(1, 2).transpose(-2, -1)
        o = (att.softmax(-1) @ val.transpose(1, 2)).transpose(1, 2).reshape(n, length, w)
        x = x + F.linear(o, s[b + "attn.out_proj.weight"], s[b + "attn.out_proj.bias"])
        h = F.gelu(F.linear(ln(x, b + "ln_2"), s[b + "mlp.c_fc.weight"], s[b + "mlp.c_fc.bias"]))
        x = x + F.linear(h, s[b + "mlp.c_proj.weight"], s[b + "mlp.c_proj.bias"])
    d = v["output_dim"]
    kv = ln(F.linear(x, s["attn_pool.kv_proj.weight"]), "attn_pool.ln_kv")
    query = ln(s["attn_pool.query"], "attn_pool.ln_q") + s["attn_pool.pos_embed"]
    mha = torch.nn.MultiheadAttention(d, d // 128, batch_first=True)
    mha.load_state_dict({k.removeprefix("attn_pool.attn."): t for k, t in s.items() if k.startswith("attn_pool.attn.")})
    out = mha(query.expand(n, -1, -1), kv + abs_pos(s["attn_pool.pos_embed"], length), kv, need_weights=False)[0]
    return ln(out, "ln_post") @ s["proj"]


def prompt_ids(tok, n_images: int) -> list[int]:
    span = "<img>" + "<imgpad>" * VISUAL["n_queries"] + "</img>\n"
    text = "<|im_start|>user\n" + "".join(f"Picture {k + 1}: {span}" for k in range(n_images))
    return tok(text + "What is in the images?<|im_end|>\n<|im_start|>assistant\n")["input_ids"]


def reference_logits(hf, state, ids: list[int], pixel_values: torch.Tensor, img_id: int) -> torch.Tensor:
    """Qwen-VL's injection: the positions between each <img> and </img> take that image's features."""
    ids_t = torch.tensor([ids])
    embeds = hf.get_input_embeddings()(ids_t).clone()
    feats = qwen_visual_forward(state, pixel_values)
    starts = (ids_t[0] == img_id).nonzero().flatten().tolist()
    for k, a in enumerate(starts):
        embeds[0, a + 1:a + 1 + feats.shape[1]] = feats[k]
    return hf(inputs_embeds=embeds).logits


@torch.no_grad()
def test_logits_equal_qwen2_and_qwen_vl_vision(model, parts, original):
    hf, _ = parts
    state = load_file(str(original / "model.safetensors"))
    tok = model.tokenizer
    torch.manual_seed(0)
    for n_images in (1, 2):
        ids = prompt_ids(tok, n_images)
        pixel_values = torch.randn(n_images, 3, VISUAL["image_size"], VISUAL["image_size"])
        ours = model(input_ids=torch.tensor([ids]), pixel_values=pixel_values).logits
        ref = reference_logits(hf, state, ids, pixel_values, tok.convert_tokens_to_ids("<img>"))
        assert (ours - ref).abs().max() <= ATOL
    text_ids = torch.tensor([tok("a text-only prompt, 123")["input_ids"]])
    assert (model(input_ids=text_ids).logits - hf(input_ids=text_ids).logits).abs().max() <= ATOL


@torch.no_grad()
def test_image_features_equal_qwen_vl_vision(model, original):
    state = load_file(str(original / "model.safetensors"))
    pixel_values = torch.randn(2, 3, VISUAL["image_size"], VISUAL["image_size"], generator=torch.Generator().manual_seed(1))
    ours = model.connector(model.encoder(pixel_values), model.encoder.grid())
    assert ours.shape == (2, VISUAL["n_queries"], VISUAL["output_dim"])
    assert (ours - qwen_visual_forward(state, pixel_values)).abs().max() <= ATOL


def test_imported_parts_are_ours(model, ranks):
    assert model.encoder.registry_name == "open_clip" and model.connector.registry_name == "resampler"
    assert model.llm.text_config.model_type == "qwen2"
    assert model.image_token_id == len(ranks) + 216 == model.tokenizer.convert_tokens_to_ids("<imgpad>")
    assert model.connector.num_tokens(16, model.encoder.grid()) == VISUAL["n_queries"]


def test_wrong_mlp_order_would_fail(tmp_path, ranks, parts):
    """w1 is the up projection and w2 the gate: written the other way round the logits move far past 1e-4."""
    hf, visual = parts
    swapped = from_hf(write_qwen_vl_dir(tmp_path, ranks, qwen_text_state(hf, swap_mlp=True), visual))
    ids = torch.tensor([swapped.tokenizer("the same prompt")["input_ids"]])
    with torch.no_grad():
        assert (swapped(input_ids=ids).logits - hf(input_ids=ids).logits).abs().max() > 1e-2


def test_export_round_trips_bit_for_bit(tmp_path, model, original):
    out = to_hf(model, tmp_path / "back", format="qwen_vl")
    a, b = load_file(str(original / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    src_cfg, out_cfg = json.loads((original / "config.json").read_text()), json.loads((out / "config.json").read_text())
    assert {k: out_cfg[k] for k in src_cfg} == src_cfg
    assert (out / "qwen.tiktoken").read_bytes() == (original / "qwen.tiktoken").read_bytes()


def test_convert_cli_both_ways(tmp_path, original):
    from vlm.convert import main

    assert main([str(original), str(tmp_path / "ours")]) == 0
    loaded = vlm.load(tmp_path / "ours")
    assert loaded.tokenizer.convert_tokens_to_ids("<imgpad>") == loaded.image_token_id
    assert main([str(tmp_path / "ours"), str(tmp_path / "orig"), "--format", "qwen_vl"]) == 0
    a, b = load_file(str(original / "model.safetensors")), load_file(str(tmp_path / "orig" / "model.safetensors"))
    assert sorted(a) == sorted(b)
    # a vlm directory does not store the resampler's fixed sin-cos table (it is recomputed: equal to float rounding)
    pos = "transformer.visual.attn_pool.pos_embed"
    assert [k for k in a if not torch.equal(a[k], b[k])] in ([], [pos])
    assert (a[pos] - b[pos]).abs().max() <= 1e-6


def test_vlm_load_imports_on_the_fly(original):
    model = vlm.load(original)
    assert model.llm.text_config.model_type == "qwen2" and not model.training


def test_shape_disagreeing_with_config_names_file_and_key(tmp_path, original):
    for f in ("config.json", "qwen.tiktoken", "tokenizer_config.json"):
        (tmp_path / f).write_bytes((original / f).read_bytes())
    state = load_file(str(original / "model.safetensors"))
    state["transformer.h.1.mlp.w2.weight"] = state["transformer.h.1.mlp.w2.weight"][:, :-1].contiguous()
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.safetensors.*transformer\.h\.1\.mlp\.w2\.weight: file \(96, 127\) "
                                         r"vs config \(96, 128\)"):
        from_hf(tmp_path)


def test_missing_tiktoken_names_the_file(tmp_path, original):
    for f in ("config.json", "model.safetensors"):
        (tmp_path / f).write_bytes((original / f).read_bytes())
    with pytest.raises(FileNotFoundError, match=r"qwen\.tiktoken' does not exist"):
        from_hf(tmp_path)


def test_text_only_qwen_is_refused(tmp_path, original):
    cfg = json.loads((original / "config.json").read_text())
    del cfg["visual"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json.*without a 'visual' sub-config"):
        from_hf(tmp_path)


def test_chat_cli_answers_from_the_original_directory(tmp_path, original):
    """python -m vlm.chat DIR --prompt: the original directory loads (no remote code, no question asked)."""
    from PIL import Image

    from vlm.chat import main

    Image.new("RGB", (40, 30), (200, 20, 20)).save(tmp_path / "red.png")
    code = main([str(original), "--image", str(tmp_path / "red.png"), "--prompt", "What color?",
                 "--max-new-tokens", "2", "--out-dir", str(tmp_path / "boxes")], stdin=None)
    assert code == 0
