"""Score any dataset's predictions with the metric each sample's reference calls for.

A sample's reference is its final assistant message, plus optional record fields kept in ``sample.meta``
(``vlm.data.files.REFERENCE_KEYS`` for the ``files`` dataset): ``answers`` (several reference answers), ``options`` (multiple choice),
``captions`` (several reference captions), ``metric`` (forces one of :data:`KINDS`), ``task`` / ``category``
(the table row). The kind of a sample, in order:

- ``metric`` when given;
- ``choice`` when it has ``options`` (the answer is a letter, an index or the option's text);
- ``caption`` when it has ``captions``;
- ``grounding`` when the reference holds a box (Qwen-VL ``<box>`` or ``bbox_2d`` JSON): Acc@IoU>=0.5 of the first
  box of the reply (0 when none parses) and the mean IoU (``<task>/iou``);
- ``answer`` otherwise: VQA accuracy after the usual normalization (soft accuracy with several ``answers``).

Rows are named by ``task``, else ``category``, else the kind. Captions are scored per row over the corpus
(``<task>`` = CIDEr-D, ``<task>/bleu4``). ``all`` is the mean of the per-sample scores of the other kinds (all
in ``[0, 1]``; CIDEr-D is not).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vlm.eval import metrics as M
from vlm.inference.draw import reply_boxes

KINDS = ("answer", "choice", "grounding", "caption")


def sample_kind(sample: Any) -> str:
    """The metric ``sample``'s reference calls for (one of :data:`KINDS`)."""
    from vlm.data.boxes import has_box

    meta = sample.meta
    kind = meta.get("metric")
    if kind is not None:
        if kind not in KINDS:
            raise ValueError(f"sample {sample.id!r}: metric {kind!r} is not one of {list(KINDS)}")
        return kind
    if meta.get("options"):
        return "choice"
    if meta.get("captions"):
        return "caption"
    return "grounding" if has_box(reference(sample)) else "answer"


def reference(sample: Any) -> str:
    """The reference answer: the final assistant message's text."""
    return sample.messages[-1].text() if sample.messages and sample.messages[-1].role == "assistant" else ""


def reference_problem(sample: Any) -> str | None:
    """What keeps ``sample``'s reference from scoring a prediction, or ``None``: a blank reference answer (the
    final assistant message, or an entry of ``answers`` / ``captions``), no assistant answer at all, a multiple
    choice ``answer`` that names none of its ``options``, an unknown ``metric``. Such a sample is not scored: the
    evaluation drops it, named (``vlm.eval.evaluator``), instead of stopping after training."""
    def blank(text: Any) -> bool:
        return text is None or not str(text).strip()

    try:
        kind = sample_kind(sample)
    except ValueError as e:
        return str(e).split(": ", 1)[-1]
    meta, ref = sample.meta, reference(sample)
    if kind == "choice":
        answer = meta.get("answer", ref)
        if isinstance(answer, str) and blank(answer):
            return f"blank reference answer {answer!r} for the options {list(meta['options'])}; expected the " \
                   f"option's letter, index or text"
        try:
            M.choice_accuracy("", meta["options"], answer)
        except (ValueError, TypeError) as e:
            return f"{e}; expected the option's letter, index or text"
        return None
    listed = "captions" if kind == "caption" and meta.get("captions") else "answers" \
        if kind == "answer" and meta.get("answers") else None
    if listed is not None:
        refs = meta[listed]
        if not isinstance(refs, (list, tuple)) or any(blank(r) for r in refs):
            return f"blank reference answer in {listed}={refs!r}; expected a list of non-empty answers"
        return None
    if not sample.messages or sample.messages[-1].role != "assistant":
        return "no reference answer: the conversation does not end with an assistant message; expected a " \
               "non-empty final answer to score the prediction against"
    if blank(ref):
        return f"blank reference answer {ref!r} (the final assistant message); expected a non-empty answer to " \
               f"score the prediction against"
    return None


def row_name(sample: Any, kind: str) -> str:
    return str(sample.meta.get("task") or sample.meta.get("category") or kind)


def grounding_iou(prediction: str, ref: str, *, image_size: tuple[int, int] | None = None,
                  json_frame: tuple[int, int] | None = None) -> float:
    """IoU of the first box of ``prediction`` with the first box of ``ref`` (0 when either has none).

    Boxes are compared in one frame: Qwen-VL boxes are fractions of the image; a JSON box of the reference is in
    pixels of the original image (``image_size``), one of the prediction in pixels of the model's frame
    (``json_frame``, default ``image_size``). IoU does not change when both boxes are scaled alike, so Qwen-VL boxes
    need no image size."""
    size = image_size or (1000, 1000)
    got = reply_boxes(prediction or "", size, json_frame=json_frame or size)
    want = reply_boxes(ref, size)
    if not got or not want:
        return 0.0
    from vlm.data.boxes import iou

    return iou(got[0][1], want[0][1])


def _image_size(sample: Any) -> tuple[int, int] | None:
    if not sample.images:
        return None
    from vlm.data.images import load_image

    src = sample.images[0]
    return tuple(src.size) if hasattr(src, "size") and not isinstance(src, str) else load_image(src).size


def score_sample(prediction: str, sample: Any, *, json_frame: tuple[int, int] | None = None) -> tuple[str, float,
                                                                                                       float | None]:
    """``(kind, score, iou | None)`` of one non-caption sample."""
    kind = sample_kind(sample)
    prediction = prediction or ""
    meta, ref = sample.meta, reference(sample)
    if kind == "choice":
        answer = meta.get("answer", ref)
        return kind, M.choice_accuracy(prediction, meta["options"], answer), None
    if kind == "grounding":
        needs_size = "bbox_2d" in ref or "bbox_2d" in prediction
        iou = grounding_iou(prediction, ref, image_size=_image_size(sample) if needs_size else None,
                            json_frame=json_frame)
        return kind, float(iou >= 0.5), iou
    if kind == "caption":
        raise ValueError("captions are scored over the corpus (score_samples)")
    try:
        return kind, M.vqa_accuracy(prediction, meta.get("answers") or [ref]), None
    except ValueError as e:  # a blank reference: name the sample
        raise ValueError(f"sample {sample.id!r}: {e}") from e


def score_samples(predictions: Sequence[str], samples: Sequence[Any], *,
                  json_frame: tuple[int, int] | None = None) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """``(metrics, per-sample scores)``: per row ``<row>`` (+ ``<row>/n``, ``<row>/iou`` for grounding,
    ``<row>/bleu4`` for captions) and ``all`` / ``all/n`` (samples other than captions). ``json_frame``: the pixel frame ``(W, H)`` of the model's
    absolute JSON boxes (its input size after a plain resize), when it differs from the original image."""
    if len(predictions) != len(samples):
        raise ValueError(f"{len(predictions)} predictions for {len(samples)} samples")
    per: list[dict[str, Any]] = []
    captions: dict[str, dict[int, int]] = {}
    for i, (pred, sample) in enumerate(zip(predictions, samples)):
        kind = sample_kind(sample)
        row = row_name(sample, kind)
        if kind == "caption":
            captions.setdefault(row, {})[i] = len(per)
            per.append({"row": row, "kind": kind, "score": None})
            continue
        _, score, iou = score_sample(pred, sample, json_frame=json_frame)
        per.append({"row": row, "kind": kind, "score": score, **({"iou": iou} if iou is not None else {})})
    out: dict[str, float] = {}
    for row, members in captions.items():
        preds = {str(i): predictions[i] or "" for i in members}
        refs = {str(i): list(samples[i].meta.get("captions") or [reference(samples[i])]) for i in members}
        corpus, each = M.caption_scores(preds, refs)
        for i, k in members.items():
            per[k].update(score=each[str(i)]["cider"], bleu4=each[str(i)]["bleu4"])
        out[row], out[f"{row}/bleu4"] = corpus["cider"], corpus["bleu4"]
    rows: dict[str, list[dict[str, Any]]] = {}
    for p in per:
        rows.setdefault(p["row"], []).append(p)
    for row in sorted(rows):
        items = rows[row]
        if row not in out:
            out[row] = sum(p["score"] for p in items) / len(items)
        out[f"{row}/n"] = len(items)
        ious = [p["iou"] for p in items if "iou" in p]
        if ious:
            out[f"{row}/iou"] = sum(ious) / len(ious)
    scored = [p["score"] for p in per if p["kind"] != "caption"]
    if scored:
        out["all"], out["all/n"] = sum(scored) / len(scored), len(scored)
    return out, per
