"""vlm.eval metrics against hand-computed values, and the scorer that picks each sample's metric."""
from __future__ import annotations

import math

import pytest
from PIL import Image

from vlm.data.sample import ImageRef, Message, Sample
from vlm.eval import metrics as M
from vlm.eval.score import grounding_iou, sample_kind, score_samples


@pytest.mark.parametrize("raw, norm", [
    ("Two.", "2"), ("The Red Circle!", "red circle"), ("1,000", "1000"), ("3.5 meters", "3.5 meters"),
    ("dont know", "don't know"), ("yes, it is", "yes it is"), ("t-shirt", "t shirt"), ("  A  dog\n", "dog"),
])
def test_vqa_normalization(raw, norm):
    assert M.normalize_vqa(raw) == norm


# One case per rule of the VQA evaluation (GT-Vision-Lab vqaEval.py / EvalAI's processor), values by hand.
@pytest.mark.parametrize("raw, norm", [
    # punctuation: a mark touching a space is deleted everywhere, else each occurrence becomes a space
    ("red, blue", "red blue"), ("red,blue", "red blue"), ("(left)", "left"), ("left/right", "left right"),
    ("yes!", "yes"), ("what?", "what"), ('"stop"', "stop"), ("a;b", "b"),
    # a comma between digits deletes every mark of the answer (the official rule, applied to the whole answer)
    ("2,000 red,blue", "2000 redblue"),
    # a period is deleted unless a digit follows it
    ("2.", "2"), ("3.5", "3.5"), (".5", ".5"), ("st. louis", "st louis"), ("e.g.", "eg"),
    # the apostrophe is kept (and so the contraction)
    ("it's", "it's"), ("don't", "don't"),
    # number words zero..ten and "none" -> digits; others stay
    ("none", "0"), ("ten dogs", "10 dogs"), ("Zero", "0"), ("eleven", "eleven"),
    # articles dropped
    ("the dog", "dog"), ("an apple", "apple"), ("A cat and a dog", "cat and dog"),
    # contractions without apostrophes restored, also partly written ones; English words left alone
    ("isnt", "isn't"), ("couldnt've", "couldn't've"), ("couldn'tve", "couldn't've"), ("youre", "you're"),
    ("well", "well"), ("its", "its"), ("lets go", "lets go"), ("oclock", "o'clock"),
    # whitespace: newlines and tabs are spaces, runs collapse
    ("red\tcircle\n", "red circle"),
    # what the rules would empty keeps its articles, then its own text: never "" for a visible answer
    ("A", "a"), ("the", "the"), ("A.", "a"), ("?", "?"), ("...", "..."),
    # blank stays blank
    ("", ""), ("   ", ""), ("\n\t", ""),
])
def test_vqa_normalization_rules(raw, norm):
    assert M.normalize_vqa(raw) == norm


def test_vqa_empty_answer_never_matches():
    """Issue 22: dropping articles turned the reference 'A' into '', which equalled an empty prediction (1.0)."""
    assert M.vqa_accuracy("", ["A"]) == 0.0
    assert M.vqa_accuracy("   ", ["the"]) == 0.0
    assert M.vqa_accuracy("", ["A"] * 10) == 0.0
    assert M.vqa_accuracy("\n", ["an"] * 3 + ["dog"] * 7) == 0.0
    # the same answers, said: they match
    assert M.vqa_accuracy("a", ["A"]) == 1.0 and M.vqa_accuracy("A.", ["a"] * 10) == 1.0
    assert M.vqa_accuracy("the", ["the"]) == 1.0 and M.vqa_accuracy("a", ["the"]) == 0.0
    assert M.vqa_accuracy("an apple", ["apple"]) == 1.0 and M.vqa_accuracy("None", ["0"]) == 1.0
    with pytest.raises(ValueError, match="blank"):
        M.vqa_accuracy("", [""])
    with pytest.raises(ValueError, match="reference answer 1 .* is blank"):
        M.vqa_accuracy("dog", ["dog", "  "])


def test_vqa_soft_accuracy_by_hand():
    refs = ["2"] * 3 + ["3"] * 7
    # each "2" left out: 2 matches among the other 9 -> 2/3; each "3" left out: 3 matches -> 1. mean = (3*2/3 + 7)/10
    assert M.vqa_accuracy("two", refs) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert M.vqa_accuracy("3", refs) == 1.0
    assert M.vqa_accuracy("4", refs) == 0.0
    assert M.vqa_accuracy("1", ["1"] + ["0"] * 9) == pytest.approx(0.9 * 1 / 3)  # 9 subsets with one match
    assert M.vqa_accuracy("Yes.", ["yes"]) == 1.0 and M.vqa_accuracy("no", ["yes"]) == 0.0
    # references normalized like the prediction: "Two", "2." and "two" are the same answer as "2"
    assert M.vqa_accuracy("2", ["Two", "2.", "two", "three"] + ["3"] * 6) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)


def test_multiple_choice():
    opts = ["red circle", "blue square", "green triangle"]
    for reply in ["B", "(b)", "B. blue square", "(B) it is", "Answer: B", "the answer is b", "Blue square.", "It is a blue square"]:
        assert M.choice_index(reply, opts) == 1, reply
    assert M.choice_index("D", opts) is None and M.choice_index("a circle or a square", opts) is None
    assert M.choice_index("A red circle", opts) == 0  # by its text, not the article read as a letter
    assert M.choice_accuracy("C", opts, "C") == 1.0 and M.choice_accuracy("C", opts, 2) == 1.0
    assert M.choice_accuracy("green triangle", opts, "green triangle") == 1.0
    assert M.choice_accuracy("A", opts, "B") == 0.0
    with pytest.raises(ValueError, match="names none"):
        M.choice_accuracy("A", opts, "purple")


SHAPES = ["red circle", "blue square", "green triangle", "yellow star"]


@pytest.mark.parametrize("reply, want", [
    # issue 22: a declared letter wins over option text in the reasoning
    ("It is not the red circle. The answer is C.", 2),
    # rule 1: declarations anywhere, the last one wins; the letter wrapped or not, any case
    ("The red circle is wrong, answer is C", 2), ("Not the red circle.\nAnswer: (C)", 2),
    ("The red circle? No. The correct option is C", 2), ("My final answer is **C**.", 2),
    ("the answer is c.", 2), ("Answer: C) green triangle", 2), ("I choose C, not the red circle.", 2),
    ("The answer is C, the green triangle.", 2), ("The answer is C because the red circle is smaller.", 2),
    ("Option C is correct; the red circle is not.", 2), ("(C) is the right one, not the red circle", 2),
    ("First I thought A. red circle. Final answer: C", 2), ("Answer = C", 2), ('The answer is "C".', 2),
    # ... or the option's text after a declaration; an article before it is not a letter
    ("The answer is a green triangle, not the red circle.", 2), ("The answer is A red circle", 0),
    ("the answer is: green triangle", 2), ("Answer: The red circle is wrong; it is (C).", 2),
    # rule 2: the reply is a letter
    ("C", 2), ("c", 2), ("(C)", 2), ("C.", 2), ("**C**", 2), ("[C]", 2), ("  C  \n", 2),
    # rule 3: capital labels (the opening label, a line of its own, (C) / **C** anywhere), when they agree
    ("C. green triangle", 2), ("(C) green triangle", 2), ("C) it is the triangle", 2),
    ("The red circle is wrong.\nC", 2), ("The red circle is wrong. I pick **C** here", 2),
    ("Looking at the shapes, (C) matches; the red circle does not.", 2),
    ("(A) or (C)", None), ("A. red circle\nC. green triangle", None),
    # the English words "A" and "I" are not letters
    ("A red circle is in the image.", 0), ("I see a green triangle.", 2), ("a red circle", 0),
    # rule 4: the option's text
    ("green triangle", 2), ("It is a yellow star.", 3), ("a red circle or a blue square", None),
    # nothing picked
    ("The answer is apple", None), ("E", None), ("Answer: E", None), ("", None), ("no idea", None),
])
def test_choice_extraction_rules(reply, want):
    assert M.choice_index(reply, SHAPES) == want


def test_choice_letters_beyond_i():
    """With nine or more options, "I" is a letter when it is a label, and still the word otherwise."""
    opts = [f"shape {k}" for k in range(10)]
    assert M.choice_index("Answer: I", opts) == 8 and M.choice_index("(I)", opts) == 8
    assert M.choice_index("I think it is shape 3", opts) == 3
    # a one-letter reply that is no option's letter is read as text: option "y" of two
    assert M.choice_index("y", ["x", "y"]) == 1 and M.choice_index("(y)", ["x", "y"]) == 1


def test_bleu4_by_hand():
    # clipped n-gram precisions: 1-gram 5/6 ("the" twice, once in the reference), 2-gram 3/5, 3-gram 2/4,
    # 4-gram 1/3; equal lengths -> brevity penalty 1. BLEU-4 = (5/6 * 3/5 * 2/4 * 1/3) ** (1/4)
    corpus, each = M.caption_scores({"a": "The cat sat on the mat."}, {"a": ["the cat sat on a mat"]})
    hand = (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert corpus["bleu4"] == pytest.approx(hand, abs=1e-6) and each["a"]["bleu4"] == pytest.approx(hand, abs=1e-6)
    # a hypothesis shorter than the closest reference: brevity penalty exp(1 - 6/4)
    short, _ = M.caption_scores({"a": "the cat sat on"}, {"a": ["the cat sat on a mat"]})
    assert short["bleu4"] == pytest.approx(math.exp(1 - 6 / 4), abs=1e-6)


def test_cider_reference_values():
    """pycocoevalcap's CIDEr-D (x10): a caption equal to its references scores 10, one sharing no word scores 0
    (the values its users' published tests assert), and a partial match lies between."""
    refs = {"1": ["hello world good bye"], "2": ["this is perfect test", "this is perfect test"]}
    perfect, _ = M.caption_scores({"1": "Hello World good Bye", "2": "This is perfect test"}, refs)
    wrong, _ = M.caption_scores({"1": "How are you today", "2": "Only wrong words here"}, refs)
    assert perfect["cider"] == pytest.approx(10.0) and perfect["bleu4"] == pytest.approx(1.0)
    assert wrong["cider"] == pytest.approx(0.0) and wrong["bleu4"] == pytest.approx(0.0, abs=1e-6)
    partial, _ = M.caption_scores({"1": "hello world", "2": "this is a test"}, refs)
    assert 0 < partial["cider"] < 10


def _s(answer, **meta):
    return Sample([Message("user", ["q"]), Message("assistant", [answer])], meta=meta)


def test_blank_reference_names_the_sample():
    sample = Sample([Message("user", ["q"]), Message("assistant", ["  "])], id="s7")
    with pytest.raises(ValueError, match="sample 's7'.*blank"):
        score_samples([""], [sample])


def test_score_samples_picks_each_metric():
    box = "<ref>cat</ref><box>(100,100),(300,300)</box>"
    samples = [_s("2", answers=["2"] * 3 + ["3"] * 7, task="count"), _s("B", options=["x", "y"], task="mc"),
               _s(box), _s(box), _s("x", captions=["a red circle on white", "one red circle"], task="cap"),
               _s("Blue.")]
    preds = ["two", "y", "<box>(100,100),(300,320)</box>", "no box", "a red circle on white", "blue"]
    assert [sample_kind(s) for s in samples] == ["answer", "choice", "grounding", "grounding", "caption", "answer"]
    m, per = score_samples(preds, samples)
    assert m["count"] == pytest.approx(0.9) and m["mc"] == 1.0 and m["answer"] == 1.0
    assert m["grounding"] == 0.5 and m["grounding/n"] == 2 and m["grounding/iou"] == pytest.approx(40000 / 44000 / 2)
    assert m["cap/bleu4"] == pytest.approx(1.0) and "cap" in m and m["cap/n"] == 1
    assert m["all"] == pytest.approx((0.9 + 1 + 1 + 0 + 1) / 5) and m["all/n"] == 5  # captions are not in "all"
    assert per[2]["iou"] == pytest.approx(40000 / 44000)


def test_grounding_in_every_box_format(tmp_path):
    path = tmp_path / "img.png"
    Image.new("RGB", (200, 100)).save(path)
    # reference: JSON in original pixels; prediction: Qwen-VL [0, 1000) of the same region
    ref = '{"bbox_2d": [20, 10, 100, 50], "label": "cat"}'
    s = Sample([Message("user", [ImageRef(0), "where?"]), Message("assistant", [ref])], [str(path)])
    assert score_samples(["<box>(100,100),(500,500)</box>"], [s])[0]["grounding/iou"] == pytest.approx(1.0)
    # a JSON prediction in the model's 50x50 frame (a plain resize of the 200x100 image)
    m, _ = score_samples(['[{"bbox_2d": [5, 5, 25, 25]}]'], [s], json_frame=(50, 50))
    assert m["grounding/iou"] == pytest.approx(1.0)
    assert grounding_iou("nothing", ref, image_size=(200, 100)) == 0.0
    with pytest.raises(ValueError, match="metric"):
        sample_kind(_s("x", metric="bleu"))


def cider_d_by_hand(cands: dict[str, str], refs: dict[str, list[str]], sigma: float = 6.0) -> float:
    """CIDEr-D from its definition (Vedantam et al. 2015, the -D variant of the COCO caption server): per n = 1..4,
    tf-idf n-gram vectors (idf = log(#images) - log(#images whose references hold the n-gram)), the clipped
    similarity sum(min(c, r) * r) / (|c| |r|) times exp(-(len_c - len_r)^2 / (2 sigma^2)), averaged over references,
    then over n, times 10."""
    from collections import Counter

    def grams(text, n):
        w = text.split()
        return Counter(tuple(w[i:i + n]) for i in range(len(w) - n + 1))

    n_images = len(refs)
    total = 0.0
    for key, cand in cands.items():
        per_n = []
        for n in range(1, 5):
            df = Counter(g for rs in refs.values() for g in set().union(*(grams(r, n) for r in rs)))

            def vec(text, n=n, df=df):
                return {g: tf * (math.log(n_images) - math.log(max(1.0, df[g]))) for g, tf in grams(text, n).items()}

            c = vec(cand)
            sims = []
            for r_text in refs[key]:
                r = vec(r_text)
                dot = sum(min(v, r.get(g, 0.0)) * r.get(g, 0.0) for g, v in c.items())
                norm = math.sqrt(sum(v * v for v in c.values())) * math.sqrt(sum(v * v for v in r.values()))
                delta = len(cand.split()) - len(r_text.split())
                sims.append((dot / norm if norm else 0.0) * math.exp(-delta ** 2 / (2 * sigma ** 2)))
            per_n.append(sum(sims) / len(sims))
        total += sum(per_n) / 4 * 10
    return total / len(cands)


def test_cider_d_equals_its_definition():
    refs = {"1": ["a red circle on a black background", "one red circle"],
            "2": ["two blue squares and a green cross", "blue squares next to a green cross"],
            "3": ["a yellow triangle", "a small yellow triangle in the corner"]}
    cands = {"1": "a red circle on the black background", "2": "a blue square and a green cross",
             "3": "a yellow star in the corner"}
    corpus, each = M.caption_scores(cands, refs)
    assert corpus["cider"] == pytest.approx(cider_d_by_hand(cands, refs), abs=1e-6)
    assert each["2"]["cider"] == pytest.approx(cider_d_by_hand({"2": cands["2"]}, refs), abs=1e-6)
    assert 0 < corpus["cider"] < 10
