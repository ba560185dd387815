"""Stop strings while streaming: the pieces ``chat_stream`` yields join to exactly ``stream.reply`` == ``chat(...)[0]``,
for stop strings that span tokens, split multi-byte characters, are one character long, start the reply, never occur,
or overlap (a later-starting shorter one is complete first). Replies are forced token by token with a logits
processor on a real tiny model (real ``generate``, stopping criteria and streamer); the wide matrix drives
``ReplyStreamer`` directly."""
from __future__ import annotations

import warnings

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from tests.conftest import chat_model
from vlm.data.tokenizer import byte_bpe_tokenizer, byte_tokenizer
from vlm.inference.generate import ReplyStreamer, reply_text, stable_prefix

REPLIES = ["ok😀中 end.", "héllo wörld", "e\u0301te\u0301 cafe\u0301!", "中文字符 测试。", "a😀b😀c 😀", "  lead, trail  ",
           "aaab aab a", "x\n\ny z"]


def expected(reply: str, stop) -> str:
    """The reply a user must get: reading the generated text from the left, the text before the first stop string to
    be complete (of several complete at the same character, the longest), without outer whitespace."""
    for end in range(1, len(reply) + 1):
        done = [end - len(s) for s in stop if s and reply[:end].endswith(s)]
        if done:
            return reply[:min(done)].strip()
    return reply.strip()


class Force(LogitsProcessor):
    """Greedy picks ``ids[step]`` at each step (the last id once they run out); ``input_ids`` holds the new tokens
    only, since ``VLM.generate`` passes the prompt as embeddings."""

    def __init__(self, ids):
        self.ids = list(ids)

    def __call__(self, input_ids, scores):
        out = torch.full_like(scores, float("-inf"))
        out[:, self.ids[min(input_ids.shape[1], len(self.ids) - 1)]] = 0
        return out


@pytest.fixture(scope="module")
def model():
    return chat_model(0)


def chat_and_stream(model, reply: str, stop, max_new_tokens: int = 40):
    tok = model.tokenizer
    ids = tok.encode(reply, add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>")]
    kw = {"max_new_tokens": max_new_tokens, "stop": list(stop), "logits_processor": LogitsProcessorList([Force(ids)])}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no stop string occurred"
        text, history = model.chat(None, "hi", **kw)
        stream = model.chat_stream(None, "hi", **kw)
        pieces = list(stream)
    return text, pieces, stream, history


@pytest.mark.parametrize("stop, want", [
    (["😀中"], "ok"), (["k😀"], "o"), (["en"], "ok😀中"),  # the inputs
    (["中"], "ok😀"), (["\U0001F600"], "ok"), ([" "], "ok😀中"), (["."], "ok😀中 end"),  # one character
    (["o"], ""), (["ok😀中 end."], ""),  # at the very start
    (["zz"], "ok😀中 end."), (["😀😀"], "ok😀中 end."),  # absent, or a prefix that never completes
    (["中 "], "ok😀"), ([" e", "中"], "ok😀"),  # with whitespace
    # several: the first to be complete wins, not a longer one that started earlier; at the same end, the longer
    (["k😀中 end", "中"], "ok😀"), (["d.", "😀中 ", "end"], "ok"), (["中", "😀中"], "ok"),
])
def test_stream_equals_chat(model, stop, want):
    text, pieces, stream, history = chat_and_stream(model, "ok😀中 end.", stop)
    assert text == want == expected("ok😀中 end.", stop)
    assert "".join(pieces) == stream.reply == text
    assert stream.history == history


def test_stream_equals_chat_when_max_new_tokens_ends_inside_a_stop_prefix(model):
    """The budget runs out after ``ok😀``'s first bytes: the held-back prefix of ``😀中`` is the reply's end."""
    text, pieces, stream, _ = chat_and_stream(model, "ok😀中 end.", ["😀中"], max_new_tokens=6)
    assert "".join(pieces) == stream.reply == text == "ok😀"


def byte_fallback_tokenizer():
    """A SentencePiece-style tokenizer (``▁`` for spaces, multi-character pieces, every other character as
    ``<0xNN>`` byte tokens decoded in runs by ``ByteFallback``), built without files."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    vocab.update({f"<0x{b:02X}>": 4 + b for b in range(256)})
    pieces = ["▁", *"abcdefghijklmnopqrstuvwxyz.,!", "▁e", "en", "nd", "ok", "▁a", "aa", "ll"]
    for p in pieces:
        vocab.setdefault(p, len(vocab))
    merges = [("▁", "e"), ("e", "n"), ("n", "d"), ("o", "k"), ("▁", "a"), ("a", "a"), ("l", "l")]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


TOKENIZERS = {"byte": lambda: byte_tokenizer("chatml"), "bpe": lambda: byte_bpe_tokenizer(REPLIES * 20, 320),
              "byte_fallback": byte_fallback_tokenizer}


def stop_sets(reply: str):
    subs = sorted({reply[i:i + n] for n in range(1, 5) for i in range(len(reply) - n + 1)})
    yield from ([s] for s in subs)  # every substring of 1..4 characters (spanning tokens, splitting characters)
    yield ["zz"]
    yield [reply[:3] + "#"]  # a prefix that never completes
    for i in range(1, len(reply) - 2):  # an earlier-starting long one with a later-starting short one
        yield [reply[i:], reply[i + 1:i + 2]]
        yield [reply[i + 1:i + 2], reply[i - 1:i + 3]]


@pytest.mark.parametrize("name", TOKENIZERS)
def test_streamed_pieces_are_prefixes_of_the_reply(name):
    """Token by token, the released text only grows and is always a prefix of the finished reply, which equals the
    expected cut, whether generation ends at a stop id or runs out (the streamer's pieces are its differences)."""
    tok = TOKENIZERS[name]()
    stop_id = tok.eos_token_id
    for reply in REPLIES:
        ids = tok.encode(reply, add_special_tokens=False)
        assert tok.decode(ids) == reply
        for stop in stop_sets(reply):
            for tail in ([stop_id, 5, 6], []):
                streamer = ReplyStreamer(tok, [stop_id], stop)
                released = ""
                for t in ids + tail:
                    streamer.put(torch.tensor([t]))
                    now = streamer.stable()
                    if now.startswith(released):
                        released = now
                final = streamer.text()
                assert final == reply_text(tok, ids + tail, [stop_id], stop)[0] == expected(reply, stop), \
                    (name, reply, stop)
                assert final.startswith(released), (name, reply, stop, released, final)


@pytest.mark.parametrize("raw, stop, want", [
    ("ok😀\ufffd", ["😀中"], "ok"),  # an incomplete character, then the stop prefix before it
    ("ok😀中 e", ["en"], "ok😀中"),  # no trailing space leaks
    ("  ok", ["x"], "ok"), ("ok  ", [], "ok"), ("ab", ["b", "abc"], "a"), ("ab", ["abc", "b"], "a"),
    ("xab", ["ab", "b"], "x"),
    ("ok d", ["d."], "ok"), ("ok", ["o"], ""), (" \nok", ["\n"], ""), ("ok \n", [" \n"], "ok"),
    ("ok \n", ["\n\n"], "ok"),
])
def test_stable_prefix(raw, stop, want):
    assert stable_prefix(raw, stop) == want


def test_an_open_byte_fallback_run_is_held_back():
    """``ByteFallback`` decodes a run of ``<0xNN>`` tokens together: a valid ``😀`` followed by a stray continuation
    byte becomes replacement characters once the byte arrives, so ``😀`` is not released while the run is open."""
    tok = byte_fallback_tokenizer()
    byte = [tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in "😀".encode() + b"\x80"]
    ids = tok.encode("ok", add_special_tokens=False) + byte + tok.encode(" end", add_special_tokens=False)
    streamer = ReplyStreamer(tok, [tok.eos_token_id])
    released = []
    for t in ids:
        streamer.put(torch.tensor([t]))
        released.append(streamer.stable())
    final = streamer.text()
    assert final == tok.decode(ids).strip() and "😀" not in final
    assert all(final.startswith(r) for r in released) and released[-1] == final
