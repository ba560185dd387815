"""Grounding boxes in text: Qwen-VL normalized boxes and Qwen2.5-VL-style absolute JSON boxes.

Two conventions, one box tuple ``(x1, y1, x2, y2)`` (top-left, bottom-right; ``x`` along the width):

- Qwen-VL: ``<ref>red circle</ref><box>(x1,y1),(x2,y2)</box>``, integers in ``[0, 1000)`` relative to the image.
  ``style="qwen2"`` uses Qwen2-VL's tokens ``<|object_ref_start|>..<|object_ref_end|><|box_start|>..<|box_end|>``.
  A ``<ref>`` may be followed by several ``<box>``es (all get that ref); a ``<box>`` without a ref gets ``None``.
- JSON: ``{"bbox_2d": [x1, y1, x2, y2], "label": "red circle"}`` in absolute pixels of the image the model sees,
  alone, in a list, in prose, or inside ```json fences.

``to_pixels`` truncates like Qwen-VL (``int(x / 1000 * width)``); ``from_pixels`` is its exact inverse for images up to
1000 px per side (``to_pixels(from_pixels(b, w, h), w, h) == b`` for integer pixel boxes) and is clamped to
``[0, 999]``. Malformed boxes raise ``DataError`` naming the problem (``strict=False`` skips them instead, for parsing
model predictions).

``rewrite_segment_boxes`` (used by the processor) checks the boxes of a rendered conversation and makes them follow
each image's resize / pad / crop / tiling.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any, Callable, Iterable, Optional, Sequence

from PIL import Image, ImageDraw, ImageFont

from vlm.data.errors import DataError

Box = tuple  # (x1, y1, x2, y2)
Labeled = tuple[Optional[str], tuple]

STYLES = {
    "qwen": ("<ref>", "</ref>", "<box>", "</box>"),
    "qwen2": ("<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>"),
}
_NUM = r"\s*([-+]?\d+(?:\.\d*)?)\s*"
_PAIR = re.compile(rf"^\s*\({_NUM},{_NUM}\)\s*,\s*\({_NUM},{_NUM}\)\s*$")


def _tags(style: str) -> tuple[str, str, str, str]:
    if style not in STYLES:
        raise ValueError(f"unknown box style {style!r}; expected one of {sorted(STYLES)}")
    return STYLES[style]


def _token_re(style: str) -> re.Pattern:
    r0, r1, b0, b1 = (re.escape(t) for t in _tags(style))
    return re.compile(rf"{r0}(?P<ref>.*?){r1}|{b0}(?P<box>.*?){b1}", re.S)


# --------------------------------------------------------------------------------------------------------- validation
def check_box(box: Sequence[Any], *, width: float | None = None, height: float | None = None,
              normalized: bool = False) -> tuple:
    """Validate and return ``box`` as a tuple. ``normalized``: ints in ``[0, 1000)``; otherwise non-negative numbers,
    within ``width``/``height`` when given. Always ``x1 <= x2`` and ``y1 <= y2``. Raises ``DataError``."""
    if isinstance(box, (str, bytes)) or not hasattr(box, "__len__") or len(box) != 4:
        raise DataError(f"box {box!r} must have 4 coordinates (x1, y1, x2, y2)")
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in box):
        raise DataError(f"box {list(box)} has a non-numeric coordinate")
    if any(isinstance(v, float) and not math.isfinite(v) for v in box):
        raise DataError(f"box {list(box)} has a non-finite coordinate")
    x1, y1, x2, y2 = box
    if normalized:
        if not all(isinstance(v, int) or (isinstance(v, float) and v.is_integer()) for v in box):
            raise DataError(f"box {list(box)}: Qwen-VL coordinates must be integers in [0, 1000)")
        box = tuple(int(v) for v in box)
        if not all(0 <= v < 1000 for v in box):
            raise DataError(f"box {list(box)}: Qwen-VL coordinates must be in [0, 1000)")
    elif min(box) < 0:
        raise DataError(f"box {list(box)} has a negative coordinate (outside the image)")
    if x2 < x1 or y2 < y1:
        raise DataError(f"box {list(box)}: x2 < x1 or y2 < y1 (expected (x1, y1) top-left, (x2, y2) bottom-right)")
    if width is not None and max(x1, x2) > width or height is not None and max(y1, y2) > height:
        raise DataError(f"box {list(box)} lies outside the {width}x{height} image")
    return tuple(box)


def _num(s: str) -> int | float:
    return int(s) if re.fullmatch(r"[-+]?\d+", s) else float(s)


# ---------------------------------------------------------------------------------------------------------- Qwen-VL
def parse(text: str, *, style: str = "qwen", strict: bool = True) -> list[Labeled]:
    """All ``(ref | None, (x1, y1, x2, y2))`` Qwen-VL boxes in ``text``, in order (ints in ``[0, 1000)``)."""
    out: list[Labeled] = []
    ref: str | None = None
    pending = False  # a ref seen and not yet given a box: the next box takes it, whatever text lies between
    last_end = 0
    for m in _token_re(style).finditer(text):
        between = text[last_end:m.start()]
        last_end = m.end()
        if m.group("ref") is not None:
            ref, pending = m.group("ref").strip(), True
            continue
        if not pending and between.strip():  # a later box continues the ref only when adjacent to the previous one
            ref = None
        pending = False
        pm = _PAIR.match(m.group("box"))
        try:
            if pm is None:
                raise DataError(f"malformed box {m.group('box')!r}; expected '(x1,y1),(x2,y2)'")
            out.append((ref, check_box([_num(g) for g in pm.groups()], normalized=True)))
        except DataError:
            if strict:
                raise
    return out


def format(ref: str | None, box: Sequence[int], *, style: str = "qwen") -> str:  # noqa: A001 (module API)
    """``<ref>{ref}</ref><box>(x1,y1),(x2,y2)</box>`` (no ref part when ``ref`` is ``None``)."""
    r0, r1, b0, b1 = _tags(style)
    x1, y1, x2, y2 = check_box(box, normalized=True)
    head = "" if ref is None else f"{r0}{ref}{r1}"
    return f"{head}{b0}({x1},{y1}),({x2},{y2}){b1}"


def rewrite_qwen_boxes(text: str, fn: Callable[[tuple], Sequence[int] | None], *, style: str = "qwen") -> str:
    """Replace every ``<box>..</box>`` in ``text`` by ``fn(box)`` (a ``[0, 1000)`` box); other text is kept.
    Use it when the normalized frame changes (padding, cropping), e.g. with ``ImageInfo.transform_norm_box``.
    ``fn`` returning ``None`` (box cropped away) raises ``DataError``."""
    _, _, b0, b1 = _tags(style)
    pat = re.compile(rf"{re.escape(b0)}(.*?){re.escape(b1)}", re.S)

    def sub(m: re.Match) -> str:
        pm = _PAIR.match(m.group(1))
        if pm is None:
            raise DataError(f"malformed box {m.group(1)!r}; expected '(x1,y1),(x2,y2)'")
        new = fn(check_box([_num(g) for g in pm.groups()], normalized=True))
        if new is None:
            raise DataError(f"box {m.group(1)!r} falls outside the processed image")
        return format(None, [int(round(v)) for v in new], style=style)

    return pat.sub(sub, text)


def to_pixels(box: Sequence[int], width: int, height: int) -> tuple[int, int, int, int]:
    """``[0, 1000)`` box -> absolute pixels, truncating like Qwen-VL: ``int(x / 1000 * width)``."""
    x1, y1, x2, y2 = box
    return (int(x1 / 1000 * width), int(y1 / 1000 * height), int(x2 / 1000 * width), int(y2 / 1000 * height))


def _from_px(v: float, size: int) -> int:
    if isinstance(v, int) or float(v).is_integer():
        p = int(v)
        n = -(-p * 1000 // size)  # exact integer ceil
        if int(n / 1000 * size) < p:  # to_pixels' float arithmetic can land just below p (e.g. 144/1000*375)
            n += 1
    else:
        n = math.ceil(v * 1000 / size - 1e-9)
    return min(max(n, 0), 999)


def from_pixels(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """Absolute pixel box -> ``[0, 1000)`` ints: the smallest value that ``to_pixels`` maps back to the pixel
    (``ceil(x * 1000 / width)``), clamped to ``[0, 999]``."""
    x1, y1, x2, y2 = box
    return (_from_px(x1, width), _from_px(y1, height), _from_px(x2, width), _from_px(y2, height))


# ------------------------------------------------------------------------------------------------------------- JSON
_FENCE = re.compile(r"```(?:json)?\s*(.*?)(?:```|$)", re.S)
_OBJ = re.compile(r"\{[^{}]*\"bbox_2d\"[^{}]*\}", re.S)
_BBOX = re.compile(r"(\"bbox_2d\"\s*:\s*)\[([^\]]*)\]", re.S)


def _items(obj: Any) -> Iterable[dict]:
    if isinstance(obj, dict):
        yield obj
    elif isinstance(obj, list):
        for o in obj:
            yield from _items(o)


def parse_json(text: str, *, width: float | None = None, height: float | None = None,
               strict: bool = True) -> list[Labeled]:
    """All ``(label | None, (x1, y1, x2, y2))`` from ``{"bbox_2d": [...], "label": ...}`` objects in ``text``
    (a JSON object or list, possibly in ```json fences or surrounded by prose; truncated lists keep their complete
    objects). Coordinates are absolute pixels, checked against ``width``/``height`` when given."""
    objs: list[dict] = []
    fenced = [m.group(1) for m in _FENCE.finditer(text)]
    for chunks in ([fenced] if fenced else []) + [[text]]:
        for chunk in chunks:
            try:
                objs.extend(o for o in _items(json.loads(chunk)) if "bbox_2d" in o)
                continue
            except (json.JSONDecodeError, ValueError):
                pass
            for m in _OBJ.finditer(chunk):
                try:
                    objs.append(json.loads(m.group(0)))
                except json.JSONDecodeError:
                    if strict:
                        raise DataError(f"malformed JSON box {m.group(0)!r}") from None
        if objs:
            break
    out: list[Labeled] = []
    for o in objs:
        try:
            box = check_box(o["bbox_2d"], width=width, height=height)
        except DataError:
            if strict:
                raise
            continue
        label = o.get("label")
        out.append((None if label is None else str(label), box))
    return out


def _int_box(box: Sequence[float]) -> list[int]:
    return [int(round(v)) for v in box]


def format_json(box: Sequence[float], label: str | None = None) -> str:
    """``{"bbox_2d": [x1, y1, x2, y2], "label": "..."}`` (coordinates rounded to ints; no label key when ``None``)."""
    obj: dict[str, Any] = {"bbox_2d": _int_box(check_box(box))}
    if label is not None:
        obj["label"] = label
    return json.dumps(obj, ensure_ascii=False)


def format_json_list(items: Iterable[Labeled], *, fence: bool = True) -> str:
    """Several boxes as a JSON list (Qwen2.5-VL's answer layout), in ```json fences by default."""
    body = "[\n" + ",\n".join("\t" + format_json(b, lab) for lab, b in items) + "\n]"
    return f"```json\n{body}\n```" if fence else body


def rewrite_json_boxes(text: str, fn: Callable[[tuple], Sequence[float] | None]) -> str:
    """Replace every ``"bbox_2d": [...]`` list in ``text`` by ``fn(box)`` rounded to ints; everything else (labels,
    prose, fences, spacing) is kept. Use it when an image is resized/padded/cropped, e.g. with
    ``lambda b: info.transform_box(b)``. ``fn`` returning ``None`` raises ``DataError``."""

    def sub(m: re.Match) -> str:
        try:
            vals = json.loads(f"[{m.group(2)}]")
        except json.JSONDecodeError:
            raise DataError(f"malformed bbox_2d [{m.group(2)}]") from None
        new = fn(check_box(vals))
        if new is None:
            raise DataError(f"box {vals} falls outside the processed image")
        return m.group(1) + json.dumps(_int_box(new))

    return _BBOX.sub(sub, text)


def check_text_boxes(text: str, *, width: float | None = None, height: float | None = None,
                     styles: Sequence[str] = tuple(STYLES)) -> None:
    """Validate every box written in ``text`` (strictly): each ``"bbox_2d": [...]`` must be 4 non-negative numbers
    with ``x1 <= x2``, ``y1 <= y2``, inside ``width x height`` when given (absolute pixels of the image it refers
    to); each ``<box>..</box>`` (every tag ``style``) must read ``(x1,y1),(x2,y2)`` with integers in ``[0, 1000)``.
    Raises ``DataError`` naming the box and the problem."""
    for m in _BBOX.finditer(text):
        try:
            vals = json.loads(f"[{m.group(2)}]")
        except json.JSONDecodeError:
            raise DataError(f"malformed bbox_2d [{m.group(2)}]") from None
        check_box(vals, width=width, height=height)
    for style in styles:
        if _tags(style)[2] in text:
            parse(text, style=style, strict=True)


# ------------------------------------------------------------------------------------------------------ measurements
def has_box(text: str) -> bool:
    """Whether ``text`` holds a box in any convention (a JSON ``bbox_2d`` or a Qwen-VL box tag of any style)."""
    return "bbox_2d" in text or any(tags[2] in text for tags in STYLES.values())


def rewrite_segment_boxes(segments: list[Any], infos: dict[int, Any], *, rewrite: bool = True, check: bool = True,
                          files: dict[int, str | None] | None = None) -> list[Any]:
    """Check the boxes in the text and make them follow their image's geometric transform.

    A box refers to the closest image rendered before it (the first image for text that precedes every image).
    ``check``: every box must be well formed; Qwen-VL boxes (``<box>`` and Qwen2's ``<|box_start|>``) ints in
    ``[0, 1000)``; absolute JSON boxes inside the original image. ``rewrite``: JSON boxes (``"bbox_2d": [...]``)
    are mapped into the processed image's pixel frame (``ImageInfo.transform_box``: resize scales them, pad shifts
    them, crop clips them, tiling maps them into the global view); Qwen-VL boxes are rewritten only when the
    normalized frame changes (pad, crop). Any problem raises ``SampleError`` (reason ``box``) naming the image
    (``files[index]``) and the box. Images whose processor reports no geometry leave the text as it is.
    """
    from vlm.data.readers.base import SampleError
    from vlm.data.templates.base import ImageSlot

    first = next((s.index for s in segments if isinstance(s, ImageSlot)), None)
    index = first
    out = []
    for seg in segments:
        if isinstance(seg, ImageSlot):
            index = seg.index
            out.append(seg)
            continue
        if not hasattr(seg, "text"):  # a video slot: boxes stay tied to the last image
            out.append(seg)
            continue
        info = infos.get(index) if index is not None else None
        text = seg.text
        if info is None or not hasattr(info, "transform_box") or not has_box(text):
            out.append(seg)
            continue
        try:
            if check:
                w, h = info.original_size
                check_text_boxes(text, width=w, height=h)
            if rewrite:
                if "bbox_2d" in text:
                    text = rewrite_json_boxes(text, lambda b, i=info: i.transform_box(b, as_int=True))
                if info.changes_normalized_frame:
                    for style, (_, _, open_tag, _) in STYLES.items():
                        if open_tag in text:
                            text = rewrite_qwen_boxes(text, info.transform_norm_box, style=style)
        except DataError as e:
            file = (files or {}).get(index)
            size = "x".join(str(v) for v in info.original_size)
            raise SampleError(f"bad box in the text referring to image #{index} ({size}): "
                              f"{getattr(e, 'problem', e)}", reason="box", file=file) from None
        out.append(dataclasses.replace(seg, text=text))
    return out


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes in the same frame (0 when the union is empty)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


_PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
            (240, 50, 230), (210, 245, 60), (250, 190, 190), (0, 128, 128)]


def draw(image: Image.Image, boxes: Iterable[Labeled | Sequence[float]], *, normalized: bool = False,
         width: int = 2) -> Image.Image:
    """A copy of ``image`` with each box outlined and labelled (PIL's default font). ``boxes``: ``(label, box)``
    pairs as ``parse``/``parse_json`` return, or bare boxes. ``normalized``: boxes are Qwen-VL ``[0, 1000)``."""
    out = image.convert("RGB").copy()
    d = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    for i, item in enumerate(boxes):
        label, box = item if len(item) == 2 else (None, item)
        if normalized:
            box = to_pixels(box, out.width, out.height)
        x1, y1, x2, y2 = (float(v) for v in box)
        color = _PALETTE[i % len(_PALETTE)]
        d.rectangle((x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)), outline=color, width=width)
        if label:
            tx, ty = x1 + width, (y1 - 11 if y1 >= 11 else y1 + width)
            l_, t_, r_, b_ = d.textbbox((tx, ty), label, font=font)
            d.rectangle((l_ - 1, t_ - 1, r_ + 1, b_ + 1), fill=color)
            d.text((tx, ty), label, fill=(255, 255, 255), font=font)
    return out
