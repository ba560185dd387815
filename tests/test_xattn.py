"""``xattn``: Flamingo's gated cross-attention fusion installed into any transformers causal LM."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import vlm
from vlm.connectors.xattn import GatedCrossAttentionBlock, layout_media
from vlm.llm.hf_causal_lm import HFCausalLM
from tests.conftest import TINY_TEXT, tiny_cfg

XATTN = {"name": "xattn", "heads": 2, "head_dim": 8, "ff_mult": 2}


def xattn_model(family: str = "llama", **options) -> vlm.VLM:
    return vlm.build(tiny_cfg("clip", family, {**XATTN, **options})).eval()


def open_gates(model: vlm.VLM, value: float = 0.7) -> None:
    """Non-zero gates (a trained model's): the blocks then change the LLM's output."""
    with torch.no_grad():
        for block in model.connector.blocks.values():
            block.attn_gate.fill_(value)
            block.ff_gate.fill_(value)


def ids_with_images(model: vlm.VLM, rows: list[list[int]], length: int = 24, seed: int = 0) -> torch.Tensor:
    """Random text ids (never the image token) with one ``<image>`` token at each listed position of each row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (len(rows), length), generator=g)
    for r, positions in enumerate(rows):
        ids[r, positions] = model.image_token_id
    return ids


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "gemma"])
def test_identity_at_init_equals_the_plain_llm(family, seed):
    model = xattn_model(family)
    assert model.num_image_tokens() == 1 and len(model.connector.blocks) == TINY_TEXT[family].get(
        "num_hidden_layers", TINY_TEXT[family].get("n_layer"))
    plain = AutoModelForCausalLM.from_config(model.llm.model.config).eval()
    plain.load_state_dict(model.llm.model.state_dict())  # the same weights, no blocks
    ids = ids_with_images(model, [[3], [2, 10]])
    px = torch.randn(3, 3, 32, 32)
    ref = plain(input_ids=ids).logits
    torch.testing.assert_close(model(ids, px).logits, ref, atol=0, rtol=0)
    open_gates(model)  # the check above can fail: with open gates the images change the logits
    assert (model(ids, px).logits - ref).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_decoder_layers_are_found_generically(family):
    configs = {**TINY_TEXT, "opt": {"model_type": "opt", "hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 3,
                                    "num_attention_heads": 4, "word_embed_proj_dim": 32, "vocab_size": 128}}
    lm = HFCausalLM(config=configs[family])
    layers = lm.decoder_layers()
    assert isinstance(layers, torch.nn.ModuleList) and len(layers) == lm.model.config.num_hidden_layers
    assert {type(layer).__name__ for layer in layers} <= set(lm.model._no_split_modules)


def test_every_n_layers_places_blocks_before_layers():
    llama = {**TINY_TEXT["llama"], "num_hidden_layers": 4}
    cfg = tiny_cfg("clip", "llama", {**XATTN, "every_n_layers": 2})
    cfg["llm"]["config"] = llama
    assert list(vlm.build(cfg).connector.blocks) == ["1", "3"]   # (i + 1) % 2 == 0
    cfg["connector"]["every_n_layers"] = 5
    with pytest.raises(ValueError, match="every_n_layers=5 leaves no block in an LLM of 4 decoder layers"):
        vlm.build(cfg)


def test_media_mask_token_by_token():
    ids = torch.tensor([[5, 7, 9, 5, 9, 5, 5],
                        [9, 5, 5, 5, 5, 5, 5]])
    feats = torch.randn(3, 2, 4)  # row 0: images 1, 2; row 1: image 1; K = 2 keys each
    media = layout_media(feats, ids, image_token_id=9)
    torch.testing.assert_close(media.features[0, :2], feats[0])
    torch.testing.assert_close(media.features[0, 2:], feats[1])
    torch.testing.assert_close(media.features[1, :2], feats[2])
    assert media.key_image.tolist() == [[1, 1, 2, 2], [1, 1, 0, 0]]
    imm = media.allowed(2, 7, all_previous=False)
    prev = media.allowed(2, 7, all_previous=True)
    # per text position: which images (1-based) it may see
    seen = lambda mask, r: [sorted({int(k) for k, ok in zip(media.key_image[r], mask[r, i]) if ok}) for i in range(mask.shape[1])]
    assert seen(imm, 0) == [[], [], [1], [1], [2], [2], [2]]
    assert seen(prev, 0) == [[], [], [1], [1], [1, 2], [1, 2], [1, 2]]
    assert seen(imm, 1) == [[1]] * 7 and seen(prev, 1) == [[1]] * 7
    # generation: later positions (uncached: a longer call; cached: one new token) continue the last image
    assert seen(media.allowed(2, 9, False), 0)[7:] == [[2], [2]]
    assert seen(media.allowed(2, 1, False), 0) == [[2]]
    # packed rows: a segment never sees another segment's image
    seg = torch.tensor([[1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 1, 1, 1, 1]])
    packed = layout_media(feats, ids, 9, segment_ids=seg).allowed(2, 7, all_previous=True)
    assert seen(packed, 0) == [[], [], [1], [], [2], [2], [2]]


def test_block_attention_follows_the_mask(seed):
    block = GatedCrossAttentionBlock(dim=16, media_dim=8, heads=2, head_dim=4, ff_mult=2)
    ids = torch.tensor([[5, 9, 5, 5, 9, 5, 5]])
    x = torch.randn(1, 7, 16)
    feats = torch.randn(2, 3, 8)
    with torch.no_grad():
        block.attn_gate.fill_(1.0)
        run = lambda f: block(x, *(lambda m: (m.features, m.allowed(1, 7, False)))(layout_media(f, ids, 9)))
        base = run(feats)
        text_only = block(x, None, None)
        torch.testing.assert_close(base[:, :1], text_only[:, :1])        # before any image: no attention
        assert (base[:, 1:] - text_only[:, 1:]).abs().amin() > 0
        other2 = feats.clone()
        other2[1] += 1.0
        changed = (run(other2) - base).abs().amax(-1)[0]
        assert changed[:4].max() == 0 and changed[4:].min() > 0          # image 2 reaches tokens from its own on
        other1 = feats.clone()
        other1[0] += 1.0
        changed = (run(other1) - base).abs().amax(-1)[0]
        assert changed[1:4].min() > 0 and changed[4:].max() == 0         # after image 2: image 1 is not seen


@pytest.mark.parametrize("only_immediate", [True, False])
def test_media_masking_through_the_model(only_immediate, seed):
    model = xattn_model(only_immediate=only_immediate)
    open_gates(model)
    ids = ids_with_images(model, [[4, 12], []], length=20)
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        base = model(ids, px).logits
        for image, pos in ((1, 12), (0, 4)):
            other = px.clone()
            other[image] = torch.randn(3, 32, 32)
            diff = (model(ids, other).logits - base).abs().amax(-1)
            assert diff[0, :pos].max() == 0, f"tokens before image {image + 1} changed"
            assert diff[0, pos:].min() > 0, f"tokens from image {image + 1} on did not change"
            assert diff[1].max() == 0                                      # the other row has no image
        alone = model(ids[1:], None).logits                                # a text-only row, batched alone
    torch.testing.assert_close(alone, base[1:], atol=1e-5, rtol=1e-5)


def test_cached_equals_uncached_greedy_generation(seed):
    model = xattn_model()
    open_gates(model)
    with torch.no_grad():
        for p in model.llm.parameters():  # a less flat random LM, so greedy tokens vary
            p.mul_(4.0)
    ids = ids_with_images(model, [[0, 6], [5]], length=12)
    ids[1, :3] = 0                                                         # left padding
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    px = torch.randn(3, 3, 32, 32)
    cached = model.generate(ids, px, attention_mask=mask, max_new_tokens=8, pad_token_id=0)
    uncached = model.generate(ids, px, attention_mask=mask, max_new_tokens=8, pad_token_id=0, use_cache=False)
    assert torch.equal(cached, uncached)
    # and both equal a greedy loop over full forward passes
    seq, am = ids, mask
    with torch.no_grad():
        for _ in range(8):
            nxt = model(seq, px, attention_mask=am).logits[:, -1].argmax(-1, keepdim=True)
            seq, am = torch.cat([seq, nxt], 1), torch.cat([am, torch.ones_like(nxt)], 1)
    assert torch.equal(cached, seq[:, ids.shape[1]:])
    assert len(set(cached.flatten().tolist())) > 2                        # not a constant output


@pytest.mark.parametrize("reducer,keys", [({"name": "mlp", "depth": 2}, 16), ({"name": "linear", "out_dim": 24}, 16),
                                          ({"name": "perceiver", "num_latents": 5, "depth": 2, "heads": 2,
                                            "head_dim": 8}, 5)])
def test_save_load_round_trip_with_a_reducer(reducer, keys, tmp_path, seed):
    model = xattn_model(reducer=reducer)
    open_gates(model)
    assert model.connector.reducer is not None
    assert model.connector.num_media_tokens(16, (4, 4)) == keys          # perceiver: 16 patch tokens -> 5 latents
    ids = ids_with_images(model, [[2], [1, 8]])
    px = torch.randn(3, 3, 32, 32)
    media = model.image_features(px)
    assert media.shape == (3, keys, reducer.get("out_dim", 32))
    model.save_pretrained(tmp_path)
    loaded = vlm.load(tmp_path).eval()
    assert any(k.startswith("connector.blocks.1.to_kv") for k in loaded.state_dict())
    torch.testing.assert_close(loaded(ids, px).logits, model(ids, px).logits, atol=0, rtol=0)


def test_gradients_reach_gates_then_every_block_parameter(seed):
    model = xattn_model(reducer={"name": "mlp", "depth": 2})
    ids = ids_with_images(model, [[2], [1, 8]])
    px = torch.randn(3, 3, 32, 32)
    model(ids, px, labels=ids).loss.backward()
    for name, p in model.connector.blocks.named_parameters():  # at init only the gates: tanh(0) = 0 blocks the rest
        assert (p.grad is not None and p.grad.abs().sum() > 0) == name.endswith("_gate"), name
    model.zero_grad()
    open_gates(model, 0.3)
    model(ids, px, labels=ids).loss.backward()
    for name, p in model.connector.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_lora_on_the_llm_and_the_blocks_trained(seed):
    from vlm.train import compose
    from vlm.train.build import build_model, build_tokenizer
    from vlm.train.policy import apply_policies

    cfg = compose("micro", ["connector=xattn", "connector.heads=2", "connector.head_dim=8",
                            "stage.sft.policy.llm=lora", "stage.sft.policy.connector=full"])
    model = build_model(cfg, build_tokenizer(cfg, ["plain", "chatml"]))
    apply_policies(model, cfg.stage.sft)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and any(n.startswith("connector.blocks.") for n in trainable)
    assert not any(n.startswith("llm.") and "lora_" not in n for n in trainable)
    open_gates(model)
    ids = ids_with_images(model, [[1], [3]], length=12)
    model.train()
    model(ids, torch.randn(2, 3, 32, 32), labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "lora_A" not in n)


def test_bad_input_is_a_clear_error(seed):
    model = xattn_model()
    px = torch.randn(2, 3, 32, 32)
    text = ids_with_images(model, [[], []])
    with pytest.raises(ValueError, match=r"2 image\(s\) were given but input_ids hold 0 <image> token"):
        model(text, px)
    one = ids_with_images(model, [[3], []])
    with pytest.raises(ValueError, match=r"2 image\(s\) .* hold 1 <image> token.*per row \{0: 1\}"):
        model(one, px)
    with pytest.raises(ValueError, match="no pixel_values"):
        model(one)
    with pytest.raises(ValueError, match="image"):
        model.generate(text, px, max_new_tokens=2, pad_token_id=0)


@pytest.mark.parametrize("reducer,match", [({"name": "xattn"}, "token connector"),
                                           ({"name": "mlpp"}, "unknown connector 'mlpp'"),
                                           ({"name": "mlp", "depht": 2}, "depht"),
                                           ({"depth": 2}, "needs a 'name'")])
def test_bad_reducer_is_refused_at_compose_time(reducer, match):
    from vlm.train import ConfigError, compose

    with pytest.raises(ConfigError, match=match):
        compose("micro", ["connector=xattn", f"connector.reducer={reducer}".replace("'", "")])


def test_pretrain_and_sft_smoke_with_lora_under_fsdp(tmp_path):
    """Pretrain (connector only) then SFT (blocks + LoRA on the LLM), under FSDP2 (a world of one: the decoder layers
    are sharded units with the blocks' hooks on them), then the exported model loads and evaluation generated."""
    from vlm.train import compose, run

    res = run(compose("micro", ["connector=xattn", "connector.heads=2", "connector.head_dim=8",
                                "stage.pretrain.policy={encoder:frozen,connector:full,llm:frozen}",
                                "stage.sft.policy.llm=lora", "trainer.strategy=fsdp", "eval.limit=4",
                                f"output_dir={tmp_path}"]))
    assert set(res.losses) == {"pretrain", "sft"} and all(len(v) for v in res.losses.values())
    model = vlm.load(res.final_dir)
    assert model.num_image_tokens() == 1 and len(model.connector.blocks) == 2
    assert any(float(b.attn_gate.detach().abs()) > 0 for b in model.connector.blocks.values())  # the gates were trained
    assert res.eval  # evaluation generated through the blocks


def test_dtype_and_gradient_checkpointing(seed):
    model = xattn_model(dtype="bfloat16")
    assert {p.dtype for p in model.connector.parameters()} == {torch.bfloat16}
    ids = ids_with_images(model, [[2], [1, 8]])
    px = torch.randn(3, 3, 32, 32)
    assert model(ids, px).logits.isfinite().all()
    ref = xattn_model()
    open_gates(ref, 0.3)
    ckpt = vlm.build(tiny_cfg("clip", "llama", XATTN))
    ckpt.load_state_dict(ref.state_dict())
    ckpt.llm.enable_gradient_checkpointing()
    grads = []
    for m in (ref, ckpt):
        m.train()
        m(ids, px, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in m.connector.named_parameters()})
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, atol=1e-5, rtol=1e-4, msg=n)
