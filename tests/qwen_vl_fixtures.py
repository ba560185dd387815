"""Shared helpers for the Qwen-VL tests: a tiny ``qwen.tiktoken`` trained in code (byte-pair merges over Qwen's
pre-tokenized pieces; the 256 single bytes ranked in a shuffled order, so no id equals its byte by construction)."""
from __future__ import annotations

import base64
import random
from collections import Counter
from pathlib import Path

TRAIN_TEXT = (
    "The quick brown fox jumps over the lazy dog. It's what we'll see: they're here, I'd say. "
    "Picture 1: <img>a.jpg</img>\nWhat is in the image? The dog is at <box>(12,40),(388,960)</box>. "
    "图中是一只拉布拉多犬。这是什么城市？上面两张图片分别是哪两个城市？请对它们进行对比。 "
    "numbers 2024 1000 3.14159   spaces\n\n  tabs\t\there "
) * 3


def train_ranks(text: str = TRAIN_TEXT, merges: int = 150, seed: int = 0) -> dict[bytes, int]:
    """``{token bytes: rank}``: the 256 bytes (shuffled ranks 0..255), then ``merges`` byte-pair merges, each the most
    frequent adjacent pair of the pieces Qwen's pattern splits ``text`` into (ties: the smaller pair)."""
    import regex

    from vlm.data.qwen_tokenizer import PAT_STR

    order = list(range(256))
    random.Random(seed).shuffle(order)
    ranks = {bytes([b]): i for i, b in enumerate(order)}
    words = Counter(tuple(bytes([b]) for b in piece.encode()) for piece in regex.findall(PAT_STR, text))
    for _ in range(merges):
        pairs: Counter = Counter()
        for word, n in words.items():
            for a, b in zip(word, word[1:]):
                pairs[(a, b)] += n
        if not pairs:
            break
        best = max(pairs.values())
        a, b = min(p for p, n in pairs.items() if n == best)
        if a + b not in ranks:
            ranks[a + b] = len(ranks)
        merged = Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return ranks


def write_tiktoken(path: Path, ranks: dict[bytes, int]) -> Path:
    """``path/qwen.tiktoken`` in the published layout (``base64 rank`` lines in rank order)."""
    path.mkdir(parents=True, exist_ok=True)
    file = path / "qwen.tiktoken"
    file.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in sorted(ranks.items(),
                                                                                    key=lambda kv: kv[1])))
    return file
