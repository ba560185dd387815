import importlib.util
import json

import pytest
import torch

import vlm
from vlm import llm as llms
from vlm.llm.hf_causal_lm import HFCausalLM
from vlm.llm.masks import positions_from_segments
from tests.conftest import TINY_TEXT, TINY_VISION, image_batch_ids, tiny_cfg


@pytest.mark.parametrize("family", sorted(TINY_TEXT))
def test_any_causal_lm_family(family, seed):
    model = vlm.build(tiny_cfg("siglip", family)).eval()
    assert type(model.llm) is HFCausalLM  # one wrapper for every family, no per-family subclass
    assert model.llm.attn_implementation == "sdpa"  # the default
    ids = image_batch_ids(model, [1, 2], length=48)
    px = torch.randn(3, 3, 32, 32)
    out = model(ids, px, labels=ids)
    assert out.logits.shape == (2, 48, model.llm.vocab_size)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.connector.layers[0].weight.grad is not None


def test_injection_order_and_placement(seed):
    model = vlm.build(tiny_cfg("clip", "llama")).eval()
    ids = image_batch_ids(model, [2, 1], length=48)
    px = torch.randn(3, 3, 32, 32)
    embeds = model.embed_inputs(ids, px)
    feats = model.image_features(px)  # (3, K, D)
    K = model.num_image_tokens()
    mask = ids == model.image_token_id
    r0 = mask[0].nonzero().squeeze(1)
    r1 = mask[1].nonzero().squeeze(1)
    torch.testing.assert_close(embeds[0, r0[:K]], feats[0])
    torch.testing.assert_close(embeds[0, r0[K:]], feats[1])
    torch.testing.assert_close(embeds[1, r1], feats[2])
    text = ~mask
    torch.testing.assert_close(embeds[text], model.llm.embed(ids)[text])


def test_count_mismatch_states_both_numbers(seed):
    model = vlm.build(tiny_cfg())
    ids = image_batch_ids(model, [1, 1])
    with pytest.raises(ValueError, match=r"hold 32 image tokens .* produced 16 feature vectors"):
        model(ids, torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="no pixel_values"):
        model(ids)


@pytest.mark.parametrize("shape,match", [((3, 32, 32), r"got rank 3 shape \(3, 32, 32\)"),
                                         ((1, 4, 32, 32), r"3 channels at dim 1.*got 4 channels"),
                                         ((1, 3, 48, 48), r"6x6 patch grid.*native 4x4 grid"),
                                         ((1, 3, 4, 4), "smaller than one 8x8 patch")])
def test_bad_pixel_values_through_the_model(shape, match, seed):
    model = vlm.build(tiny_cfg("clip", "llama"))
    ids = image_batch_ids(model, [1])
    with pytest.raises(ValueError, match=match):
        model(ids, torch.randn(*shape))


def test_num_image_tokens_rejects_sizes_the_encoder_cannot_take():
    model = vlm.build(tiny_cfg("siglip", "llama"))
    assert model.num_image_tokens((39, 33)) == model.num_image_tokens() == 16  # the patch conv floors
    with pytest.raises(ValueError, match=r"image size \(48, 32\) gives a 6x4 patch grid"):
        model.num_image_tokens((48, 32))


def test_text_only_batch(seed):
    model = vlm.build(tiny_cfg())
    ids = torch.randint(0, 100, (2, 10))
    out = model(ids, labels=ids)
    assert out.logits.shape[:2] == (2, 10) and torch.isfinite(out.loss)


def test_labels_ignore_index(seed):
    model = vlm.build(tiny_cfg()).eval()
    ids = torch.randint(0, 100, (1, 12))
    labels = torch.full_like(ids, -100)
    labels[0, 6:] = ids[0, 6:]
    out = model(ids, labels=labels)
    logp = torch.log_softmax(out.logits[0, 5:-1], -1)
    expected = -logp.gather(1, ids[0, 6:, None]).mean()
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("encoder,text", [("clip", "llama"), ("siglip", "qwen2"), ("clip", "gpt2")])
def test_save_load_identical(tmp_path, encoder, text, seed):
    from vlm.data.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    cfg = tiny_cfg(encoder, text, feature_layer=[-2, -1])
    cfg["llm"]["config"]["vocab_size"] = len(tok)
    model = vlm.build(cfg, tokenizer=tok).eval()
    ids = image_batch_ids(model, [1, 1])
    px = torch.randn(2, 3, 32, 32)
    ref = model(ids, px).logits
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".json", ".safetensors"))[:2] == [
        "config.json", "model.safetensors"] or (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))
    again = vlm.load(tmp_path).eval()
    assert (again(ids, px).logits - ref).abs().max() == 0
    assert again.tokenizer is not None and again.image_token_id == model.image_token_id
    assert again.tokenizer.convert_tokens_to_ids("<image>") == model.image_token_id


def test_build_reserves_fresh_image_token():
    model = vlm.build(tiny_cfg())
    assert model.image_token_id == model.config.image_token_id == 128 and model.llm.vocab_size == 129


def test_load_errors(tmp_path):
    model = vlm.build(tiny_cfg())
    with pytest.raises(FileNotFoundError, match="not a directory"):
        vlm.load(tmp_path / "nope")
    model.save_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"is missing config.json \(expected config.json and "
                                                r"model.safetensors written by VLM.save_pretrained\)"):
        vlm.load(tmp_path)
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="is missing model.safetensors"):
        vlm.load(tmp_path)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["llm"]["config"]["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match the config"):
        vlm.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type"):
        vlm.load(tmp_path)
    # a transformers config beside vlm weights, or without weights, fails before anything is built (a default
    # LLaVA config is a 7B model)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ValueError, match="holds vlm weights"):
        vlm.load(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights in"):
        vlm.load(tmp_path)


def greedy_without_cache(model, ids, px, steps):
    out = []
    for _ in range(steps):
        logits = model(ids, px, use_cache=False).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.append(nxt)
        ids = torch.cat([ids, nxt], dim=1)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("text", ["llama", "gpt2"])
def test_generate_with_cache_equals_greedy_without_cache(text, seed):
    """Cached generation equals step-by-step greedy decoding without a cache, and really uses the cache.

    Checked through public API only (a forward hook on the LM's input embeddings and the cache ``generate`` returns),
    never through the private argument names transformers passes between its own methods."""
    model = vlm.build(tiny_cfg("siglip", text)).eval()
    ids = image_batch_ids(model, [1, 1], length=24)
    px = torch.randn(2, 3, 32, 32)
    embedded = []  # positions embedded per call: the prompt once (by us), then one new token per step
    hook = model.llm.model.get_input_embeddings().register_forward_hook(
        lambda module, args, out: embedded.append(out.shape[1]))
    try:
        out = model.generate(ids, px, max_new_tokens=8, min_new_tokens=8, return_dict_in_generate=True)
    finally:
        hook.remove()
    gen = out.sequences
    assert gen.shape == (2, 8)
    assert embedded == [24] + [1] * 7
    assert out.past_key_values.get_seq_length() == 24 + 7  # the prompt and every generated token but the last
    assert torch.equal(gen, greedy_without_cache(model, ids, px, 8))


def test_generate_left_padded_batch_matches_unpadded(seed):
    model = vlm.build(tiny_cfg("clip", "llama")).eval()
    K = model.num_image_tokens()
    a = torch.cat([torch.tensor([[5, 6]]), torch.full((1, K), model.image_token_id), torch.tensor([[7, 8, 9]])], 1)
    b = a[:, 1:]
    px = torch.randn(2, 3, 32, 32)
    pad = torch.cat([torch.zeros(1, 1, dtype=torch.long), b], 1)
    batch = torch.cat([a, pad])
    mask = torch.ones_like(batch)
    mask[1, 0] = 0
    gen = model.generate(batch, px, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, pad_token_id=0)
    alone = model.generate(b, px[1:], max_new_tokens=6, min_new_tokens=6, pad_token_id=0)
    assert torch.equal(gen[1], alone[0])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("text", ["llama", "qwen3"])
def test_packed_rows_equal_samples_alone(attn, text, seed):
    cfg = tiny_cfg("clip", text)
    cfg["llm"]["attn_implementation"] = attn
    model = vlm.build(cfg).eval()
    K = model.num_image_tokens()
    t = model.image_token_id
    s1 = torch.cat([torch.tensor([1, 2]), torch.full((K,), t), torch.tensor([3, 4, 5])])
    s2 = torch.tensor([9, 8, 7, 6])
    s3 = torch.cat([torch.tensor([11]), torch.full((K,), t), torch.tensor([12])])
    px = torch.randn(2, 3, 32, 32)
    row = torch.cat([s1, s2, s3, torch.zeros(3, dtype=torch.long)])[None]
    seg = torch.cat([torch.full((len(s1),), 1), torch.full((len(s2),), 2), torch.full((len(s3),), 3),
                     torch.zeros(3, dtype=torch.long)])[None]
    packed = model(row, px, segment_ids=seg).logits[0]
    alone = [model(s1[None], px[:1]).logits[0], model(s2[None]).logits[0], model(s3[None], px[1:]).logits[0]]
    off = 0
    for a in alone:
        assert (packed[off:off + len(a)] - a).abs().max() <= 1e-4
        off += len(a)


def test_packed_loss_ignores_cross_segment_targets(seed):
    model = vlm.build(tiny_cfg()).eval()
    s1, s2 = torch.randint(0, 100, (6,)), torch.randint(0, 100, (5,))
    row = torch.cat([s1, s2])[None]
    seg = torch.tensor([[1] * 6 + [2] * 5])
    loss = model(row, labels=row, segment_ids=seg).loss
    l1 = model(s1[None], labels=s1[None]).loss
    l2 = model(s2[None], labels=s2[None]).loss
    torch.testing.assert_close(loss, (l1 * 5 + l2 * 4) / 9)


def test_positions_from_segments():
    seg = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    assert positions_from_segments(seg).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))]


def test_attention_implementations_agree(seed):
    ref = vlm.build(tiny_cfg()).eval()
    cfg = tiny_cfg()
    cfg["llm"]["attn_implementation"] = "eager"
    eager = vlm.build(cfg).eval()
    eager.load_state_dict(ref.state_dict())
    ids = image_batch_ids(ref, [1])
    px = torch.randn(1, 3, 32, 32)
    assert (ref(ids, px).logits - eager(ids, px).logits).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="attn_implementation"):
        llms.build({"name": "hf_causal_lm", "config": TINY_TEXT["llama"], "attn_implementation": "flash"})
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs CUDA"):
            llms.build({"name": "hf_causal_lm", "config": TINY_TEXT["llama"],
                        "attn_implementation": "flash_attention_2"})
    elif importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(RuntimeError, match=r"needs the flash-attn package: pip install -e '.\[flash\]'"):
            llms.build({"name": "hf_causal_lm", "config": TINY_TEXT["llama"],
                        "attn_implementation": "flash_attention_2"})


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None,
                    reason="flash_attention_2 needs CUDA and the flash extra")
def test_flash_attention_2_matches_sdpa_on_cuda(seed):
    models = {}
    for attn in ("sdpa", "flash_attention_2"):
        cfg = tiny_cfg("clip", "llama")
        cfg["llm"].update(attn_implementation=attn, dtype="bfloat16")
        cfg["encoder"]["dtype"] = "bfloat16"
        models[attn] = vlm.build(cfg).eval()
    models["flash_attention_2"].load_state_dict(models["sdpa"].state_dict())
    ids = image_batch_ids(models["sdpa"], [1, 1]).cuda()
    px = torch.randn(2, 3, 32, 32).cuda()
    logits = {k: m.cuda()(ids, px).logits.float() for k, m in models.items()}
    assert models["flash_attention_2"].llm.attn_implementation == "flash_attention_2"
    assert (logits["sdpa"] - logits["flash_attention_2"]).abs().max() <= 5e-2


def test_gradient_checkpointing_same_grads(seed):
    ref = vlm.build(tiny_cfg())
    cfg = tiny_cfg()
    cfg["llm"]["gradient_checkpointing"] = True
    ckpt = vlm.build(cfg)
    ckpt.load_state_dict(ref.state_dict())
    ids = image_batch_ids(ref, [1, 1])
    px = torch.randn(2, 3, 32, 32)
    for m in (ref, ckpt):
        m.train()
        m(ids, px, labels=ids).loss.backward()
    assert any(getattr(m, "gradient_checkpointing", False) for m in ckpt.llm.model.modules())
    g1 = ref.llm.model.model.layers[0].mlp.up_proj.weight.grad
    g2 = ckpt.llm.model.model.layers[0].mlp.up_proj.weight.grad
    torch.testing.assert_close(g1, g2)


def test_pretrained_llm_directory(tmp_path, seed):
    from transformers import AutoConfig, AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_TEXT["qwen2"])).eval()
    ref.save_pretrained(tmp_path)
    lm = llms.build({"name": "hf_causal_lm", "pretrained": str(tmp_path)}).eval()
    assert isinstance(lm, HFCausalLM)
    ids = torch.randint(0, 128, (1, 9))
    assert (lm(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max() == 0
    with pytest.raises(FileNotFoundError, match=r"hf_causal_lm: pretrained directory .*x' does not exist"):
        llms.build({"name": "hf_causal_lm", "pretrained": str(tmp_path / "x")})
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"hf_causal_lm: no weights in .*expected one of model.safetensors"):
        llms.build({"name": "hf_causal_lm", "pretrained": str(tmp_path)})
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"hf_causal_lm: no config.json in pretrained directory"):
        llms.build({"name": "hf_causal_lm", "pretrained": str(tmp_path)})
    with pytest.raises(ValueError, match="exactly one"):
        llms.build({"name": "hf_causal_lm"})
    with pytest.raises(KeyError, match="model_type"):
        llms.build({"name": "hf_causal_lm", "config": {"hidden_size": 8}})


def test_build_adds_image_token_without_dropping_existing_specials():
    from vlm.data.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    specials_before = set(tok.all_special_tokens)
    cfg = tiny_cfg()
    cfg["image_token"] = "<IMG_CONTEXT>"
    cfg["llm"]["config"]["vocab_size"] = len(tok)
    model = vlm.build(cfg, tokenizer=tok)
    assert specials_before <= set(tok.all_special_tokens)
    assert tok("a<IMG_CONTEXT>b", add_special_tokens=False)["input_ids"][1] == model.image_token_id
    assert model.image_token_id == len(tok) - 1 and model.llm.vocab_size == len(tok)


def test_dtype_round_trips(tmp_path):
    cfg = tiny_cfg()
    cfg["llm"]["dtype"] = "bfloat16"
    cfg["encoder"]["dtype"] = "bfloat16"
    model = vlm.build(cfg)
    model.save_pretrained(tmp_path)
    again = vlm.load(tmp_path)
    assert next(again.llm.parameters()).dtype == torch.bfloat16
    assert next(again.encoder.parameters()).dtype == torch.bfloat16
    assert next(again.connector.parameters()).dtype == torch.bfloat16
    ids = image_batch_ids(again, [1])
    assert again(ids, torch.randn(1, 3, 32, 32)).logits.dtype == torch.bfloat16
    fp32 = tiny_cfg()
    fp32["llm"]["config"]["dtype"] = "bfloat16"  # a saved transformers config's dtype does not decide ours
    assert next(vlm.build(fp32).llm.parameters()).dtype == torch.float32


def test_loss_weightings(seed):
    from vlm.loss import lm_loss
    from vlm.objectives import build as build_objective

    model = vlm.build(tiny_cfg()).eval()
    objective = {w: build_objective({"name": "lm"}, model=model, loss_weighting=w) for w in ("token", "sample")}
    ids = torch.randint(0, 100, (2, 12))
    labels = torch.full_like(ids, -100)
    labels[0, 10:] = ids[0, 10:]        # a 2-token answer
    labels[1, 4:] = ids[1, 4:]          # an 8-token answer
    out = model(ids, labels=labels)
    logits = out.logits
    token = lm_loss(logits, labels, "token")
    torch.testing.assert_close(token, out.loss)  # same as transformers' own loss
    torch.testing.assert_close(objective["token"](model, {"input_ids": ids, "labels": labels}).loss, out.loss)
    per_sample = [lm_loss(logits[i:i + 1], labels[i:i + 1]) for i in range(2)]
    torch.testing.assert_close(objective["sample"](model, {"input_ids": ids, "labels": labels}).loss,
                               (per_sample[0] + per_sample[1]) / 2)
    sq = (per_sample[0] * 2 ** 0.5 + per_sample[1] * 8 ** 0.5) / (2 ** 0.5 + 8 ** 0.5)
    torch.testing.assert_close(lm_loss(logits, labels, "square"), sq)
    # packed: each segment is a sample
    row = torch.cat([ids[0], ids[1]])[None]
    seg = torch.tensor([[1] * 12 + [2] * 12])
    packed_labels = torch.cat([labels[0], labels[1]])[None]
    packed = objective["sample"](model, {"input_ids": row, "labels": packed_labels, "segment_ids": seg}).loss
    torch.testing.assert_close(packed, (per_sample[0] + per_sample[1]) / 2, atol=1e-4, rtol=1e-4)
    # the model's own loss on a packed row: the token mean, a segment's first token not a target of the previous
    torch.testing.assert_close(model(row, labels=packed_labels, segment_ids=seg).loss,
                               (per_sample[0] * 2 + per_sample[1] * 8) / 10, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="loss weighting 'mean'"):
        build_objective({"name": "lm"}, model=model, loss_weighting="mean")


# ------------------------------------------------------------------------- unknown keys in a transformers config dict
def test_llm_config_typo_is_named_with_a_suggestion():
    cfg = {**TINY_TEXT["qwen2"], "num_hiden_layers": 3}
    with pytest.raises(TypeError, match=r"hf_causal_lm config: unknown config key\(s\) for model_type='qwen2': "
                                        r"'num_hiden_layers' \(did you mean 'num_hidden_layers'") as e:
        llms.build({"name": "hf_causal_lm", "config": cfg})
    assert "strict_config: false" in str(e.value) and "Qwen2Config" in str(e.value)
    # attribute_map aliases are keys too: GPT-2 takes hidden_size (-> n_embd), but not n_embed
    llms.build({"name": "hf_causal_lm", "config": {**TINY_TEXT["gpt2"], "hidden_size": 32}})
    with pytest.raises(TypeError, match=r"model_type='gpt2': 'n_embed' \(did you mean 'n_embd'"):
        llms.build({"name": "hf_causal_lm", "config": {**TINY_TEXT["gpt2"], "n_embed": 32}})
    with pytest.raises(TypeError, match=r"'rope_thetta' \(did you mean 'rope_theta'.*'zzz' \(no close match\)"):
        llms.build({"name": "hf_causal_lm", "config": {**TINY_TEXT["llama"], "zzz": 1, "rope_thetta": 1e4}})
    # through vlm.build too
    bad = tiny_cfg()
    bad["llm"]["config"]["intermediate_sise"] = 64
    with pytest.raises(TypeError, match="'intermediate_sise' \\(did you mean 'intermediate_size'"):
        vlm.build(bad)
    with pytest.raises(ValueError, match=r"unknown model_type='lama'; did you mean 'llama'"):
        llms.build({"name": "hf_causal_lm", "config": {**TINY_TEXT["llama"], "model_type": "lama"}})


def test_llm_config_generic_keys_accepted():
    """Generic PretrainedConfig kwargs and legacy keys transformers converts (rope_theta) are not typos."""
    cfg = {**TINY_TEXT["qwen2"], "rope_theta": 10000.0, "initializer_range": 0.01, "bos_token_id": 1,
           "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "float32", "max_position_embeddings": 64,
           "layer_types": ["full_attention"] * 2, "tie_word_embeddings": False, "transformers_version": "5.0.0",
           "architectures": ["Qwen2ForCausalLM"], "_name_or_path": "x", "use_cache": True}
    lm = llms.build({"name": "hf_causal_lm", "config": cfg})
    assert lm.text_config.initializer_range == 0.01 and lm.text_config.max_position_embeddings == 64


@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen3", "gemma", "gpt2"])
def test_saved_transformers_configs_pass_the_key_check(tmp_path, family):
    """The full ``to_dict()`` of a default config, and the config.json ``save_pretrained`` writes for a tiny model,
    hold only accepted keys, and the latter rebuilds the same architecture."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from vlm.hf_config import check_config_keys, unknown_config_keys
    from vlm.llm.hf_causal_lm import make_config

    cls = type(AutoConfig.for_model(family))
    full = cls().to_dict()
    assert unknown_config_keys(cls, full) == []
    check_config_keys(cls, full, "test", family)
    make_config(full)
    ref = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_TEXT[family]))
    ref.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert unknown_config_keys(cls, saved) == []
    lm = llms.build({"name": "hf_causal_lm", "config": saved})
    assert sum(p.numel() for p in lm.parameters()) == sum(p.numel() for p in ref.parameters())
    # and what export_config writes into a vlm config.json
    assert unknown_config_keys(cls, lm.export_config()["config"]) == []


def test_vlm_save_load_round_trip_passes_the_key_check(tmp_path):
    model = vlm.build(tiny_cfg("siglip", "qwen3"))
    model.llm.enable_gradient_checkpointing()
    model.save_pretrained(tmp_path)
    again = vlm.load(tmp_path)
    assert again.llm.text_config.num_hidden_layers == 2
    assert "strict_config" not in json.loads((tmp_path / "config.json").read_text())["llm"]


def test_strict_config_false_escape_hatch(tmp_path):
    cfg = {**TINY_TEXT["llama"], "my_exotic_knob": 7}
    with pytest.raises(TypeError, match="my_exotic_knob"):
        llms.build({"name": "hf_causal_lm", "config": cfg})
    lm = llms.build({"name": "hf_causal_lm", "config": cfg, "strict_config": False})
    assert lm.text_config.my_exotic_knob == 7
    exported = lm.export_config()
    assert exported["strict_config"] is False  # a rebuild from the export accepts the key again
    llms.build(exported)
    full = tiny_cfg()
    full["llm"]["config"]["my_exotic_knob"] = 7
    full["llm"]["strict_config"] = False
    model = vlm.build(full)
    model.save_pretrained(tmp_path)
    assert vlm.load(tmp_path).llm.text_config.my_exotic_knob == 7


def test_encoder_config_dict_keys_checked():
    from vlm import encoders

    enc = encoders.build(TINY_VISION["siglip"])
    exported = enc.export_config()
    assert "strict_config" not in exported
    encoders.build(exported)  # the full to_dict() of the tower's config passes
    for name in ("clip", "siglip", "siglip2"):
        e = encoders.build({**TINY_VISION["siglip"], "name": name})
        encoders.build(e.export_config())
    bad = {**exported, "config": {**exported["config"], "patch_sze": 8}}
    with pytest.raises(TypeError, match=r"siglip encoder config: unknown config key\(s\) for "
                                        r"model_type='siglip_vision_model': 'patch_sze' \(did you mean 'patch_size'"):
        encoders.build(bad)
    ok = encoders.build({**bad, "strict_config": False})
    assert ok.hf_config.patch_sze == 8 and ok.export_config()["strict_config"] is False
