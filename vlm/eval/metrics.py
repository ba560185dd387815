"""Answer metrics: VQA normalization, exact match and VQAv2 soft accuracy, multiple choice, grounding IoU, and
captioning BLEU-4 / CIDEr-D (pycocoevalcap's scorers).

- ``normalize_vqa``: the usual VQA answer normalization: lower case; a period dropped unless it sits between digits;
  a comma between digits dropped (``1,000`` -> ``1000``); other punctuation deleted when it touches a space or an end
  of the answer, else turned into a space; number words ``zero``..``ten`` -> digits; articles ``a an the`` dropped;
  a few apostrophe-less contractions restored (``dont`` -> ``don't``).
- ``vqa_accuracy``: with one reference, exact match of normalized answers; with several (VQAv2's ten), the soft
  accuracy ``mean_i min(1, #{j != i : ref_j == pred} / 3)`` (each reference left out in turn).
- ``choice_index``: which option a reply picks: an option letter alone (``B``, ``(b)``), after ``Answer:`` or
  ``The answer is``, or opening the reply as ``B.`` / ``(B)``,
  else the one option whose normalized text the reply equals or contains.
- ``caption_scores``: corpus BLEU-4 (``closest`` reference length) and CIDEr-D (x10) of pycocoevalcap, on text
  lower-cased with punctuation removed (pycocoevalcap's PTB tokenizer needs Java; this tokenization agrees with it
  on plain English sentences).
"""
from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence

_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"])}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {"dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't", "cant": "can't",
                 "wont": "won't", "didnt": "didn't", "wasnt": "wasn't", "werent": "weren't", "hasnt": "hasn't",
                 "havent": "haven't", "couldnt": "couldn't", "shouldnt": "shouldn't", "wouldnt": "wouldn't",
                 "im": "i'm", "ive": "i've", "youre": "you're", "theyre": "they're", "thats": "that's",
                 "whats": "what's", "lets": "let's"}
_PUNCT = set(string.punctuation) - {"'", "."}


def normalize_vqa(answer: str) -> str:
    """The normalized form compared by VQA accuracy (see the module docstring)."""
    t = " ".join(str(answer).lower().replace("\n", " ").replace("\t", " ").split())
    t = re.sub(r"(?<=\d),(?=\d)", "", t)
    t = re.sub(r"(?<!\d)\.|\.(?!\d)", "", t)
    chars = []
    for i, c in enumerate(t):
        if c in _PUNCT:
            touches = i == 0 or i == len(t) - 1 or t[i - 1] == " " or t[i + 1] == " "
            chars.append("" if touches else " ")
        else:
            chars.append(c)
    words = "".join(chars).split()
    words = [_CONTRACTIONS.get(w, _NUMBER_WORDS.get(w, w)) for w in words if w not in _ARTICLES]
    return " ".join(words)


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """Exact match (one reference) or VQAv2 soft accuracy (several), on normalized answers."""
    if not references:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_vqa(prediction)
    refs = [normalize_vqa(r) for r in references]
    if len(refs) == 1:
        return float(pred == refs[0])
    hits = [r == pred for r in refs]
    total = sum(hits)
    return sum(min(1.0, (total - h) / 3) for h in hits) / len(refs)


def choice_index(prediction: str, options: Sequence[str]) -> int | None:
    """The index of the option ``prediction`` picks, or ``None``."""
    letters = string.ascii_uppercase[:len(options)]
    patterns = (r"\s*\(?([a-z])\)?[.:)]?\s*",  # the letter alone, any case
                r"\s*(?:the\s+)?(?:answer|option)\s*(?:is)?\s*[:\-]?\s*\(?([a-z])\)?(?:[.:)\s].*)?",  # "Answer: B"
                r"\s*\(?([A-Z])(?:\)|[.:])(?:\s.*)?")  # "B. blue square", "(B) ..."
    for k, pat in enumerate(patterns):
        m = re.fullmatch(pat, prediction, re.IGNORECASE | re.DOTALL if k < 2 else re.DOTALL)
        if m and m.group(1).upper() in letters:
            return letters.index(m.group(1).upper())
    pred = normalize_vqa(prediction)
    norm = [normalize_vqa(o) for o in options]
    exact = [i for i, o in enumerate(norm) if o and o == pred]
    if len(exact) == 1:
        return exact[0]
    inside = [i for i, o in enumerate(norm) if o and re.search(rf"\b{re.escape(o)}\b", pred)]
    return inside[0] if len(inside) == 1 else None


def choice_accuracy(prediction: str, options: Sequence[str], answer: str | int) -> float:
    """1.0 when ``prediction`` picks the option ``answer`` names (an index, a letter or the option's text)."""
    if isinstance(answer, int):
        target = answer
    elif len(answer.strip()) == 1 and answer.strip().upper() in string.ascii_uppercase[:len(options)]:
        target = string.ascii_uppercase.index(answer.strip().upper())
    else:
        target = choice_index(answer, options)
    if target is None or not 0 <= target < len(options):
        raise ValueError(f"answer {answer!r} names none of the {len(options)} options {list(options)}")
    return float(choice_index(prediction, options) == target)


def caption_tokens(text: str) -> str:
    """Lower-cased words, punctuation removed: what BLEU/CIDEr count."""
    return " ".join(re.sub(r"[^\w\s']", " ", str(text).lower()).split())


def caption_scores(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
                   ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """``({"bleu4": corpus BLEU-4, "cider": corpus CIDEr-D}, {id: per-sample scores})`` over the ids of
    ``predictions``. Raises ``ImportError`` naming the package when pycocoevalcap is missing."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError as e:
        raise ImportError("captioning metrics (BLEU-4, CIDEr) need pycocoevalcap: pip install pycocoevalcap "
                          "(or pip install 'vlm[eval]')") from e
    ids = list(predictions)
    res = {i: [caption_tokens(predictions[i])] for i in ids}
    gts = {i: [caption_tokens(r) for r in references[i]] for i in ids}
    bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    cider, cider_each = Cider().compute_score(gts, res)
    per = {i: {"bleu4": float(bleu_each[3][k]), "cider": float(cider_each[k])} for k, i in enumerate(ids)}
    return {"bleu4": float(bleu[3]), "cider": float(cider)}, per
