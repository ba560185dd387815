"""Qwen's tiktoken tokenizer rebuilt as a transformers fast tokenizer (vlm.data.qwen_tokenizer): ids equal
tiktoken's own encoding of the same ranks and special tokens, decoding round-trips, the loader every path uses reads
a Qwen-VL directory without remote code, and the vocabulary file writes back byte for byte."""
from __future__ import annotations

import json
import unicodedata

import pytest
import tiktoken

from tests.qwen_vl_fixtures import train_ranks, write_tiktoken
from vlm.data.qwen_tokenizer import (
    IMAGE_PAD,
    PAT_STR,
    SPECIAL_TOKENS,
    load_qwen_tokenizer,
    qwen_tokenizer,
    read_ranks,
    save_qwen_tiktoken,
)
from vlm.data.tokenizer import load_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "It's THEY'RE we'll I'D you've... don't",
    "图中是一只拉布拉多犬。这是哪个城市？ mixed中文and English123",
    "digits 0123456789 3.14159 1,000,000 (12,40),(388,960)",
    "whitespace runs:   three  two\t\ttabs\n\n\nnewlines  \n  \r\n end   ",
    "emoji 😀🐶👍🏽 and flags 🇨🇳 ❤️",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>",
    "Picture 1: <img>assets/dog.jpeg</img>\n<ref>the dog</ref><box>(12,40),(388,960)</box><quad></quad>",
    "<|endoftext|><|extra_0|><|extra_204|><imgpad>",
    "decomposed e\u0301 and precomposed \u00e9, café",
    "  leading spaces and trailing  ",
    "",
    "x" * 40 + " " + "ab" * 30,
]


@pytest.fixture(scope="module")
def ranks():
    return train_ranks()


@pytest.fixture(scope="module")
def reference(ranks):
    specials = {t: len(ranks) + i for i, t in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding("qwen-test", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=specials)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory, ranks):
    path = tmp_path_factory.mktemp("qwen_vl_tok")
    write_tiktoken(path, ranks)
    # as published: config.json says qwen and the tokenizer config points at remote code (never run here)
    (path / "config.json").write_text(json.dumps({"model_type": "qwen", "architectures": ["QWenLMHeadModel"],
                                                  "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig"}}))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": 8192, "tokenizer_class": "QWenTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}}))
    return path


@pytest.fixture(scope="module")
def tok(qwen_dir):
    return load_tokenizer(qwen_dir)


def test_ids_equal_tiktoken(tok, reference, ranks):
    assert len(ranks) > 256 + 100  # merges were learned: multi-byte tokens are exercised
    for text in CORPUS:
        expected = reference.encode(unicodedata.normalize("NFC", text), allowed_special="all")
        assert tok(text, add_special_tokens=False)["input_ids"] == expected, text


def test_merged_tokens_are_used(tok, reference):
    """The corpus's text encodes to fewer ids than bytes (merges apply), and Chinese gets multi-byte tokens."""
    text = CORPUS[2]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) < len(text.encode()) and ids == reference.encode(text)


def test_special_token_ids_follow_the_ranks(tok, ranks):
    n = len(ranks)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.convert_tokens_to_ids(t) == n + i
    assert tok.convert_tokens_to_ids("<|endoftext|>") == n
    assert tok.convert_tokens_to_ids(IMAGE_PAD) == n + 216 == n + len(SPECIAL_TOKENS) - 1
    assert len(tok) == n + len(SPECIAL_TOKENS)
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|endoftext|>"


def test_decode_round_trips(tok, reference):
    for text in CORPUS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == unicodedata.normalize("NFC", text) == reference.decode(ids)


def test_no_remote_code_and_direct_loader_agree(qwen_dir, tok):
    """load_tokenizer never goes to AutoTokenizer (whose auto_map would ask to run tokenization_qwen.py)."""
    assert type(tok).__name__ != "QWenTokenizer"
    direct = load_qwen_tokenizer(qwen_dir)
    assert direct(CORPUS[0])["input_ids"] == tok(CORPUS[0])["input_ids"]


def test_vocabulary_file_writes_back_byte_for_byte(tmp_path, qwen_dir, tok, ranks):
    out = save_qwen_tiktoken(tok, tmp_path)
    assert out.read_bytes() == (qwen_dir / "qwen.tiktoken").read_bytes()
    assert read_ranks(out) == ranks


def test_qwen_directory_without_vocabulary_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen"}))
    with pytest.raises(FileNotFoundError, match=r"qwen\.tiktoken.*does not exist"):
        load_tokenizer(tmp_path)


def test_bad_vocabulary_file_names_file_and_line(tmp_path, ranks):
    file = write_tiktoken(tmp_path, ranks)
    lines = file.read_text().splitlines()
    lines[3] = "not-base64!! 3"
    file.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"qwen\.tiktoken' line 4"):
        qwen_tokenizer(read_ranks(file))


def test_ids_equal_tiktoken_on_random_text(tok, reference):
    """Random strings over the training text's characters: pieces whose merges compete in many orders."""
    import random

    from tests.qwen_vl_fixtures import TRAIN_TEXT

    rng = random.Random(0)
    chars = sorted(set(TRAIN_TEXT)) + ["😀", "é", "\r"]
    for _ in range(300):
        text = "".join(rng.choice(chars) for _ in range(rng.randint(1, 40)))
        assert tok(text, add_special_tokens=False)["input_ids"] == reference.encode(text, allowed_special="all"), text
