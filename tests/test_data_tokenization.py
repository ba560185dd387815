"""Train/serve tokenization parity: the processor's ids for a conversation equal the tokenizer's ids for the whole
rendered prompt (image placeholders expanded, as ``LlavaProcessor`` does), for byte, byte-level BPE (with and without
a prefix space), Metaspace BPE (Llama-2 style), legacy Llama-2 normalizer BPE, Unigram (T5 style) and WordPiece
tokenizers built in code; labels = transformers' ``return_assistant_tokens_mask`` on the same prompt (image blocks
excepted). Also: generation prompts are never cut."""
from __future__ import annotations

import random

import pytest
import torch
from data_fixtures import processor
from PIL import Image
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from vlm.data.processor import SampleDropped
from vlm.data.readers import SampleError
from vlm.data.sample import ImageRef, Message, Sample
from vlm.data.templates import build_template
from vlm.data.tokenizer import CHAT_TEMPLATES, SPECIAL_TOKENS, byte_bpe_tokenizer, byte_tokenizer

K = 3  # image tokens per image
WORDS = ["a", "red", "circle", "and", "blue", "square", "What", "is", "this", "colour", "shape", "left", "of", "the",
         "Where", "count", "42", "3.5", "(12, 7)", "héllo", "wörld", "naïve", "日本語", "✓", "🙂", "it's", "x+y=z"]
CORPUS = [" ".join(random.Random(i).choices(WORDS, k=8)) for i in range(300)] + \
    ["What is this? a red circle and a blue square.", "user\nWhat colour is it?", "assistant\nblue"] * 20


def fast(tok: Tokenizer, unk: str | None = None, strip: bool = False) -> PreTrainedTokenizerFast:
    """Wrap a ``tokenizers.Tokenizer`` holding :data:`SPECIAL_TOKENS` like ``byte_tokenizer`` does (``strip``: the
    special tokens swallow the whitespace around them, as some tokenizers' do)."""
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False, lstrip=strip, rstrip=strip)
                            for s in SPECIAL_TOKENS])
    extra = {"unk_token": unk} if unk else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>",
                                   eos_token="<|eos|>", **extra,
                                   extra_special_tokens=[s for s in SPECIAL_TOKENS if s not in ("<|pad|>", "<|bos|>")])


def llama2_bpe() -> PreTrainedTokenizerFast:
    """BPE + ``Metaspace(prepend_scheme="first", split=False)`` (Llama-2 / Mistral style; merges are learned within
    words, as SentencePiece does, so every word-initial token starts with '▁')."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>"],
                                                        show_progress=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    return fast(tok, "<unk>")


def llama2_legacy() -> PreTrainedTokenizerFast:
    """BPE with the older Llama-2 normalizer (``Prepend('▁')`` + spaces -> '▁', no pre-tokenizer) and special tokens
    that strip the whitespace around them."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")  # merges within words
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>"],
                                                        show_progress=False))
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Strip(" ", 1, 0)])
    return fast(tok, "<unk>", strip=True)


def roberta_bpe() -> PreTrainedTokenizerFast:
    """Byte-level BPE with ``add_prefix_space=True`` and offsets trimmed of whitespace (RoBERTa)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return fast(tok)


def t5_unigram() -> PreTrainedTokenizerFast:
    """Unigram + NFKC + ``Metaspace(prepend_scheme="always")`` (T5 style)."""
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.train_from_iterator(CORPUS, trainers.UnigramTrainer(vocab_size=300, unk_token="<unk>",
                                                            special_tokens=["<unk>"], show_progress=False))
    return fast(tok, "<unk>")


def bert_wordpiece() -> PreTrainedTokenizerFast:
    """WordPiece + BERT normalizer (lower case, accents stripped) and pre-tokenizer."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]"],
                                                              show_progress=False))
    return fast(tok, "[UNK]")


TOKENIZERS = {"byte": byte_tokenizer, "byte_bpe": lambda: byte_bpe_tokenizer(CORPUS, vocab_size=400),
              "llama2_bpe": llama2_bpe, "llama2_legacy": llama2_legacy, "roberta_bpe": roberta_bpe,
              "t5_unigram": t5_unigram, "bert_wordpiece": bert_wordpiece}


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def tok(request):
    return TOKENIZERS[request.param]()


# reference chat templates: the built-in Jinja ones with each image written as K image tokens (what LlavaProcessor
# does to the text before tokenizing), assistant replies in {% generation %} blocks
def expanded(jinja: str, image: str) -> str:
    assert "-%}<image>{%-" in jinja
    return jinja.replace("-%}<image>{%-", "-%}" + image + "{%-")


PLAIN = ("{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- for p in m['content'] -%}"
         "{%- if p['type'] == 'image' -%}<image>{%- endif -%}{%- endfor -%}"
         "{%- elif m['role'] == 'assistant' -%}{% generation %}"
         "{%- for p in m['content'] -%}{{- p['text'] -}}{%- endfor -%}{{- eos_token -}}{% endgeneration %}"
         "{%- endif -%}{%- endfor -%}")
IMAGE = "<image>" * K
MARKED = "<img>" + IMAGE + "</img>"
TEMPLATES = {  # our template -> the reference Jinja rendering the same prompt
    "chatml": expanded(CHAT_TEMPLATES["chatml"], IMAGE),
    "llama3": expanded(CHAT_TEMPLATES["llama3"], IMAGE),
    "plain": expanded(PLAIN, IMAGE),
    "chatml+markers": expanded(CHAT_TEMPLATES["chatml"], MARKED),
    "tokenizer": expanded(CHAT_TEMPLATES["chatml"], IMAGE),
    # LLaVA-1.5's format: its Jinja form (checked against render() in test_chat_template_jinja.py) with K image tokens
    # (with these tokenizers' own end token for LLaVA's '</s>')
    "vicuna_v1": build_template({"name": "vicuna_v1", "eos": "<|eos|>"}).as_jinja(image_token=IMAGE),
}
OURS = {"chatml+markers": {"name": "chatml", "image_start": "<img>", "image_end": "</img>"},
        "vicuna_v1": {"name": "vicuna_v1", "eos": "<|eos|>"}}


def random_text(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.15:
        return ""
    words = rng.choices(WORDS + ["\n", "  ", "?", "."], k=rng.randint(1, 7))
    text = "".join(w + rng.choice([" ", "", "\n", "  "]) for w in words)
    return rng.choice(["", " ", "\n"]) + text if kind < 0.4 else text.strip()


def random_conversation(rng: random.Random, seed: int) -> tuple[Sample, list[dict]]:
    """A sample (1-3 turns, 0-2 images per user message at random places, empty / unicode / whitespace text) and
    the same conversation as chat-template messages."""
    msgs, hf, n_img = [], [], 0
    for _ in range(rng.randint(1, 3)):
        parts: list = []
        for _ in range(rng.randint(1, 3)):
            if n_img < 3 and rng.random() < 0.4:
                parts.append(ImageRef(n_img))
                n_img += 1
            else:
                parts.append(random_text(rng))
        msgs.append(Message("user", parts))
        msgs.append(Message("assistant", [random_text(rng)]))
        for m in msgs[-2:]:
            hf.append({"role": m.role, "content": [{"type": "image"} if isinstance(p, ImageRef) else
                                                   {"type": "text", "text": p} for p in m.parts]})
    images = [Image.new("RGB", (8 + i, 8), (40 * i, 0, 0)) for i in range(n_img)]
    return Sample(msgs, images, id=f"r{seed}"), hf


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_processor_ids_equal_whole_prompt_ids(tok, template):
    """Property test: 30 random conversations per tokenizer kind and template, training and generation prompts."""
    tok.chat_template = CHAT_TEMPLATES["chatml"]  # for the 'tokenizer' template
    proc = processor(tok, OURS.get(template, template), k=K)
    image_ids = torch.tensor(tok.convert_tokens_to_ids(["<image>", "<img>", "</img>"]))
    rng = random.Random(template)
    for seed in range(30):
        sample, hf = random_conversation(rng, seed)
        ref = tok.apply_chat_template(hf, chat_template=TEMPLATES[template], tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
        item = proc(sample)
        ids = ref["input_ids"]
        assert item["input_ids"].tolist() == ids, (template, seed, tok.convert_ids_to_tokens(ids))
        # image blocks are never trained, even where a stripping special token swallowed a trained character
        mask = torch.tensor(ref["assistant_masks"], dtype=torch.bool) & ~torch.isin(torch.tensor(ids), image_ids)
        assert item["labels"].tolist() == torch.where(mask, torch.tensor(ids), -100).tolist(), (template, seed)
        if template == "plain":
            continue  # plain has no generation prompt
        gen = proc(sample, add_generation_prompt=True)
        ref = tok.apply_chat_template(hf[:-1], chat_template=TEMPLATES[template], tokenize=True,
                                      add_generation_prompt=True)
        ref = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
        assert gen["input_ids"].tolist() == ref and (gen["labels"] == -100).all(), (template, seed)


def test_metaspace_text_after_an_image_has_no_word_marker():
    """The issue's example: Llama-2-style tokenizer, ``plain``, user = [image], assistant = 'a red circle and a
    blue square': the caption after the image tokens starts with 'a' (served that way), not '▁a'."""
    tok = llama2_bpe()
    caption = "a red circle and a blue square"
    item = processor(tok, "plain", k=K)(Sample([Message("user", [ImageRef(0)]), Message("assistant", [caption])],
                                               [Image.new("RGB", (8, 8))]))
    served = tok(IMAGE + caption + "<|eos|>", add_special_tokens=False)["input_ids"]
    tokens = tok.convert_ids_to_tokens(item["input_ids"].tolist())
    assert item["input_ids"].tolist() == served and tokens[K] == "a" and tokens[K + 1] == "▁red"
    assert tok.decode(item["labels"][item["labels"] != -100]) == caption + "<|eos|>"
    # chatml: the user text after an image starts without the marker too (one id sequence with the served one)
    s = Sample([Message("user", [ImageRef(0), "What is this?"]), Message("assistant", ["a circle"])],
               [Image.new("RGB", (8, 8))])
    item = processor(tok, "chatml", k=K)(s)
    at = item["input_ids"].tolist().index(tok.convert_tokens_to_ids("<image>")) + K
    assert not tok.convert_ids_to_tokens(item["input_ids"].tolist())[at].startswith("▁")


def test_straddling_token_is_trained():
    """A token with characters on both sides of a label boundary is trained (the rule of transformers'
    ``return_assistant_tokens_mask``): here 'ab' joins the last user character and the first caption one."""
    vocab = {c: i for i, c in enumerate(["x", "a", "b", "y", "ab"])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    tok = fast(tok)
    s = Sample([Message("user", ["xa"]), Message("assistant", ["by"])])
    item = processor(tok, {"name": "plain", "keep_user_text": True}, k=K)(s)
    ab, y, eos = vocab["ab"], vocab["y"], tok.convert_tokens_to_ids("<|eos|>")
    assert item["input_ids"].tolist() == [vocab["x"], ab, y, eos]
    assert item["labels"].tolist() == [-100, ab, y, eos]


def test_image_tokens_are_never_trained_even_when_they_swallow_a_trained_space():
    tok = llama2_legacy()  # special tokens strip the whitespace around them
    s = Sample([Message("user", [ImageRef(0)]), Message("assistant", [" a red circle"])], [Image.new("RGB", (8, 8))])
    item = processor(tok, "plain", k=K)(s)
    ids = item["input_ids"].tolist()
    assert ids == tok(IMAGE + " a red circle<|eos|>", add_special_tokens=False)["input_ids"]
    offsets = tok(IMAGE + " a red circle<|eos|>", add_special_tokens=False, return_offsets_mapping=True)
    assert offsets["offset_mapping"][K - 1][1] > len(IMAGE)  # the last image token took in the caption's space
    assert item["labels"].tolist()[:K] == [-100] * K and item["labels"].tolist()[K:] == ids[K:]


class NoOffsets:
    """A tokenizer without character offsets (``is_fast`` False): delegates, but refuses ``return_offsets_mapping``."""

    is_fast = False

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, text, **kw):
        assert not kw.get("return_offsets_mapping")
        return self._tok(text, **kw)


def test_tokenizer_without_offsets_tokenizes_piece_by_piece():
    tok = llama2_bpe()
    with pytest.warns(UserWarning, match="gives no character offsets"):
        proc = processor(NoOffsets(tok), "plain", k=K)
    item = proc(Sample([Message("user", [ImageRef(0)]), Message("assistant", ["a red circle"])],
                       [Image.new("RGB", (8, 8))]))
    by_piece = tok(IMAGE, add_special_tokens=False)["input_ids"] + \
        tok("a red circle", add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|eos|>")]
    assert item["input_ids"].tolist() == by_piece
    assert item["labels"].tolist() == [-100] * K + by_piece[K:]


# ------------------------------------------------------------------------------------------- generation prompts
QUESTION = "Which of the shapes in this picture is closest to the top left corner, and what colour is it? " * 2


@pytest.mark.parametrize("template,messages", [
    ("chatml", [Message("user", [ImageRef(0), QUESTION[:200]])]),                # the input
    ("llama3", [Message("user", [ImageRef(0), QUESTION[:200]])]),
    ("chatml", [Message("user", [QUESTION[:200]])]),                             # text only
    ("chatml", [Message("user", [ImageRef(0), "Hi?"]), Message("assistant", [QUESTION[:150]]),
                Message("user", ["And the other one?"])]),                        # long history, short last question
    ("chatml", [Message("user", [ImageRef(0), QUESTION[:200]]), Message("assistant", ["the target"])]),
])
def test_generation_prompt_is_never_cut(template, messages):
    tok = byte_tokenizer()
    has_image = any(isinstance(part, ImageRef) for m in messages for part in m.parts)
    s = Sample(messages, [Image.new("RGB", (8, 8))] if has_image else [], id="g")
    full = processor(tok, template, k=K)(s, add_generation_prompt=True)["input_ids"]
    header = "<|im_start|>assistant\n" if template == "chatml" else "<|start_header_id|>assistant<|end_header_id|>\n\n"
    assert tok.decode(full).endswith(header) and full.numel() > 40
    p = processor(tok, template, k=K, max_length=40)
    with pytest.raises(SampleDropped, match="generation prompt has .* never cut") as ei:
        p(s, add_generation_prompt=True)
    assert ei.value.reason == "too_long" and ei.value.sample_id == "g" and p.dropped == {"too_long": 1}
    with pytest.raises(SampleError, match="generation prompt") as ei:
        processor(tok, template, k=K, max_length=40, truncation="error")(s, add_generation_prompt=True)
    assert not isinstance(ei.value, SampleDropped)
    exact = processor(tok, template, k=K, max_length=full.numel())(s, add_generation_prompt=True)
    assert exact["input_ids"].tolist() == full.tolist() and not exact["meta"]["truncated"]
    with pytest.raises(SampleDropped):
        processor(tok, template, k=K, max_length=full.numel() - 1)(s, add_generation_prompt=True)
