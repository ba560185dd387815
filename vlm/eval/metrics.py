"""Answer metrics: VQA normalization, exact match and VQAv2 soft accuracy, multiple choice, grounding IoU, and
captioning BLEU-4 / CIDEr-D (pycocoevalcap's scorers).

- ``normalize_vqa``: the VQA evaluation's answer normalization (GT-Vision-Lab's ``vqaEval.py``, the VQAv2 server's
  EvalAI processor, lmms-eval's ``EvalAIAnswerProcessor``; rules in docs/evaluation.md), applied to the prediction and
  to every reference alike. It never turns an answer with a visible character into ``""`` (``"A"`` stays ``"a"``).
- ``vqa_accuracy``: with one reference, exact match of normalized answers; with several (VQAv2's ten), the soft
  accuracy ``mean_i min(1, #{j != i : ref_j == pred} / 3)`` (each reference left out in turn). An empty answer
  matches nothing; an empty reference is an error.
- ``choice_index``: which option a reply picks, by the rules of :func:`choice_index` (a declared letter first, then
  letter labels, then the option's text).
- ``caption_scores``: corpus BLEU-4 (``closest`` reference length) and CIDEr-D (x10) of pycocoevalcap, on text
  lower-cased with punctuation removed (pycocoevalcap's PTB tokenizer needs Java; this tokenization agrees with it
  on plain English sentences).
"""
from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence

# Number words the VQA evaluation turns into digits ("none" counts as 0, as there).
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"])} | {"none": "0"}
_ARTICLES = frozenset({"a", "an", "the"})
# Contractions, written with their apostrophes. Every spelling that drops some of the apostrophes maps to the full
# form ("dont" -> "don't", "couldnt've" -> "couldn't've"), except spellings that are English words themselves
# ("well", "were", "its", "ill", "shed", "wed", "hell", "shell", "id", "lets").
_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd "
    "he'd've he's how'd how'll how's i'd've i'm i've isn't it'd it'd've it'll let's ma'am mightn't mightn't've "
    "might've mustn't must've needn't not've o'clock oughtn't shan't she'd've she's should've shouldn't "
    "shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd "
    "something'd've something'll that's there'd there'd've there're there's they'd they'd've they'll they're "
    "they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd where's where've "
    "who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll "
    "y'all'd've you'd you'd've you'll you're you've").split()
_ENGLISH_WORDS = frozenset({"well", "were", "its", "ill", "shed", "wed", "hell", "shell", "id", "lets"})


def _spellings(word: str) -> list[str]:
    """``word`` with every subset of its apostrophes dropped (``word`` itself last)."""
    first, *rest = word.split("'")
    spelled = [first]
    for part in rest:
        spelled = [s + sep + part for s in spelled for sep in ("", "'")]
    return spelled


def _contractions() -> dict[str, str]:
    table: dict[str, str] = {}
    for full in _CONTRACTED:
        for spelled in _spellings(full):
            if spelled != full and spelled not in _ENGLISH_WORDS:
                table[spelled] = full
    return table


_CONTRACTIONS = _contractions()
# Marks the VQA evaluation deletes or turns into a space: the official script's list and the EvalAI processor's
# ("-", "!", "{", "}"), without the apostrophe (the official script's entry turns "don't" into "don t", which its own
# contraction table then never matches; the EvalAI processor leaves it out). "." has its own rule.
_PUNCT = frozenset(';:/[]"{}()=+\\_-><@`,?!')
_COMMA_IN_NUMBER = re.compile(r"(?<=\d),(?=\d)")
_PERIOD_NOT_DECIMAL = re.compile(r"\.(?!\d)")


def _punctuation(text: str) -> str:
    """The VQA evaluation's punctuation step. Each mark is decided over the whole answer: it is deleted everywhere
    when one of its occurrences touches a space (``"red, blue"``) or the answer holds a comma between digits
    (``"1,000"``), else each occurrence becomes a space (``"t-shirt"`` -> ``"t shirt"``). Then a period is deleted
    unless a digit follows it (``"3.5"`` and ``".5"`` keep theirs; ``"2."`` does not)."""
    strip_all = _COMMA_IN_NUMBER.search(text) is not None
    for mark in _PUNCT:
        if mark in text:
            touches = f"{mark} " in text or f" {mark}" in text
            text = text.replace(mark, "" if strip_all or touches else " ")
    return _PERIOD_NOT_DECIMAL.sub("", text)


def _words(text: str, drop_articles: bool = True) -> str:
    """Lower case; number words -> digits; articles dropped (when ``drop_articles``); contractions restored."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if not (drop_articles and w in _ARTICLES))


def normalize_vqa(answer: str) -> str:
    """The form VQA accuracy compares (rules: docs/evaluation.md). Newlines and tabs are spaces; then the
    punctuation step, then the word step (lower case, number words -> digits, articles dropped, contractions).

    An answer that has a visible character never normalizes to ``""``: when the rules leave nothing (``"A"``,
    ``"the"``, ``"?"``), the articles are kept, and failing that the stripped, lower-cased text is the form, so a
    non-empty reference can only match an answer that says something. ``""`` is returned for blank answers only."""
    text = str(answer).replace("\n", " ").replace("\t", " ").strip()
    if not text:
        return ""
    punct = _punctuation(text)
    return _words(punct) or _words(punct, drop_articles=False) or " ".join(text.lower().split())


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """Exact match (one reference) or VQAv2 soft accuracy (several), on normalized answers. A blank prediction
    scores 0. Raises ``ValueError`` when there is no reference or one is blank (a reference must say something)."""
    if not references:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    refs = [normalize_vqa(r) for r in references]
    blank = [i for i, r in enumerate(refs) if not r]
    if blank:
        raise ValueError(f"reference answer {blank[0]} of {list(references)} is blank: a reference must have a "
                         "visible character")
    pred = normalize_vqa(prediction)
    if not pred:
        return 0.0
    if len(refs) == 1:
        return float(pred == refs[0])
    hits = [r == pred for r in refs]
    total = sum(hits)
    return sum(min(1.0, (total - h) / 3) for h in hits) / len(refs)


# -- multiple choice ---------------------------------------------------------------------------------------------
# A declaration, followed by its pick: "answer is", "Answer:", "the correct option is", "final answer =",
# "I choose" (case-insensitive; the pick is read after it).
_DECLARATION = re.compile(
    r"(?<![\w'])(?:(?:the|my)\s+)?(?:(?:correct|right|best|final)\s+)?(?:answer|option|choice)\s*(?:is\b|:|=)"
    r"|(?<![\w'])i\s+(?:choose|pick|select)\b", re.IGNORECASE)
# A declaration after its pick: "option C is correct", "(C) is the right answer".
_DECLARED_AFTER = re.compile(
    r"(?<![\w'])(?:(?:option|choice)\s+\(?(?P<a>[A-Za-z])\)?|\((?P<b>[A-Za-z])\))\s+is\s+(?:the\s+)?"
    r"(?:correct|right|best)\b", re.IGNORECASE)
_PAIRS = {"**": "**", "*": "*", "__": "__", "(": ")", "[": "]", '"': '"', "`": "`", "'": "'"}
_LETTER = re.compile(r"\s*(?:(?P<open>\*\*|\*|__|\(|\[|\"|`|')\s*)?(?P<letter>[A-Za-z])", re.DOTALL)
# Capital letters standing as labels anywhere: (C), **C**, **C.**, [C].
_WRAPPED = re.compile(r"(?<![\w*])(?:\((?P<p>[A-Z])\)|\*\*(?P<b>[A-Z])[.:)]?\*\*|\[(?P<s>[A-Z])\])(?!\w)")
_END_MARKS = ".,;:!?)\n"
# A reply opening with a label: "C. ...", "C) ...", "C: ...", "(C) ...", "**C** ...", "[C] ...".
_LEAD_LABEL = re.compile(r"\s*(?:(?:\(|\*\*|\[)(?P<w>[A-Z])[.:)]?(?:\)|\*\*|\])|(?P<p>[A-Z])[.:)])(?=\s|$)")
# A reply (or a line) that is only a label: C, (C), C., C), **C**, **C.**, [C], "C".
_ONLY_LABEL = re.compile(r"\s*(?:\*\*|\*|__|\(|\[|\"|`)?\s*(?P<letter>[A-Za-z])\s*[.:)]?\s*(?:\*\*|\*|__|\)|\]|\"|`)?"
                         r"\s*[.:!]?\s*")


def _letter_at(text: str) -> tuple[str | None, bool]:
    """``(letter, strong)``: a letter at the start of ``text`` (spaces skipped). Strong: wrapped in a pair
    (``(C)``, ``**C**``, ``**C.**``, ``"C"``) or followed by the end, a space and the end, or a mark
    (``C.``, ``C,``, ``C)``) not followed by a letter or digit. Weak: followed by a space and more words
    (``C because``, ``A red circle``), which may be the article. ``(None, False)`` for a letter inside a word
    (``apple``, ``A-list``, ``B's``)."""
    m = _LETTER.match(text)
    if not m:
        return None, False
    letter, tail, opener = m.group("letter"), text[m.end():], m.group("open")
    if opener:
        closer = _PAIRS[opener]
        tail = tail.lstrip()
        tail = tail[1:] if tail[:1] in ".:)" and closer != ")" else tail
        if not tail.startswith(closer) or tail[len(closer):][:1].isalnum():
            return None, False
        return letter, True
    if not tail.strip():
        return letter, True
    if tail[0] in _END_MARKS:
        return (letter, True) if not tail[1:2].isalnum() else (None, False)
    if tail[0].isspace():
        return letter, False
    return None, False


def _option_text_at(text: str, norm_options: Sequence[str]) -> int | None:
    """The option whose normalized text is ``text``'s first clause (up to ``. , ; ! ?`` or a line end), normalized:
    ``a green triangle, not ...`` names the green triangle; ``the red circle is wrong`` names nothing."""
    clause = normalize_vqa(re.split(r"[.,;!?\n]", text, maxsplit=1)[0])
    found = [i for i, o in enumerate(norm_options) if o and o == clause]
    return found[0] if len(found) == 1 else None


def _declared(text: str, letters: str, norm_options: Sequence[str]) -> int | None:
    """Rule 1 of :func:`choice_index`: the option the last declaration that names one picks."""
    picks: list[tuple[int, int]] = []  # (position, option)
    for m in _DECLARATION.finditer(text):
        rest = text[m.end():]
        letter, strong = _letter_at(rest)
        index = letters.index(letter.upper()) if letter and letter.upper() in letters else None
        if index is not None and strong:
            picks.append((m.start(), index))
            continue
        by_text = _option_text_at(rest, norm_options)
        if by_text is not None:
            picks.append((m.start(), by_text))
        elif index is not None and letter.isupper():
            picks.append((m.start(), index))
    for m in _DECLARED_AFTER.finditer(text):
        letter = (m.group("a") or m.group("b")).upper()
        if letter in letters:
            picks.append((m.start(), letters.index(letter)))
    return max(picks)[1] if picks else None


def _labels(text: str) -> set[str]:
    """Rule 3 of :func:`choice_index`: the capital letters ``text`` uses as labels."""
    found = set()
    for line in text.splitlines():  # a line that is a label or opens with one
        if m := _ONLY_LABEL.fullmatch(line):
            found.add(m.group("letter"))
        elif m := _LEAD_LABEL.match(line):
            found.add(m.group("w") or m.group("p"))
    found |= {next(g for g in m.groups() if g) for m in _WRAPPED.finditer(text)}
    return {f for f in found if f.isupper()}


def choice_index(prediction: str, options: Sequence[str]) -> int | None:
    """The index of the option ``prediction`` picks, or ``None`` (no pick, or conflicting picks). The options'
    letters are ``A, B, ...`` in order. Rules, the first that decides wins (docs/evaluation.md):

    1. **Declared answer**, anywhere in the reply; the last declaration wins: ``answer is``, ``Answer:``,
       ``The correct option is``, ``final answer =``, ``I choose``, followed by a letter (``Answer: (C)``,
       ``answer is **C**``, ``The answer is c.``) or by an option's text as its clause (``The answer is a green
       triangle, ...``); and
       ``option C is correct`` / ``(C) is the right ...``. A letter followed by more words (``is A red circle``)
       is read as a letter only when it is a capital and no option's text follows.
    2. **The reply is an option's letter**, any case: ``C``, ``c``, ``(c)``, ``C.``, ``**C**``, ``[C]``.
    3. **Capital letter labels** (so the words "A" and "I" are never letters): the reply opening with ``C.``,
       ``C)``, ``C:``, ``(C)`` or ``**C**``, and so a line; a line that is only a label; ``(C)``, ``**C**``, ``[C]`` anywhere.
       When they all name one letter it is the pick; conflicting labels pick nothing.
    4. **Option text**: the option whose normalized text equals the normalized reply, else the one option whose
       text the reply contains (none or several: nothing).
    """
    letters = string.ascii_uppercase[:len(options)]
    text = str(prediction).strip()
    norm = [normalize_vqa(o) for o in options]
    declared = _declared(text, letters, norm)
    if declared is not None:
        return declared
    alone = _ONLY_LABEL.fullmatch(text)
    if alone and alone.group("letter").upper() in letters:
        return letters.index(alone.group("letter").upper())
    labels = _labels(text)
    if labels:
        label = labels.pop() if len(labels) == 1 else ""
        return letters.index(label) if label and label in letters else None
    pred = normalize_vqa(text)
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
