"""mRoPE (``vlm.llm.mrope``) and the Qwen2-VL text model as an LLM component, against transformers' own classes:
``get_rope_index`` positions, ``Qwen2VLForConditionalGeneration`` logits and greedy ``generate``."""
from __future__ import annotations

import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen2VLForConditionalGeneration
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

from vlm.llm import build as build_llm
from vlm.llm.hf_causal_lm import HFCausalLM
from vlm.llm.masks import positions_from_segments
from vlm.llm.mrope import MRope
from vlm.llm.positions import POSITION_SCHEMES, MediaTokens

MERGE = 2
IMAGE, VIDEO, PAD = 101, 102, 0
TEXT_CFG = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 110,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}}


class RopeIndex:
    """transformers' ``get_rope_index`` on a config alone (no weights)."""

    def __init__(self, model_class, config):
        self.config, self._cls = config, model_class

    def __call__(self, *args, **kwargs):
        return self._cls.get_rope_index(self, *args, **kwargs)

    def get_vision_position_ids(self, *args, **kwargs):
        return self._cls.get_vision_position_ids(self, *args, **kwargs)


def qwen2_index():
    return RopeIndex(Qwen2VLModel, Qwen2VLConfig(vision_config={"spatial_merge_size": MERGE}))


def qwen25_index(tokens_per_second=2):
    return RopeIndex(Qwen2_5_VLModel, Qwen2_5_VLConfig(
        vision_config={"spatial_merge_size": MERGE, "tokens_per_second": tokens_per_second}))


def batch(rows):
    """``rows``: per sample a list of ``("t", n)`` (n text tokens), ``("i", (t, h, w))`` (an image, patch grid) or
    ``("v", (t, h, w), seconds_per_grid)`` (a video). Left-pads to one length. Returns input_ids, mm_token_type_ids,
    attention_mask, transformers' grids (image, video, second_per_grid_ts) and our ``MediaTokens``."""
    seqs, images, videos, seconds, grids, steps, kinds = [], [], [], [], [], [], []
    g = torch.Generator().manual_seed(0)
    for row in rows:
        ids = []
        for item in row:
            if item[0] == "t":
                ids += torch.randint(1, 100, (item[1],), generator=g).tolist()
                continue
            t, h, w = item[1]
            ids += [IMAGE if item[0] == "i" else VIDEO] * (t * h * w // MERGE**2)
            grids.append((t, h // MERGE, w // MERGE))
            kinds.append(item[0])
            if item[0] == "i":
                images.append(item[1])
                steps.append(1.0)
            else:
                videos.append(item[1])
                seconds.append(item[2])
                steps.append(item[2])
        seqs.append(ids)
    L = max(map(len, seqs))
    input_ids = torch.tensor([[PAD] * (L - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (L - len(s)) + [1] * len(s) for s in seqs])
    types = (input_ids == IMAGE).long() + 2 * (input_ids == VIDEO).long()
    return {"input_ids": input_ids, "mm_token_type_ids": types, "attention_mask": mask,
            "image_grid_thw": torch.tensor(images) if images else None,
            "video_grid_thw": torch.tensor(videos) if videos else None,
            "second_per_grid_ts": torch.tensor(seconds) if seconds else None,
            "media": MediaTokens(types > 0, grids, steps), "kinds": kinds}


def qwen2_media(b):
    """Qwen2-VL: every temporal step is 1 (no seconds)."""
    m = b["media"]
    return MediaTokens(m.mask, m.grids, None)


CASES = {
    "one_image": [[("t", 3), ("i", (1, 4, 6)), ("t", 4)]],
    "two_images_different_grids": [[("t", 2), ("i", (1, 4, 6)), ("t", 3), ("i", (1, 6, 2)), ("t", 2)]],
    "image_first_and_last": [[("i", (1, 2, 4)), ("t", 3), ("i", (1, 4, 4))]],
    "batch_counts_left_padding": [[("t", 2), ("i", (1, 4, 6)), ("t", 1), ("i", (1, 2, 2)), ("t", 3)],
                                  [("t", 4)],
                                  [("t", 1), ("i", (1, 6, 4)), ("t", 2)]],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_image_positions_equal_transformers_get_rope_index(case):
    b = batch(CASES[case])
    want, want_delta = qwen2_index()(b["input_ids"], b["mm_token_type_ids"], image_grid_thw=b["image_grid_thw"],
                                     attention_mask=b["attention_mask"])
    got, delta = MRope().rope_index(b["input_ids"], attention_mask=b["attention_mask"], media=qwen2_media(b))
    assert torch.equal(got, want) and torch.equal(delta, want_delta)
    assert torch.equal(POSITION_SCHEMES.get("mrope")().position_ids(
        b["input_ids"], attention_mask=b["attention_mask"], media=qwen2_media(b)), want)


def test_right_padding_equals_transformers_get_rope_index():
    b = batch(CASES["batch_counts_left_padding"])
    L = b["input_ids"].shape[1]
    order = torch.stack([torch.cat([torch.arange(L - n, L), torch.arange(L - n)])  # each row's padding to the right
                         for n in b["attention_mask"].sum(1).tolist()])
    ids, types, mask = (b[k].gather(1, order) for k in ("input_ids", "mm_token_type_ids", "attention_mask"))
    want, want_delta = qwen2_index()(ids, types, image_grid_thw=b["image_grid_thw"], attention_mask=mask)
    got, delta = MRope().rope_index(ids, attention_mask=mask, media=MediaTokens(types > 0, b["media"].grids))
    assert torch.equal(got, want) and torch.equal(delta, want_delta)


def test_video_positions_equal_transformers_qwen2_vl():
    b = batch([[("t", 2), ("v", (4, 4, 6), 1.0), ("t", 3), ("i", (1, 2, 2)), ("t", 1)],
               [("t", 1), ("v", (6, 2, 2), 1.0), ("t", 2)]])  # t > h, w: text continues after max(h, w)
    want, want_delta = qwen2_index()(b["input_ids"], b["mm_token_type_ids"], image_grid_thw=b["image_grid_thw"],
                                     video_grid_thw=b["video_grid_thw"], attention_mask=b["attention_mask"])
    got, delta = MRope().rope_index(b["input_ids"], attention_mask=b["attention_mask"], media=qwen2_media(b))
    assert torch.equal(got, want) and torch.equal(delta, want_delta)


@pytest.mark.parametrize("tokens_per_second, seconds", [(2, [1.0, 0.5]), (4, [0.25, 1.5]), (25, [0.08, 2.0])])
def test_video_positions_equal_transformers_qwen2_5_vl(tokens_per_second, seconds):
    """Qwen2.5-VL: the temporal step is tokens_per_second * second_per_grid_ts (fractional steps floored per frame);
    images keep step 1."""
    b = batch([[("t", 2), ("v", (6, 4, 4), seconds[0]), ("t", 2), ("i", (1, 4, 2)), ("t", 1)],
               [("v", (4, 2, 4), seconds[1]), ("t", 3)]])
    want, want_delta = qwen25_index(tokens_per_second)(
        b["input_ids"], b["mm_token_type_ids"], image_grid_thw=b["image_grid_thw"],
        video_grid_thw=b["video_grid_thw"], second_per_grid_ts=b["second_per_grid_ts"],
        attention_mask=b["attention_mask"])
    m = b["media"]
    steps = [tokens_per_second * s if kind == "v" else 1.0 for s, kind in zip(m.time_steps, b["kinds"])]
    got, delta = MRope().rope_index(b["input_ids"], attention_mask=b["attention_mask"],
                                    media=MediaTokens(m.mask, m.grids, steps))
    assert torch.equal(got, want) and torch.equal(delta, want_delta)


@pytest.mark.parametrize("first, second", [("i", "i"), ("i", "v"), ("v", "i")])
def test_touching_media_stay_two(first, second):
    """Two images (or an image and a video) whose placeholders touch: each takes its grid's token count, so the
    positions are transformers' for the same sequence with one text token between them, that token removed and
    everything after it one lower."""
    grids = {"i": (1, 4, 6), "v": (2, 4, 4)}
    def item(k):
        return (k, grids[k]) if k == "i" else (k, grids[k], 1.0)

    apart = batch([[("t", 2), item(first), ("t", 1), item(second), ("t", 2)]])
    want, _ = qwen2_index()(apart["input_ids"], apart["mm_token_type_ids"], image_grid_thw=apart["image_grid_thw"],
                            video_grid_thw=apart["video_grid_thw"])
    sep = 2 + grids[first][0] * grids[first][1] * grids[first][2] // MERGE**2
    want = torch.cat([want[..., :sep], want[..., sep + 1:] - 1], dim=-1)
    keep = torch.ones(apart["input_ids"].shape[1], dtype=torch.bool)
    keep[sep] = False
    ids = apart["input_ids"][:, keep]
    got, delta = MRope().rope_index(ids, media=MediaTokens(qwen2_media(apart).mask[:, keep], apart["media"].grids))
    assert torch.equal(got, want)
    assert int(delta) == int(want.max()) + 1 - ids.shape[1]


def test_packed_samples_restart_each_at_zero():
    """A packed row: each sample's positions are transformers' for that sample alone; a text-only packed row gives
    the 1-D scheme's positions on all three axes."""
    samples = [[("t", 2), ("i", (1, 4, 6)), ("t", 3)], [("t", 1), ("i", (1, 2, 4)), ("t", 2)], [("t", 4)]]
    parts = [batch([s]) for s in samples]
    index = qwen2_index()
    want = [index(p["input_ids"], p["mm_token_type_ids"], image_grid_thw=p["image_grid_thw"])[0]
            if p["image_grid_thw"] is not None else torch.arange(p["input_ids"].shape[1]).expand(3, 1, -1)
            for p in parts]
    ids = torch.cat([p["input_ids"] for p in parts], 1)
    seg = torch.cat([torch.full_like(p["input_ids"], k + 1) for k, p in enumerate(parts)], 1)
    mask = torch.cat([p["media"].mask for p in parts], 1)
    grids = [g for p in parts for g in p["media"].grids]
    got = MRope().position_ids(ids, segment_ids=seg, media=MediaTokens(mask, grids))
    assert torch.equal(got[1:], torch.cat(want, -1))
    collated = positions_from_segments(seg)  # the collator's 1-D positions cannot place images: replaced
    assert torch.equal(MRope().position_ids(ids, segment_ids=seg, position_ids=collated,
                                            media=MediaTokens(mask, grids)), got)
    assert MRope().position_ids(ids, position_ids=collated) is collated  # text only: kept
    three = got[1:].clone()
    assert MRope().position_ids(ids, position_ids=three, media=MediaTokens(mask, grids)) is three  # 3-D: kept
    assert torch.equal(got[0], positions_from_segments(seg))  # the 1-D row transformers reads for sample boundaries
    text_seg = torch.tensor([[1, 1, 1, 2, 2, 0, 0]])
    got = MRope().position_ids(torch.ones_like(text_seg), segment_ids=text_seg)
    assert torch.equal(got, positions_from_segments(text_seg).expand(4, 1, -1))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_samples_give_each_samples_own_logits(attn):
    """Our LLM on a packed row (segment mask, the scheme's positions) gives each sample's logits run alone."""
    from vlm.llm.masks import segment_mask

    ref = reference_model()
    lm = our_lm(ref)
    lm.model.config._attn_implementation = attn
    samples = [[("t", 2), ("i", (1, 4, 6)), ("t", 3)], [("t", 1), ("i", (1, 2, 4)), ("t", 2)]]
    parts = [batch([s]) for s in samples]
    pixels = [image_inputs(p) for p in parts]
    with torch.no_grad():
        alone = [lm(inputs_embeds=our_embeds(ref, lm, p, x),
                    position_ids=MRope().position_ids(p["input_ids"], media=qwen2_media(p))).logits
                 for p, x in zip(parts, pixels)]
        packed = {k: torch.cat([p[k] for p in parts], 1) for k in ("input_ids",)}
        packed["image_grid_thw"] = torch.cat([p["image_grid_thw"] for p in parts])
        seg = torch.cat([torch.full_like(p["input_ids"], k + 1) for k, p in enumerate(parts)], 1)
        media = MediaTokens(torch.cat([p["media"].mask for p in parts], 1), [g for p in parts for g in p["media"].grids])
        embeds = our_embeds(ref, lm, packed, torch.cat(pixels))
        got = lm(inputs_embeds=embeds, attention_mask=segment_mask(seg, attn, embeds.dtype),
                 position_ids=MRope().position_ids(packed["input_ids"], segment_ids=seg, media=media)).logits
    assert (got - torch.cat(alone, 1)).abs().max() <= 1e-4


def test_bad_media_is_named():
    b = batch([[("t", 2), ("i", (1, 4, 6)), ("t", 3)]])
    mask = b["media"].mask
    with pytest.raises(ValueError, match="placeholder tokens but the grids"):
        MediaTokens(mask, [(1, 2, 2)])
    split = mask.clone()
    split[0, 4] = False
    split[0, 8] = True  # 6 placeholders, but not consecutive
    with pytest.raises(ValueError, match=r"row 0: the image/video at position 2 has grid \(1, 2, 3\)"):
        MRope().rope_index(b["input_ids"], media=MediaTokens(split, [(1, 2, 3)]))
    with pytest.raises(ValueError, match="row 0 has an image/video placeholder at position 2.*padding"):
        MRope().rope_index(b["input_ids"], attention_mask=(~mask).long(), media=b["media"])


# -- the Qwen2-VL text model as an LLM component ----------------------------------------------------------------------
def reference_model(tie: bool = False) -> Qwen2VLForConditionalGeneration:
    torch.manual_seed(0)
    cfg = Qwen2VLConfig(
        text_config=dict(TEXT_CFG, bos_token_id=None, eos_token_id=None, pad_token_id=None),
        vision_config={"depth": 1, "embed_dim": 16, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2,
                       "patch_size": 2, "spatial_merge_size": MERGE, "temporal_patch_size": 2, "in_channels": 3},
        image_token_id=IMAGE, video_token_id=VIDEO, tie_word_embeddings=tie)
    return Qwen2VLForConditionalGeneration(cfg).eval()


def our_lm(ref: Qwen2VLForConditionalGeneration) -> HFCausalLM:
    lm = build_llm({"name": "hf_causal_lm", "config": dict(TEXT_CFG, model_type="qwen2_vl_text")}).eval()
    lm.model.model.load_state_dict(ref.model.language_model.state_dict())
    lm.model.lm_head.load_state_dict(ref.lm_head.state_dict())
    return lm


def image_inputs(b):
    g = torch.Generator().manual_seed(1)
    n = int(b["image_grid_thw"].prod(-1).sum())
    return torch.randn(n, 3 * 2 * 2 * 2, generator=g)


def our_embeds(ref, lm, b, pixels):
    feats = torch.cat(ref.model.get_image_features(pixels, b["image_grid_thw"]).pooler_output)
    return HFCausalLM.inject(lm.embed(b["input_ids"]), b["input_ids"], feats, IMAGE)


def test_the_text_model_states_mrope_from_its_config():
    lm = build_llm({"name": "hf_causal_lm", "config": dict(TEXT_CFG, model_type="qwen2_vl_text")})
    assert lm.position_scheme == "mrope" and type(lm.model).__name__ == "CausalLMFromBase"
    lm25 = build_llm({"name": "hf_causal_lm", "config": dict(TEXT_CFG, model_type="qwen2_5_vl_text")})
    assert lm25.position_scheme == "mrope"
    llama = dict(TEXT_CFG, model_type="llama")
    llama.pop("rope_parameters")
    assert build_llm({"name": "hf_causal_lm", "config": llama}).position_scheme == "rope_1d"


def test_logits_equal_transformers_text_only():
    ref = reference_model()
    lm = our_lm(ref)
    ids = torch.randint(1, 100, (2, 9))
    positions = MRope().position_ids(ids)
    got = lm(inputs_embeds=lm.embed(ids), position_ids=positions).logits
    want = ref(input_ids=ids).logits
    assert (got - want).abs().max() <= 1e-4


def test_logits_equal_transformers_with_images_and_left_padding():
    ref = reference_model()
    lm = our_lm(ref)
    b = batch(CASES["batch_counts_left_padding"])
    pixels = image_inputs(b)
    with torch.no_grad():
        want = ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=pixels,
                   image_grid_thw=b["image_grid_thw"], mm_token_type_ids=b["mm_token_type_ids"]).logits
        embeds = our_embeds(ref, lm, b, pixels)
        positions = MRope().position_ids(b["input_ids"], attention_mask=b["attention_mask"], media=qwen2_media(b))
        got = lm(inputs_embeds=embeds, attention_mask=b["attention_mask"], position_ids=positions).logits
        one_d = lm(inputs_embeds=embeds, attention_mask=b["attention_mask"]).logits
    keep = b["attention_mask"].bool()
    assert (got - want)[keep].abs().max() <= 1e-4
    assert (one_d - want)[keep].abs().max() > 1e-3  # the 3-D positions matter


def test_greedy_generation_equals_transformers_with_images_and_left_padding():
    """Same tokens as transformers' generate, and the same logits at every step (prefill on the 3-D positions, each
    decode step at tokens so far + the rope delta, left padding included); 1-D positions give other logits."""
    ref = reference_model()
    lm = our_lm(ref)
    b = batch(CASES["batch_counts_left_padding"])
    pixels = image_inputs(b)
    common = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": PAD, "output_logits": True,
              "return_dict_in_generate": True}
    with torch.no_grad():
        want = ref.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=pixels,
                            image_grid_thw=b["image_grid_thw"], mm_token_type_ids=b["mm_token_type_ids"], **common)
        embeds = our_embeds(ref, lm, b, pixels)
        scheme = POSITION_SCHEMES.get(lm.position_scheme)()
        extra = scheme.generation_inputs(b["input_ids"], attention_mask=b["attention_mask"], media=qwen2_media(b))
        got = lm.model.generate(inputs_embeds=embeds, attention_mask=b["attention_mask"], **extra, **common)
        plain = lm.model.generate(inputs_embeds=embeds, attention_mask=b["attention_mask"], **common)
    assert torch.equal(got.sequences, want.sequences[:, b["input_ids"].shape[1]:])
    diffs = [(g - w).abs().max() for g, w in zip(got.logits, want.logits)]
    assert len(diffs) == 6 and max(diffs) <= 1e-4
    assert (plain.logits[1] - want.logits[1]).abs().max() > 1e-5  # 1-D positions would not do


def test_saved_llm_and_saved_qwen2_vl_directory_load_as_the_llm(tmp_path):
    """``pretrained:`` a directory saved from our LLM, and a saved full Qwen2VLForConditionalGeneration (its language
    model and lm_head are read, the vision tower left out; tied and untied heads)."""
    for tie in (False, True):
        ref = reference_model(tie=tie)
        lm = our_lm(ref)
        ids = torch.randint(1, 100, (1, 6))
        want = ref(input_ids=ids).logits
        ref.save_pretrained(tmp_path / f"full{tie}")
        lm.model.save_pretrained(tmp_path / f"ours{tie}")
        for d in (f"full{tie}", f"ours{tie}"):
            loaded = build_llm({"name": "hf_causal_lm", "pretrained": str(tmp_path / d)}).eval()
            assert loaded.position_scheme == "mrope"
            got = loaded(inputs_embeds=loaded.embed(ids), position_ids=MRope().position_ids(ids)).logits
            assert (got - want).abs().max() <= 1e-4, d


def test_qwen2_5_vl_directory_loads_as_the_llm_with_its_logits(tmp_path):
    """Qwen2.5-VL: a saved Qwen2_5_VLForConditionalGeneration's language model, its logits with 3-D positions (an image
    in the middle, positions from our scheme) equal to transformers' (features injected into both)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    cfg = Qwen2_5_VLConfig(
        text_config=dict(TEXT_CFG, bos_token_id=None, eos_token_id=None, pad_token_id=None),
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
                       "out_hidden_size": 32, "patch_size": 2, "spatial_merge_size": MERGE, "temporal_patch_size": 2,
                       "window_size": 8, "fullatt_block_indexes": [1]},
        image_token_id=IMAGE, video_token_id=VIDEO)
    ref = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    ref.save_pretrained(tmp_path)
    lm = build_llm({"name": "hf_causal_lm", "pretrained": str(tmp_path)}).eval()
    assert lm.position_scheme == "mrope"
    b = batch([[("t", 3), ("i", (1, 4, 6)), ("t", 4)]])
    pixels = image_inputs(b)
    with torch.no_grad():
        want = ref(input_ids=b["input_ids"], pixel_values=pixels, image_grid_thw=b["image_grid_thw"],
                   mm_token_type_ids=b["mm_token_type_ids"]).logits
        embeds = our_embeds(ref, lm, b, pixels)
        got = lm(inputs_embeds=embeds, position_ids=MRope().position_ids(b["input_ids"], media=qwen2_media(b))).logits
    assert (got - want).abs().max() <= 1e-4


def test_the_wrapped_text_model_trains_with_lora_checkpointing_and_resizing():
    from peft import LoraConfig, get_peft_model

    cfg = dict(TEXT_CFG, model_type="qwen2_vl_text", tie_word_embeddings=True)
    lm = build_llm({"name": "hf_causal_lm", "config": cfg})
    assert lm.model.lm_head.weight is lm.model.get_input_embeddings().weight
    lm.resize_token_embeddings(120)
    assert lm.vocab_size == 120 and lm.output_head.weight.shape[0] == 120
    assert len(lm.decoder_layers()) == 2
    assert lm.enable_gradient_checkpointing("full")
    peft_model = get_peft_model(lm.model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    lm.train()
    ids = torch.randint(1, 100, (2, 7))
    out = peft_model(inputs_embeds=lm.embed(ids), position_ids=MRope().position_ids(ids), labels=ids)
    out.loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None for g in grads)
    hidden = lm.hidden_states(inputs_embeds=lm.embed(ids), position_ids=MRope().position_ids(ids))
    assert hidden.shape == (2, 7, 32)


def test_vlm_generate_continues_mrope_positions_as_a_full_recompute():
    """``VLM.generate`` with an mRoPE LLM (a CLIP tower, its 4 x 4 grid per image): each new token equals the argmax
    of a forward without cache over prompt + tokens so far, positions recomputed from scratch (left padding, rows
    with different image counts)."""
    import vlm
    from tests.conftest import tiny_cfg

    torch.manual_seed(0)
    cfg = tiny_cfg()
    cfg["llm"]["config"] = dict(TEXT_CFG, model_type="qwen2_vl_text", vocab_size=128)
    model = vlm.build(cfg).eval()
    assert isinstance(model.positions, MRope)
    K = model.num_image_tokens()
    assert K == 16
    tok = model.image_token_id
    rows = [[5, 6] + [tok] * K + [7, 8] + [tok] * K + [9], [3] + [tok] * K + [4, 5]]
    L = max(map(len, rows))
    ids = torch.tensor([[PAD] * (L - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
    pixels = torch.randn(3, 3, 32, 32)
    assert model.media_tokens(ids, pixels).grids == [(1, 4, 4)] * 3  # built by the model from its parts
    new = model.generate(ids, pixels, attention_mask=mask, max_new_tokens=4, pad_token_id=PAD, eos_token_id=None)
    assert not (new == tok).any()  # (a generated image token would be a placeholder in the recompute below)
    seq, m = ids, mask
    with torch.no_grad():
        for step in range(4):
            inputs = model.lm_inputs(seq, pixels, m)
            nxt = model.llm(**inputs).logits[:, -1].argmax(-1)
            assert torch.equal(nxt, new[:, step]), step
            seq, m = torch.cat([seq, nxt[:, None]], 1), torch.cat([m, torch.ones_like(m[:, :1])], 1)


def test_an_mrope_section_that_does_not_fit_the_head_is_named():
    """transformers would fail inside attention at the first step (a bare split error); the config says so first."""
    from vlm import llm as llms

    cfg = dict(TEXT_CFG, model_type="qwen2_vl_text", hidden_size=64)  # head_dim 16: 8 frequencies, section sums to 4
    with pytest.raises(ValueError, match=r"mrope_section=\[2, 1, 1\] sums to 4, but the attention heads have "
                                         r"head_dim=16 .* expected a section summing to 8, e.g. \[4, 2, 2\]"):
        llms.build({"name": "hf_causal_lm", "config": cfg})
