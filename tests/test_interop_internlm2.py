"""Original InternVL2 / InternVL2.5 directories (``internvl_chat`` with an InternLM2 LLM) without remote code.

A tiny transformers ``InternVLForConditionalGeneration`` with a Llama text model is written in the original layout
(``to_hf(format="internvl_chat")``: InternLM2 names, packed ``wqkv``); the packing is checked against a layout built
here head by head from InternLM2's public description (per key/value group: its query heads, its key head, its value
head); the import (``from_hf``, ``vlm.load``) gives transformers' logits with 1 and several tiles, for GQA and for as
many kv heads as heads, and a wrong packing does not. Both export directions round-trip tensor for tensor. The
SentencePiece tokenizer with InternLM2's added tokens loads without remote code and encodes as ``sentencepiece``
does; no directory read ever asks the remote-code question."""
from __future__ import annotations

import builtins
import copy
import io
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import InternVLConfig, InternVLForConditionalGeneration

import vlm
from tests.conftest import TINY_TEXT
from vlm import convert
from vlm.data.tokenizer import load_tokenizer
from vlm.generation import generation_settings
from vlm.interop import from_hf, to_hf
from vlm.interop.internlm2 import llama_config

spm = pytest.importorskip("sentencepiece")

ADDED = ("<img>", "</img>", "<IMG_CONTEXT>")
TOKENS_PER_TILE = 4  # 32 px tiles, 8 px patches, pixel shuffle 0.5
CORPUS = ["Hello world, the quick brown fox jumps over the lazy dog.", "你好，世界！这是一个测试。书生多模态大模型",
          "numbers 12345 and 3.14159, 2024-12-07", "  leading spaces   runs\tand\ttabs\n\nnew lines  ",
          "emoji 😀 🚀 🎉 mixed 中文 and English", "<|im_start|>user\nDescribe the image.<|im_end|>"]


def write_internlm2_tokenizer(path):
    """A tiny SentencePiece model (``<|im_start|>`` / ``<|im_end|>`` as user-defined pieces, byte fallback) and
    InternLM2's tokenizer files as published: ``tokenizer_class: InternLM2Tokenizer`` with its ``auto_map``,
    the image tokens in ``added_tokens.json`` and ``added_tokens_decoder``."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 10), model_writer=buf, vocab_size=400, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, split_digits=True, user_defined_symbols=["<|im_start|>", "<|im_end|>"],
        remove_extra_whitespaces=False, minloglevel=2)
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.model").write_bytes(buf.getvalue())
    n = spm.SentencePieceProcessor(model_proto=buf.getvalue()).get_piece_size()
    added = {t: n + i for i, t in enumerate(ADDED)}
    (path / "added_tokens.json").write_text(json.dumps(added))
    decoder = {str(i): {"content": t, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
                        "single_word": False} for t, i in added.items()}
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "InternLM2Tokenizer", "auto_map": {"AutoTokenizer": [
            "tokenization_internlm2.InternLM2Tokenizer", None]}, "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>",
        "added_tokens_decoder": decoder}))
    return n + len(ADDED)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    return path, write_internlm2_tokenizer(path)


def save_llama_internvl(path, vocab, kv_heads, seed=0):
    """A tiny random transformers InternVL with a Llama text model (every tensor randomized), saved to ``path``."""
    text = {**copy.deepcopy(TINY_TEXT["llama"]), "vocab_size": vocab, "num_key_value_heads": kv_heads,
            "attention_bias": True}
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
                  patch_size=8, norm_type="rms_norm", use_qk_norm=True)
    cfg = InternVLConfig(vision_config=vision, text_config=text, image_token_id=vocab - 1,
                         image_seq_length=TOKENS_PER_TILE, tie_word_embeddings=False)
    torch.manual_seed(seed)
    hf = InternVLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    hf.save_pretrained(str(path))
    return hf


KV_HEADS = {"gqa": 2, "mha": 4}  # of 4 query heads


@pytest.fixture(scope="module")
def built(tmp_path_factory, tok_dir):
    """``{name: (transformers model, its directory, the original directory written from it)}`` per ``KV_HEADS``."""
    out = {}
    for name, kv in KV_HEADS.items():
        root = tmp_path_factory.mktemp(name)
        hf = save_llama_internvl(root / "hf", tok_dir[1], kv)
        model = from_hf(root / "hf", tokenizer=False)
        model.tokenizer = load_tokenizer(tok_dir[0])
        model.generation = generation_settings(model.tokenizer)  # as an original directory's import reads them
        to_hf(model, root / "orig", format="internvl_chat")
        out[name] = (hf, root / "hf", root / "orig")
    return out


@pytest.fixture(params=list(KV_HEADS))
def dirs(request, built):
    """Each configuration in turn (the tests about the packing and the round trips)."""
    return built[request.param]


@pytest.fixture
def gqa(built):
    """The GQA configuration only (the tests that do not depend on the head layout)."""
    return built["gqa"]


def batch(tiles_per_image, image_token_id, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for images in tiles_per_image:
        row = torch.randint(3, 300, (40,), generator=g)
        pos = 2
        for tiles in images:
            row[pos:pos + tiles * TOKENS_PER_TILE] = image_token_id
            pos += tiles * TOKENS_PER_TILE + 1
        rows.append(row)
    n = sum(sum(images) for images in tiles_per_image)
    return torch.stack(rows), torch.randn(n, 3, 32, 32, generator=g)


def max_diff(a, b, ids, pixels):
    with torch.no_grad():
        return (a(input_ids=ids, pixel_values=pixels).logits - b(input_ids=ids, pixel_values=pixels).logits).abs().max()


def packed_by_hand(hf, layer, heads, kv):
    """InternLM2's ``wqkv`` of transformers' layer, built head by head: for each key/value head g, query heads
    g * q_per_kv .. (g + 1) * q_per_kv - 1, then key head g, then value head g (rows of head_dim each)."""
    attn = hf.model.language_model.layers[layer].self_attn
    d = attn.q_proj.weight.shape[0] // heads
    head = lambda w, i: w[i * d:(i + 1) * d]
    rows = []
    for g in range(kv):
        rows += [head(attn.q_proj.weight, g * (heads // kv) + j) for j in range(heads // kv)]
        rows += [head(attn.k_proj.weight, g), head(attn.v_proj.weight, g)]
    return torch.cat(rows)


def test_original_layout_imports_with_transformers_logits(dirs):
    hf, _, orig = dirs
    cfg = json.loads((orig / "config.json").read_text())
    llm = cfg["llm_config"]
    assert cfg["model_type"] == "internvl_chat" and llm["model_type"] == "internlm2"
    assert llm["architectures"] == ["InternLM2ForCausalLM"] and llm["bias"] is True
    state = load_file(str(orig / "model.safetensors"))
    heads, kv = llm["num_attention_heads"], llm["num_key_value_heads"]
    for layer in range(llm["num_hidden_layers"]):
        assert torch.equal(state[f"language_model.model.layers.{layer}.attention.wqkv.weight"],
                           packed_by_hand(hf, layer, heads, kv))
    assert {k.split(".", 1)[0] for k in state} == {"vision_model", "mlp1", "language_model"}
    assert "language_model.output.weight" in state and "language_model.model.tok_embeddings.weight" in state
    image_token = hf.config.image_token_id
    for loaded in (from_hf(orig), vlm.load(orig)):
        assert loaded.llm.text_config.model_type == "llama" and type(loaded.llm.model).__name__ == "LlamaForCausalLM"
        assert loaded.image_token_id == image_token and loaded.image_token == "<IMG_CONTEXT>"
        for tiles in ([[1], [1]], [[5], [2, 1]]):  # one tile per image; several (a 2x2 grid + thumbnail, 2 + 1)
            ids, pixels = batch(tiles, image_token)
            assert max_diff(hf, loaded, ids, pixels) <= 1e-4


def test_a_wrong_packing_gives_other_logits(dirs, tmp_path):
    """q/k/v concatenated flat (all queries, then keys, then values) instead of per group: the import loads it
    (shapes agree) but the logits are not transformers'."""
    hf, _, orig = dirs
    llm = json.loads((orig / "config.json").read_text())["llm_config"]
    state = load_file(str(orig / "model.safetensors"))
    for layer in range(llm["num_hidden_layers"]):
        attn = hf.model.language_model.layers[layer].self_attn
        for kind in ("weight", "bias"):
            flat = torch.cat([getattr(attn, p).get_parameter(kind) for p in ("q_proj", "k_proj", "v_proj")])
            state[f"language_model.model.layers.{layer}.attention.wqkv.{kind}"] = flat.detach().clone()
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    for f in orig.iterdir():
        if f.name != "model.safetensors":
            (wrong / f.name).write_bytes(f.read_bytes())
    save_file(state, str(wrong / "model.safetensors"))
    ids, pixels = batch([[5], [2, 1]], hf.config.image_token_id)
    assert max_diff(hf, from_hf(wrong), ids, pixels) > 1e-2  # (with one query head per group too: [q, k, v] x kv)


def test_round_trips_are_bit_for_bit(dirs, tmp_path):
    hf, _, orig = dirs
    again = to_hf(from_hf(orig), tmp_path / "orig2", format="internvl_chat")  # original -> vlm -> original
    a, b = load_file(str(orig / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    first, second = (json.loads((d / "config.json").read_text()) for d in (orig, again))
    # the import adds the template's end of turn (<|im_end|>) to the stop ids, which the export writes with the eos
    eos = first["llm_config"].pop("eos_token_id")
    assert second["llm_config"].pop("eos_token_id")[:1] == eos and first == second
    with pytest.warns(UserWarning, match="no InternVLProcessor.*SentencePieceTokenizer.*AutoTokenizer does not load"):
        back = to_hf(from_hf(orig), tmp_path / "hf2")  # original -> transformers (auto-detected format)
    theirs = InternVLForConditionalGeneration.from_pretrained(str(back)).state_dict()
    ours = hf.state_dict()
    assert set(theirs) == set(ours) and all(torch.equal(theirs[k], ours[k]) for k in ours)
    assert convert.main([str(orig), str(tmp_path / "ours")]) == 0  # the CLI both ways
    assert convert.main([str(tmp_path / "ours"), str(tmp_path / "orig3"), "--format", "internvl_chat"]) == 0
    c = load_file(str(tmp_path / "orig3" / "model.safetensors"))
    assert set(a) == set(c) and all(torch.equal(a[k], c[k]) for k in a)


def test_sentencepiece_tokenizer_matches_sentencepiece_without_remote_code(tok_dir, gqa):
    path, vocab = tok_dir
    sp = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
    for tok in (load_tokenizer(path), from_hf(gqa[2]).tokenizer, vlm.load(gqa[2]).tokenizer):
        assert len(tok) == vocab and tok.convert_tokens_to_ids("<IMG_CONTEXT>") == vocab - 1
        for text in CORPUS:
            assert tok(text)["input_ids"] == [sp.bos_id()] + sp.encode(text)
            assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text)
            assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text))  # (NFKC-normalized, as trained)
        mixed = "  two<img><IMG_CONTEXT></img>\n图 12 😀"
        want = sp.encode("  two") + [vocab - 3, vocab - 1, vocab - 2] + sp.encode("\n图 12 😀")
        assert tok(mixed, add_special_tokens=False)["input_ids"] == want
        for text in [*CORPUS, mixed]:  # the offsets vlm's processor tokenizes a whole prompt with
            ids, offsets = tok.encode_with_offsets(text)
            assert ids == tok(text, add_special_tokens=False)["input_ids"]
            assert all(0 <= a <= b <= len(text) for a, b in offsets)
            assert [a for a, _ in offsets] == sorted(a for a, _ in offsets)
    saved = path.parent / "tok_saved"
    load_tokenizer(path).save_pretrained(saved)
    assert load_tokenizer(saved)(CORPUS[1])["input_ids"] == [sp.bos_id()] + sp.encode(CORPUS[1])


def test_no_remote_code_question_anywhere(gqa, monkeypatch, tmp_path):
    """Every read of an original directory (config.json and tokenizer_config.json carry ``auto_map``) passes
    ``trust_remote_code=False``: ``input`` is never called. transformers' own default would ask."""
    _, _, orig = gqa
    cfg = json.loads((orig / "config.json").read_text())
    assert "auto_map" in cfg and "auto_map" in json.loads((orig / "tokenizer_config.json").read_text())
    asked = []

    def no_question(*args, **kwargs):
        asked.append(args)
        return "n"

    monkeypatch.setattr(builtins, "input", no_question)
    from transformers import AutoTokenizer

    with pytest.raises(ValueError):
        AutoTokenizer.from_pretrained(str(orig), local_files_only=True)  # transformers' default: the question
    assert asked, "transformers no longer asks; this test would not catch a prompt"
    asked.clear()
    from_hf(orig)
    vlm.load(orig)
    load_tokenizer(orig)
    assert convert.main([str(orig), str(tmp_path / "ours")]) == 0
    vlm.load(tmp_path / "ours")
    from vlm import chat as chat_cli

    # python -m vlm.chat DIR on the original directory, one-shot, stdin empty
    assert chat_cli.main([str(orig), "--prompt", "Hi", "--max-new-tokens", "2"], stdin=io.StringIO("")) == 0
    assert asked == []


def test_bad_original_directories_name_file_and_key(gqa, tmp_path):
    _, _, orig = gqa
    cfg = json.loads((orig / "config.json").read_text())

    def variant(name, config=None, state=None):
        d = tmp_path / name
        d.mkdir()
        for f in orig.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        if config is not None:
            (d / "config.json").write_text(json.dumps(config))
        if state is not None:
            save_file(state, str(d / "model.safetensors"))
        return d

    bad_rope = copy.deepcopy(cfg)
    bad_rope["llm_config"]["rope_scaling"] = {"type": "yarn-ish", "factor": 2.0}
    with pytest.raises(ValueError, match=r"config\.json.*llm_config: rope_scaling\.type='yarn-ish'.*\['dynamic', "
                                         r"'linear'\]"):
        from_hf(variant("rope", config=bad_rope))
    state = load_file(str(orig / "model.safetensors"))
    key = "language_model.model.layers.1.attention.wqkv.weight"
    state[key] = state[key][:-8].clone()  # one head short of the config's packing
    with pytest.raises(ValueError, match=r"model\.safetensors.*language_model\.model\.layers\.1\.attention\.wqkv"
                                         r"\.weight has shape"):
        from_hf(variant("wqkv", state=state))
    state = load_file(str(orig / "model.safetensors"))
    state["language_model.model.layers.0.feed_forward.w2.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"model\.safetensors.*language_model.*mlp\.down_proj\.weight: \(3, 3\)"):
        from_hf(variant("ffn", state=state))
    lacking = copy.deepcopy(cfg)
    del lacking["llm_config"]["num_attention_heads"]
    with pytest.raises(ValueError, match=r"llm_config: InternLM2 config lacks \['num_attention_heads'\]"):
        from_hf(variant("dims", config=lacking))


@pytest.mark.parametrize("kind", ["dynamic", "linear"])
def test_rope_scaling_is_internlm2s(kind):
    """The mapped ``rope_parameters`` give the rotary frequencies of InternLM2's public formulas: linear divides
    positions by ``factor``; dynamic NTK uses base * ((factor * L / max_pos) - (factor - 1)) ** (d / (d - 2)) for a
    sequence of L > max_pos positions (and the plain base below)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    internlm2 = {"vocab_size": 16, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                 "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 16,
                 "rope_theta": 1000.0, "rope_scaling": {"type": kind, "factor": 2.0}}
    rotary = LlamaRotaryEmbedding(LlamaConfig(**llama_config(internlm2, "test")))
    d, base, factor, max_pos = 8, 1000.0, 2.0, 16
    x = torch.zeros(1, 1, 40, d)
    for length in (10, 40):
        pos = torch.arange(length)[None]
        cos, _ = rotary(x[:, :, :length], pos)
        if kind == "dynamic":
            b = base * ((factor * length / max_pos) - (factor - 1)) ** (d / (d - 2)) if length > max_pos else base
            angles = pos[0, :, None].double() / b ** (torch.arange(0, d, 2).double() / d)
        else:
            angles = pos[0, :, None].double() / factor / base ** (torch.arange(0, d, 2).double() / d)
        want = torch.cat([angles, angles], -1).cos().float()
        assert torch.allclose(cos[0], want, atol=1e-5), (kind, length)


#: what original InternVL's conversation templates write (public conversation.py, MPT style):
#: (system turn with the default system message, user role, assistant role, separator)
ORIGINAL = {
    "internlm2-chat": (("<|im_start|>system\n你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, "
                        "是一个有用无害的人工智能助手。"), "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>"),
    "internvl2_5": (("<|im_start|>system\n你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的"
                     "多模态大语言模型。"), "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>\n"),
}


def original_chat_prompt(template, history, question, tiles):
    """The prompt original ``chat()`` builds: ``<image>\\n`` before the question of the turn with the image, the MPT
    conversation (system + sep, then role + message + sep per turn, then the assistant role), each ``<image>``
    replaced by ``<img>`` + ``<IMG_CONTEXT>`` x (tokens per tile x tiles) + ``</img>``."""
    system, user, assistant, sep = ORIGINAL[template]
    query = system + sep
    for old_q, old_a in history:
        query += user + old_q + sep + assistant + old_a + sep
    query += user + question + sep + assistant
    return query.replace("<image>", "<img>" + "<IMG_CONTEXT>" * (TOKENS_PER_TILE * tiles) + "</img>", 1)


@pytest.mark.parametrize("template", ["internlm2-chat", "internvl2_5"])
def test_chat_builds_the_original_chat_prompt(gqa, tmp_path, template):
    """``model.chat``'s prompt ids on an imported original = the tokenizer's ids of original ``chat()``'s prompt
    (BOS in front): one image of several tiles, then a text-only second turn after the first answer."""
    import numpy as np
    from PIL import Image

    from vlm.inference.chat import assistant_turn, image_placement, processor_for, prompt_item

    _, _, orig = gqa
    d = tmp_path / template
    d.mkdir()
    for f in orig.iterdir():
        d.joinpath(f.name).write_bytes(f.read_bytes())
    cfg = json.loads((orig / "config.json").read_text())
    cfg.update(template=template, dynamic_image_size=True, max_dynamic_patch=4, use_thumbnail=True)
    (d / "config.json").write_text(json.dumps(cfg))
    model = from_hf(d)
    tok = model.tokenizer
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 70, 3), dtype=np.uint8))
    processor = processor_for(model)
    item, history = prompt_item(processor, None, picture, "What is in the image?", placement=image_placement(model))
    tiles = item["pixel_values"].shape[0]
    assert tiles > 1
    want = original_chat_prompt(template, [], "<image>\nWhat is in the image?", tiles)
    assert item["input_ids"].tolist() == tok(want)["input_ids"]
    history = [*history, assistant_turn("A red square.")]
    item, _ = prompt_item(processor, history, None, "And its size?", placement=image_placement(model))
    want = original_chat_prompt(template, [("<image>\nWhat is in the image?", "A red square.")], "And its size?",
                                tiles)
    assert item["input_ids"].tolist() == tok(want)["input_ids"]
    assert tok.convert_tokens_to_ids("<|im_end|>") in model.generation["eos_token_id"]


def test_imported_original_trains_on_the_reply_only(gqa):
    """A training sample through the imported model's own template and tokenizer: the labels are the reply and its
    separator (what original InternVL trains), the loss is finite and has gradients in the Llama LLM."""
    import numpy as np
    from PIL import Image

    from vlm.inference.chat import assistant_turn, processor_for, to_sample, user_turn

    _, _, orig = gqa
    model = from_hf(orig).train()
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    messages = [user_turn(picture, "What is it?"), assistant_turn("A red square.")]
    item = processor_for(model)(to_sample(messages))
    labels = item["labels"]
    assert model.tokenizer.decode(labels[labels != -100].tolist()) == "A red square.<|im_end|>"
    out = model(input_ids=item["input_ids"][None], pixel_values=item["pixel_values"], labels=labels[None])
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.llm.model.model.layers[0].self_attn.q_proj.weight.grad is not None
