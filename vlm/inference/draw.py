"""``vlm.draw_boxes(image, reply)``: the boxes a reply contains, drawn on the image with their labels.

Boxes are read in every convention ``vlm.data.boxes`` knows: Qwen-VL ``<ref>..</ref><box>(x1,y1),(x2,y2)</box>``
(``[0, 1000)`` of the image; Qwen2's ``<|box_start|>`` tags too) and absolute ``{"bbox_2d": [...], "label": ...}``
JSON in pixels of the frame the model saw. Malformed boxes are skipped (a model's reply is not trusted).
"""
from __future__ import annotations

from typing import Any

from PIL import Image

from vlm.data import boxes as B


def reply_boxes(reply: str, image_size: tuple[int, int], *, json_frame: tuple[int, int] | None = None
                ) -> list[tuple[str | None, tuple[float, float, float, float]]]:
    """``[(label | None, (x1, y1, x2, y2)), ...]`` in pixels of an image of ``image_size`` ``(W, H)``: Qwen-VL boxes
    (every tag style, in order) then JSON boxes, which are scaled from ``json_frame`` ``(W, H)`` (the pixel frame the
    model answered in, e.g. its ``image_size`` after a plain resize; default: ``image_size`` itself)."""
    w, h = image_size
    out: list[tuple[str | None, tuple]] = []
    for style in B.STYLES:
        out += [(ref, B.to_pixels(box, w, h)) for ref, box in B.parse(reply, style=style, strict=False)]
    fw, fh = json_frame or image_size
    for label, box in B.parse_json(reply, strict=False):
        x1, y1, x2, y2 = box
        out.append((label, (x1 * w / fw, y1 * h / fh, x2 * w / fw, y2 * h / fh)))
    return out


def draw_boxes(image: Any, reply: str, *, json_frame: tuple[int, int] | None = None, width: int = 2) -> Image.Image:
    """A copy of ``image`` (a path, PIL image or array) with every box of ``reply`` outlined and labelled (its
    ``<ref>`` / ``label``). ``json_frame``: see :func:`reply_boxes`. A reply without boxes returns a plain copy."""
    from vlm.data.images import load_image

    pil = load_image(image if not hasattr(image, "__array_interface__") or isinstance(image, Image.Image)
                     else Image.fromarray(image))
    return B.draw(pil, reply_boxes(reply, pil.size, json_frame=json_frame), width=width)
