"""Qwen's tiktoken vocabulary (``qwen.tiktoken``, Qwen-7B / Qwen-VL) as a transformers fast tokenizer, no remote code.

``qwen.tiktoken`` holds one ``base64(token bytes) rank`` pair a line: tiktoken's ``mergeable_ranks``, where a lower
rank merges first. We rebuild the same byte-pair encoding with the ``tokenizers`` library:

- vocabulary: each token's bytes written in the byte-level alphabet (GPT-2's byte -> printable character map, the
  ``ByteLevel`` pre-tokenizer's), id = rank;
- merges: for every multi-byte token, each split into two tokens of the vocabulary, ordered by the rank of the token
  they make (tiktoken merges the adjacent pair whose concatenation has the lowest rank; the same order here);
- pre-tokenization: NFC (Qwen's tokenizer normalizes before encoding), Qwen's split pattern :data:`PAT_STR`, then
  byte-level without its own regex; decoding is byte-level.

Special tokens follow the ranks, in Qwen-VL's order (:data:`SPECIAL_TOKENS`): ``<|endoftext|>``, ``<|im_start|>``,
``<|im_end|>``, ``<|extra_0|>`` .. ``<|extra_204|>``, then the vision tags ``<ref>`` ``</ref>`` ``<box>`` ``</box>``
``<quad>`` ``</quad>`` ``<img>`` ``</img>`` ``<imgpad>``; with the published file (151,643 ranks) ``<|endoftext|>`` is
151643 and ``<imgpad>`` 151859. Special-token text in the input is encoded as the special token (tiktoken's
``allowed_special="all"``, which Qwen's tokenizer uses).

``load_qwen_tokenizer(DIR)`` is what ``vlm.data.tokenizer.load_tokenizer(DIR)`` calls for a directory holding
``qwen.tiktoken``; ``save_qwen_tiktoken`` writes the file back from the tokenizer.
"""
from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from vlm.data.byte_level import bytes_to_unicode

VOCAB_FILE = "qwen.tiktoken"
#: Qwen's pre-tokenizer pattern (tiktoken ``pat_str``): contractions, letters with one leading non-letter, single
#: digits, punctuation runs, newline runs, whitespace
PAT_STR = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
#: Qwen-VL's vision tags, after the extras
VISION_TAGS: tuple[str, ...] = ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>",
                                "<imgpad>")
#: every special token in id order (ids ``len(ranks)``, ``len(ranks) + 1``, ...)
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END, *(f"<|extra_{i}|>" for i in range(205)),
                                   *VISION_TAGS)
IMAGE_PAD = "<imgpad>"
#: how many positions Qwen-VL's tokenizer gives one ``<img>path</img>`` between the tags (the resampler's queries)
IMAGE_SPAN = 256


def read_ranks(file: str | os.PathLike) -> dict[bytes, int]:
    """``{token bytes: rank}`` of a ``qwen.tiktoken`` file. ``ValueError`` naming the file and line when a line is
    not ``base64 rank``, or when the ranks are not exactly ``0 .. n-1``."""
    file = Path(file)
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(file.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError("expected two fields")
            ranks[base64.b64decode(parts[0], validate=True)] = int(parts[1])
        except ValueError as e:
            raise ValueError(f"{str(file)!r} line {lineno}: {line[:60]!r} is not 'base64-token rank' ({e})") from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{str(file)!r}: the ranks of its {len(ranks)} tokens are not 0..{len(ranks) - 1} "
                         f"(each exactly once); expected a tiktoken mergeable-ranks file")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{str(file)!r}: single bytes {missing[:8]} have no rank; a byte-level BPE needs all 256")
    return ranks


def bpe_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Every ``(left, right)`` split of each multi-byte token into two ranked tokens, ordered by the rank of the
    token they make (then by the left part's rank): the pair priority tiktoken's byte-pair merge follows."""
    merges = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], left, right))
    merges.sort()
    return [(left, right) for _, _, left, right in merges]


def qwen_tokenizer(ranks: dict[bytes, int], special_tokens: tuple[str, ...] = SPECIAL_TOKENS,
                   chat_template: str | None = None) -> Any:
    """A ``PreTrainedTokenizerFast`` encoding exactly as ``tiktoken.Encoding(pat_str=PAT_STR,
    mergeable_ranks=ranks, special_tokens={t: len(ranks) + i})`` does on NFC text (all special tokens allowed).
    eos and pad are ``<|endoftext|>`` (Qwen's ``eod``); ``chat_template`` defaults to Qwen-VL-Chat's ChatML."""
    from transformers import PreTrainedTokenizerFast

    b2u = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab = {text(tok): rank for tok, rank in ranks.items()}
    merges = [(text(a), text(b)) for a, b in bpe_merges(ranks)]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special_tokens])
    for i, s in enumerate(special_tokens):
        if tok.token_to_id(s) != len(ranks) + i:
            raise ValueError(f"qwen tokenizer: special token {s!r} got id {tok.token_to_id(s)}, expected "
                             f"{len(ranks) + i} (it is also a mergeable token?)")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=ENDOFTEXT, pad_token=ENDOFTEXT,
                                   extra_special_tokens=[s for s in special_tokens if s != ENDOFTEXT])
    if chat_template is None:
        from vlm.data.templates.qwen_vl import QwenVLChat

        chat_template = QwenVLChat().as_jinja(fast, image_token=IMAGE_PAD)
    fast.chat_template = chat_template
    return fast


def load_qwen_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer of a Qwen / Qwen-VL directory (its ``qwen.tiktoken``); ``FileNotFoundError`` naming the file
    when it is missing. ``tokenizer_config.json``'s ``chat_template``, when it has one, replaces the default."""
    path = Path(path)
    file = path / VOCAB_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{str(file)!r} does not exist: a Qwen / Qwen-VL directory's tokenizer is its "
                                f"tiktoken vocabulary {VOCAB_FILE} (copy it from the published checkpoint)")
    template = None
    cfg_file = path / "tokenizer_config.json"
    if cfg_file.is_file():
        try:
            template = json.loads(cfg_file.read_text()).get("chat_template")
        except json.JSONDecodeError as e:
            raise ValueError(f"{str(cfg_file)!r} is not valid JSON ({e})") from e
    return qwen_tokenizer(read_ranks(file), chat_template=template if isinstance(template, str) else None)


def mergeable_ranks(tokenizer: Any) -> dict[bytes, int]:
    """``{token bytes: id}`` of a byte-level tokenizer's model vocabulary (special tokens left out)."""
    u2b = {c: b for b, c in bytes_to_unicode().items()}
    special = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=False)
    return {bytes(u2b[c] for c in tok): i for tok, i in vocab.items() if tok not in special}


def save_qwen_tiktoken(tokenizer: Any, path: str | os.PathLike) -> Path:
    """Write ``tokenizer``'s ranks as ``path/qwen.tiktoken`` (rank order, ``base64 rank`` lines, as published)."""
    out = Path(path) / VOCAB_FILE
    ranks = sorted(mergeable_ranks(tokenizer).items(), key=lambda kv: kv[1])
    out.write_text("".join(f"{base64.b64encode(tok).decode()} {rank}\n" for tok, rank in ranks))
    return out


def is_qwen_directory(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory whose ``config.json`` says Qwen (``model_type: qwen``, remote-code layout)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") == "qwen"
    except (json.JSONDecodeError, AttributeError):
        return False
