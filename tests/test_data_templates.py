"""Templates and label masks, token by token, on multi-turn multi-image samples; the byte tokenizer."""
from __future__ import annotations

import pytest
import torch
from data_fixtures import K, expected, processor, trained_text
from PIL import Image

from vlm.data.sample import ImageRef, Message, Sample
from vlm.data.templates import TEMPLATES, ImageSlot, Text, build_template
from vlm.data.tokenizer import SPECIAL_TOKENS, byte_tokenizer, load_tokenizer

RED, GREEN = Image.new("RGB", (20, 20), (255, 0, 0)), Image.new("RGB", (30, 10), (0, 255, 0))


def conversation(system: bool = True) -> Sample:
    msgs = [Message("system", ["Be brief."])] if system else []
    msgs += [Message("user", [ImageRef(0), "\nWhat is this?"]), Message("assistant", ["A red square."]),
             Message("user", ["And this one ", ImageRef(1), "?"]), Message("assistant", ["A green bar."])]
    return Sample(msgs, [RED, GREEN], id="conv")


CHATML = [("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n", 0), ("IMG", K),
          ("\nWhat is this?<|im_end|>\n<|im_start|>assistant\n", 0), ("A red square.<|im_end|>", 1),
          ("\n<|im_start|>user\nAnd this one ", 0), ("IMG", K), ("?<|im_end|>\n<|im_start|>assistant\n", 0),
          ("A green bar.<|im_end|>", 1), ("\n", 0)]
H = "<|start_header_id|>{}<|end_header_id|>\n\n"
LLAMA3 = [("<|begin_of_text|>" + H.format("system") + "Be brief.<|eot_id|>" + H.format("user"), 0), ("IMG", K),
          ("\nWhat is this?<|eot_id|>" + H.format("assistant"), 0), ("A red square.<|eot_id|>", 1),
          (H.format("user") + "And this one ", 0), ("IMG", K), ("?<|eot_id|>" + H.format("assistant"), 0),
          ("A green bar.<|eot_id|>", 1)]
EXPECTED = {"chatml": (CHATML, "A red square.<|im_end|>A green bar.<|im_end|>"),
            "llama3": (LLAMA3, "A red square.<|eot_id|>A green bar.<|eot_id|>")}


def check(tok, item, pieces, trained):
    ids, labels = expected(tok, pieces)
    assert item["input_ids"].tolist() == ids  # token by token
    assert item["labels"].tolist() == labels
    assert trained_text(tok, item) == trained
    assert item["pixel_values"].shape[0] == 2


@pytest.mark.parametrize("name", ["chatml", "llama3"])
def test_role_templates_masks(name):
    tok = byte_tokenizer(name)
    pieces, trained = EXPECTED[name]
    check(tok, processor(tok, name)(conversation()), pieces, trained)


@pytest.mark.parametrize("name", ["chatml", "llama3"])
@pytest.mark.parametrize("method,tags", [("generation", True), ("prefix", True), ("auto", True), ("prefix", False),
                                         ("auto", False)])
def test_tokenizer_template_matches_hand_written(name, method, tags):
    tok = byte_tokenizer(name, generation_tags=tags)
    tpl = build_template({"name": "tokenizer", "method": method})
    assert tpl.resolved_method(tok) == ("generation" if tags and method != "prefix" else "prefix")
    pieces, trained = EXPECTED[name]
    check(tok, processor(tok, tpl)(conversation()), pieces, trained)


def test_plain_template_caption_is_label():
    tok = byte_tokenizer("chatml")
    s = Sample([Message("user", [ImageRef(0), "\nDescribe."]), Message("assistant", ["A red square."])], [RED])
    item = processor(tok, "plain")(s)
    ids, labels = expected(tok, [("IMG", K), ("A red square.<|im_end|>", 1)])
    assert item["input_ids"].tolist() == ids and item["labels"].tolist() == labels
    item = processor(tok, {"name": "plain", "eos": "<|eos|>", "keep_user_text": True, "separator": "\n"})(s)
    ids, labels = expected(tok, [("IMG", K), ("\nDescribe.", 0), ("A red square.<|eos|>", 1), ("\n", 0)])
    assert item["input_ids"].tolist() == ids and item["labels"].tolist() == labels



def test_plain_template_multi_turn_multi_image_token_by_token():
    """Each user turn contributes only its images (system and user text dropped), each caption + eos is trained."""
    tok = byte_tokenizer("chatml")
    check(tok, processor(tok, "plain")(conversation()),
          [("IMG", K), ("A red square.<|im_end|>", 1), ("IMG", K), ("A green bar.<|im_end|>", 1)],
          "A red square.<|im_end|>A green bar.<|im_end|>")
    item = processor(tok, {"name": "plain", "eos": "<|eos|>", "keep_user_text": True, "separator": "\n",
                           "image_start": "<img>", "image_end": "</img>"})(conversation())
    check(tok, item, [("<img>", 0), ("IMG", K), ("</img>", 0), ("\nWhat is this?", 0), ("A red square.<|eos|>", 1),
                      ("\nAnd this one ", 0), ("<img>", 0), ("IMG", K), ("</img>", 0), ("?", 0),
                      ("A green bar.<|eos|>", 1), ("\n", 0)], "A red square.<|eos|>A green bar.<|eos|>")


@pytest.mark.parametrize("name", ["chatml", "llama3"])
def test_auto_template_uses_the_tokenizers_own_template(name):
    """``auto``: the tokenizer's chat template when it has one (here llama3 or chatml), else the chatml fallback."""
    tok = byte_tokenizer(name)
    proc = processor(tok, "auto")
    assert proc.template.pick(tok).name == "tokenizer"
    pieces, trained = EXPECTED[name]
    check(tok, proc(conversation()), pieces, trained)
    bare = byte_tokenizer(name)
    bare.chat_template = None
    proc = processor(bare, {"name": "auto", "fallback": "chatml"})
    assert proc.template.pick(bare).name == "chatml"
    check(bare, proc(conversation()), *EXPECTED["chatml"])
    with pytest.raises(ValueError, match="cannot fall back to itself"):
        build_template({"name": "auto", "fallback": "auto"})


def test_image_markers_wrap_image_tokens_and_are_not_trained():
    tok = byte_tokenizer("chatml")
    item = processor(tok, {"name": "chatml", "image_start": "<img>", "image_end": "</img>"})(conversation())
    pieces = []
    for p in CHATML:
        pieces += [("<img>", 0), p, ("</img>", 0)] if p[0] == "IMG" else [p]
    check(tok, item, pieces, EXPECTED["chatml"][1])


def test_default_system_and_generation_prompt():
    tok = byte_tokenizer("chatml")
    proc = processor(tok, {"name": "chatml", "default_system": "You are helpful."})
    item = proc(conversation(system=False), add_generation_prompt=True)
    assert item["meta"]["target"] == "A green bar."
    text = tok.decode(item["input_ids"])
    assert text.startswith("<|im_start|>system\nYou are helpful.<|im_end|>\n")
    assert text.endswith("And this one " + "<image>" * K + "?<|im_end|>\n<|im_start|>assistant\n")
    assert (item["labels"] == -100).all()
    for name, tail in (("llama3", H.format("assistant")),):
        t = byte_tokenizer(name)
        out = processor(t, {"name": "tokenizer"})(conversation(), add_generation_prompt=True)
        assert t.decode(out["input_ids"]).endswith("?<|eot_id|>" + tail)


def test_jinja_prefix_method_custom_template_without_special_tokens():
    tpl = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }} "
           "{% elif m['role'] == 'assistant' %}ASSISTANT: {{ m['content'] }}<|eos|>"
           "{% else %}{{ m['content'] }} {% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    tok = byte_tokenizer(tpl, eos_token="<|eos|>")
    item = processor(tok, "tokenizer")(conversation())
    pieces = [("Be brief. USER: ", 0), ("IMG", K), ("\nWhat is this? ASSISTANT:", 0), (" A red square.<|eos|>", 1),
              ("USER: And this one ", 0), ("IMG", K), ("? ASSISTANT:", 0), (" A green bar.<|eos|>", 1)]
    check(tok, item, pieces, " A red square.<|eos|> A green bar.<|eos|>")


def test_jinja_prefix_unstable_template_is_refused():
    tpl = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if loop.last %} (final){% endif %}\n{% endfor %}"
    tok = byte_tokenizer(tpl)
    with pytest.raises(ValueError, match="not prefix-stable at message 2"):
        processor(tok, "tokenizer")(conversation())


def test_jinja_list_content_with_template_placeholder():
    tpl = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
           "{% else %}{% for p in m['content'] %}{% if p['type'] == 'image' %}<|vision_start|><|image_pad|>"
           "<|vision_end|>{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
           "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = byte_tokenizer(tpl, extra_tokens=["<|vision_start|>", "<|vision_end|>", "<|image_pad|>"],
                         eos_token="<|im_end|>")
    proc = processor(tok, {"name": "tokenizer", "content_format": "list", "image_placeholder": "<|image_pad|>"})
    item = proc(conversation())
    pieces = []
    for p in CHATML[:-1]:
        pieces += [("<|vision_start|>", 0), p, ("<|vision_end|>", 0)] if p[0] == "IMG" else [p]
    check(tok, item, pieces + [("\n", 0)], EXPECTED["chatml"][1])
    with pytest.raises(ValueError, match=r"rendered 0 image placeholder\(s\) '<image>' for 2 image"):
        processor(tok, {"name": "tokenizer", "content_format": "list"})(conversation())


def test_render_segments_directly():
    segs = build_template("chatml").render(conversation(system=False), byte_tokenizer())
    assert segs[1] == ImageSlot(0) and Text("A red square.<|im_end|>", True) in segs
    assert all(not s.trainable for s in segs if isinstance(s, Text) and "<|im_start|>" in s.text)


def test_template_registry():
    assert set(TEMPLATES.names()) >= {"auto", "chatml", "llama3", "plain", "tokenizer", "vicuna_v1"}
    with pytest.raises(KeyError, match="unknown template 'chat' \\(did you mean 'chatml'\\?\\); known templates: auto, chatml"):
        build_template("chat")
    with pytest.raises(TypeError, match="unknown argument"):
        build_template({"name": "chatml", "bogus": 1})


# ---------------------------------------------------------------------------------------------------- vicuna_v1
LLAVA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                "helpful, detailed, and polite answers to the user's questions.")
# LLaVA-1.5: images moved to the start of their message + "\n", user turns end with " ", replies with "</s>"
VICUNA = [("<|bos|>Be brief. USER: ", 0), ("IMG", K), ("\nWhat is this? ASSISTANT:", 0), (" A red square.</s>", 1),
          ("USER: ", 0), ("IMG", K), ("\nAnd this one ? ASSISTANT:", 0), (" A green bar.</s>", 1)]
VICUNA_TRAINED = " A red square.</s> A green bar.</s>"


def text_of(segments) -> str:
    return "".join(s.text if isinstance(s, Text) else "<image>" for s in segments)


def test_vicuna_v1_renders_llava_format():
    tok = byte_tokenizer("vicuna_v1")
    tpl = build_template("vicuna_v1")
    assert text_of(tpl.render(conversation(), tok)) == (
        "<|bos|>Be brief. USER: <image>\nWhat is this? ASSISTANT: A red square.</s>"
        "USER: <image>\nAnd this one ? ASSISTANT: A green bar.</s>")
    assert text_of(tpl.render(conversation(system=False), tok)) == (
        "<|bos|>A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nWhat is this? ASSISTANT: A red "
        "square.</s>USER: <image>\nAnd this one ? ASSISTANT: A green bar.</s>")
    assert tpl.end_of_turn(tok) == "</s>" == tok.eos_token
    assert tpl.special_tokens(tok) == ["</s>", "<|bos|>"]
    # images stay where the data put them with images_first=False; text-only messages are never stripped
    kept = build_template({"name": "vicuna_v1", "images_first": False, "add_bos": False})
    assert text_of(kept.render(conversation(), tok)) == (
        "Be brief. USER: <image>\nWhat is this? ASSISTANT: A red square.</s>"
        "USER: And this one <image>? ASSISTANT: A green bar.</s>")
    spaced = Sample([Message("user", ["  hi  "]), Message("assistant", [" yo "])])
    assert text_of(kept.render(spaced, tok)) == LLAVA_SYSTEM + " USER:   hi   ASSISTANT:  yo </s>"


def test_vicuna_v1_label_mask_token_by_token():
    """Trained: each reply (with the space after ``ASSISTANT:``) and its ``</s>``; bos, system, headers, user text
    and image tokens are masked."""
    tok = byte_tokenizer("vicuna_v1")
    item = processor(tok, "vicuna_v1")(conversation())
    check(tok, item, VICUNA, VICUNA_TRAINED)
    eos = tok.convert_tokens_to_ids("</s>")
    ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
    assert ids[0] == tok.bos_token_id and labels[0] == -100
    assert [i for i, t in enumerate(ids) if t == eos] == [i for i, t in enumerate(labels) if t == eos] and \
        ids[-1] == eos == labels[-1]


def test_vicuna_v1_generation_prompt_and_system_override():
    tok = byte_tokenizer("vicuna_v1")
    item = processor(tok, "vicuna_v1")(conversation(), add_generation_prompt=True)
    assert item["meta"]["target"] == "A green bar."
    assert tok.decode(item["input_ids"]).endswith("USER: " + "<image>" * K + "\nAnd this one ? ASSISTANT:")
    assert (item["labels"] == -100).all()
    proc = processor(tok, {"name": "vicuna_v1", "default_system": "Answer briefly."})
    text = tok.decode(proc(conversation(system=False))["input_ids"])
    assert text.startswith("<|bos|>Answer briefly. USER: " + "<image>" * K + "\nWhat is this? ASSISTANT: A red")
    assert tok.decode(proc(conversation())["input_ids"]).startswith("<|bos|>Be brief. USER: ")  # the sample's wins
    bare = processor(tok, {"name": "vicuna_v1", "default_system": None, "add_bos": False})(conversation(system=False))
    check(tok, bare, [("USER: ", 0), *VICUNA[1:]], VICUNA_TRAINED)


@pytest.mark.parametrize("method", ["generation", "prefix"])
@pytest.mark.parametrize("system", [True, False])
@pytest.mark.parametrize("agp", [False, True])
def test_vicuna_v1_jinja_renders_the_same(method, system, agp):
    """The exported Jinja (``CHAT_TEMPLATES["vicuna_v1"]``) gives the same segments: text, trained spans, images."""
    tok = byte_tokenizer("vicuna_v1")
    jinja = build_template({"name": "tokenizer", "method": method, "content_format": "list",
                            "image_placeholder": "<image>"})
    assert jinja.resolved_method(tok) == method
    sample = conversation(system)
    if agp:
        sample.messages.pop()
    assert jinja.render(sample, tok, agp) == build_template("vicuna_v1").render(sample, tok, agp)
    if not agp:
        check(tok, processor(tok, jinja)(conversation(system)), VICUNA if system else
              [("<|bos|>" + LLAVA_SYSTEM + " USER: ", 0), *VICUNA[1:]], VICUNA_TRAINED)


def test_vicuna_v1_jinja_string_content_and_export(tmp_path):
    """String content with ``<image>`` is rearranged like LLaVA does; the template survives save/load."""
    tok = byte_tokenizer("vicuna_v1")
    tok.save_pretrained(tmp_path)
    back = load_tokenizer(tmp_path)
    msgs = [{"role": "user", "content": "What is <image>? "}, {"role": "assistant", "content": "A cat."},
            {"role": "user", "content": "Thanks"}]
    want = ("<|bos|>" + LLAVA_SYSTEM + " USER: <image>\nWhat is ? ASSISTANT: A cat.</s>USER: Thanks ASSISTANT:")
    assert back.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == want
    sample = Sample([Message("user", ["What is ", ImageRef(0), "? "]), Message("assistant", ["A cat."]),
                     Message("user", ["Thanks"])], [RED])
    assert text_of(build_template("vicuna_v1").render(sample, back, True)) == want
    assert len(back) == len(tok) == 256 + len(SPECIAL_TOKENS) + 1 and back.eos_token == "</s>"


def test_recipe_templates_are_registered():
    """Every ``template:`` in recipes/**/*.yaml, and every stage template of every composed recipe, is registered."""
    import yaml

    from vlm.train.config import compose, list_options, recipes_dir

    def templates(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "template":
                    yield v if isinstance(v, str) else v["name"]
                else:
                    yield from templates(v)
        elif isinstance(node, list):
            for v in node:
                yield from templates(v)

    found = {path.relative_to(recipes_dir()).as_posix(): set(templates(yaml.safe_load(path.read_text())))
             for path in recipes_dir().rglob("*.yaml")}
    assert "vicuna_v1" in found["stage/sft.yaml"] and "vicuna_v1" in found["recipe/llava15.yaml"]
    # a name, or an interpolation (readout's `${oc.select:stage.sft.template,chatml}`) checked once composed below
    found = {f: {n for n in names if not n.startswith("${")} for f, names in found.items()}
    unknown = {f: names - set(TEMPLATES.names()) for f, names in found.items() if names - set(TEMPLATES.names())}
    assert not unknown, f"recipes name unregistered templates: {unknown}"
    for recipe in list_options("recipe"):
        cfg = compose(recipe)
        for stage in cfg.stage:  # every configured stage, run or not (tiny's readout runs on data=files only)
            build_template(dict(cfg.stage[stage].template) if not isinstance(cfg.stage[stage].template, str)
                           else cfg.stage[stage].template)
    assert compose("llava15").stage.sft.template == "vicuna_v1"


# ------------------------------------------------------------------------------------------------------ tokenizer
def test_byte_tokenizer_vocab_and_roundtrip(tmp_path):
    tok = byte_tokenizer("chatml", extra_tokens=["<IMG_CONTEXT>"])
    assert len(tok) == 256 + len(SPECIAL_TOKENS) + 1 < 300
    text = "héllo wörld ✓ <image>\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[:6] == list("héllo".encode()) and tok.convert_tokens_to_ids("<image>") in ids
    assert tok.decode(ids) == text
    assert tok.pad_token == "<|pad|>" and tok.eos_token == "<|im_end|>"
    tok.save_pretrained(tmp_path / "tok")
    back = load_tokenizer(tmp_path / "tok")
    assert back(text, add_special_tokens=False)["input_ids"] == ids and len(back) == len(tok)
    assert back.chat_template == tok.chat_template and back.pad_token_id == tok.pad_token_id
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert back.apply_chat_template(msgs, tokenize=False) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    assert len(load_tokenizer("byte:llama3")) == 256 + len(SPECIAL_TOKENS)
    assert load_tokenizer("byte").eos_token == "<|im_end|>" and load_tokenizer("byte:llama3").eos_token == "<|eot_id|>"
    with pytest.raises(OSError, match="'bytes:llama3': not a local tokenizer directory"):  # specs match exactly
        load_tokenizer("bytes:llama3")
    with pytest.raises(OSError, match="not a local tokenizer directory"):
        load_tokenizer(tmp_path / "missing")


def test_unknown_special_token_in_template_is_refused():
    tok = byte_tokenizer()
    with pytest.raises(ValueError, match="'<box_start>' is not a single token"):
        processor(tok, {"name": "chatml", "image_start": "<box_start>"})
    with pytest.raises(ValueError, match="image_token '<IMG_CONTEXT>' is not a single token"):
        processor(tok, image_token="<IMG_CONTEXT>")
    assert processor(byte_tokenizer(extra_tokens=["<IMG_CONTEXT>"]), image_token="<IMG_CONTEXT>").image_token_id == 268
    assert torch.is_tensor(processor(tok)(conversation())["input_ids"])


def test_byte_bpe_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from vlm.data.processor import Processor
    from vlm.data.sample import ImageRef, Message, Sample
    from vlm.data.tokenizer import byte_bpe_tokenizer, byte_tokenizer

    corpus = ["What color is the red circle?", "<ref>red circle</ref><box>(120,340),(560,999)</box>",
              "a red circle and a blue square"] * 50
    tok = byte_bpe_tokenizer(corpus, vocab_size=320)
    assert tok.get_vocab() == byte_bpe_tokenizer(corpus, vocab_size=320).get_vocab()  # deterministic
    text = "What color is the red circle? (344,32) ünïcode ✓"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text  # every byte representable
    assert len(tok("What color is the red circle?", add_special_tokens=False)["input_ids"]) < 10
    assert len(byte_tokenizer()("What color is the red circle?", add_special_tokens=False)["input_ids"]) == 29
    digits = tok.convert_ids_to_tokens(tok("(344,32)", add_special_tokens=False)["input_ids"])
    assert [t for t in digits if t.isdigit()] == ["3", "4", "4", "3", "2"]
    for special in ("<|im_start|>", "<|im_end|>", "<image>", "<|pad|>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text, add_special_tokens=False)["input_ids"] == ids
    # the chatml label mask works the same with merged tokens
    from PIL import Image

    from vlm.data.images import ImageProcessor

    proc = Processor(tok, "chatml", ImageProcessor(8, (0.5,) * 3, (0.5,) * 3), num_image_tokens=3)
    s = Sample([Message("user", [ImageRef(0), "What color is the red circle?"]), Message("assistant", ["red"])],
               images=[Image.new("RGB", (8, 8))], id=0)
    out = proc(s)
    trained = out["input_ids"][out["labels"] != -100]
    assert tok.decode(trained) == "red<|im_end|>"
