"""Qwen-VL and JSON grounding boxes: parsing, formatting, conversion, rewriting, IoU, drawing."""
from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from vlm.data import boxes
from vlm.data.errors import DataError


def test_format_and_parse_roundtrip():
    s = boxes.format("red circle", (10, 20, 300, 400))
    assert s == "<ref>red circle</ref><box>(10,20),(300,400)</box>"
    assert boxes.parse(s) == [("red circle", (10, 20, 300, 400))]
    assert boxes.format(None, (0, 0, 999, 999)) == "<box>(0,0),(999,999)</box>"
    q2 = boxes.format("dog", (1, 2, 3, 4), style="qwen2")
    assert q2 == "<|object_ref_start|>dog<|object_ref_end|><|box_start|>(1,2),(3,4)<|box_end|>"
    assert boxes.parse(q2, style="qwen2") == [("dog", (1, 2, 3, 4))]


def test_parse_refs_multiple_boxes_and_prose():
    text = ("There are <ref>two dogs</ref><box>(1,2),(3,4)</box> <box>( 5 , 6 ),(7, 8)</box> and a "
            "<ref>cat</ref> sitting at <box>(9,9),(10,10)</box>. Also <box>(0,0),(1,1)</box>.")
    assert boxes.parse(text) == [("two dogs", (1, 2, 3, 4)), ("two dogs", (5, 6, 7, 8)), ("cat", (9, 9, 10, 10)),
                                 (None, (0, 0, 1, 1))]
    assert boxes.parse("no boxes here") == []


@pytest.mark.parametrize("bad,problem", [
    ("<box>(10,10),(5,20)</box>", "x2 < x1"),
    ("<box>(10,10),(20,1000)</box>", r"\[0, 1000\)"),
    ("<box>(-1,10),(20,30)</box>", r"\[0, 1000\)"),
    ("<box>(10.5,10),(20,30)</box>", "integers"),
    ("<box>(10,10)</box>", "malformed"),
    ("<box>a,b</box>", "malformed"),
])
def test_malformed_qwen_boxes(bad, problem):
    with pytest.raises(DataError, match=problem):
        boxes.parse(bad)
    assert boxes.parse(bad + "<ref>ok</ref><box>(1,1),(2,2)</box>", strict=False) == [("ok", (1, 1, 2, 2))]
    with pytest.raises(DataError):
        boxes.format("x", (5, 5, 1, 1))


def test_json_parse_variants():
    one = '{"bbox_2d": [10, 20, 30, 40], "label": "red circle"}'
    assert boxes.parse_json(one) == [("red circle", (10, 20, 30, 40))]
    fenced = '```json\n[\n\t{"bbox_2d": [1, 2, 3, 4], "label": "a"},\n\t{"bbox_2d": [5, 6, 7, 8]}\n]\n```'
    assert boxes.parse_json(fenced) == [("a", (1, 2, 3, 4)), (None, (5, 6, 7, 8))]
    prose = 'Sure! The object is {"bbox_2d": [1, 2, 3, 4], "label": "dog"} and that is it.'
    assert boxes.parse_json(prose) == [("dog", (1, 2, 3, 4))]
    truncated = '```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [5, 6'
    assert boxes.parse_json(truncated) == [("a", (1, 2, 3, 4))]
    assert boxes.parse_json("nothing") == []
    with pytest.raises(DataError, match="outside"):
        boxes.parse_json(one, width=25, height=100)
    with pytest.raises(DataError, match="x2 < x1"):
        boxes.parse_json('{"bbox_2d": [30, 20, 10, 40]}')
    with pytest.raises(DataError, match="4 coordinates"):
        boxes.parse_json('{"bbox_2d": [1, 2, 3]}')
    with pytest.raises(DataError, match="non-numeric"):
        boxes.parse_json('{"bbox_2d": [1, "a", 3, 4]}')
    assert boxes.parse_json('{"bbox_2d": [30, 20, 10, 40]} {"bbox_2d": [1, 2, 3, 4]}', strict=False) == \
        [(None, (1, 2, 3, 4))]


def test_format_json():
    assert boxes.format_json((1.4, 2.6, 3, 4), "red circle") == '{"bbox_2d": [1, 3, 3, 4], "label": "red circle"}'
    assert boxes.format_json((1, 2, 3, 4)) == '{"bbox_2d": [1, 2, 3, 4]}'
    lst = boxes.format_json_list([("a", (1, 2, 3, 4)), ("b", (5, 6, 7, 8))])
    assert lst.startswith("```json") and boxes.parse_json(lst) == [("a", (1, 2, 3, 4)), ("b", (5, 6, 7, 8))]
    with pytest.raises(DataError, match="negative"):
        boxes.format_json((-1, 0, 3, 4))


def test_to_pixels_truncates_and_from_pixels_inverts():
    assert boxes.to_pixels((500, 999, 0, 1), 64, 48) == (32, 47, 0, 0)
    assert boxes.to_pixels((333, 333, 666, 666), 100, 100) == (33, 33, 66, 66)
    assert boxes.from_pixels((0, 0, 64, 64), 64, 64) == (0, 0, 999, 999)  # clamped
    rng = random.Random(0)
    for _ in range(2000):
        w, h = rng.randint(2, 1000), rng.randint(2, 1000)
        x1, x2 = sorted(rng.randint(0, w - 1) for _ in range(2))
        y1, y2 = sorted(rng.randint(0, h - 1) for _ in range(2))
        n = boxes.from_pixels((x1, y1, x2, y2), w, h)
        assert all(0 <= v < 1000 for v in n)
        assert boxes.to_pixels(n, w, h) == (x1, y1, x2, y2), (w, h, (x1, y1, x2, y2), n)


def test_rewrite_json_boxes_keeps_text():
    text = 'The cat: ```json\n[{"bbox_2d": [10, 20, 30, 40], "label": "cat"}]\n``` ok {"bbox_2d":[0,0,2,2]}'
    out = boxes.rewrite_json_boxes(text, lambda b: tuple(v * 2 for v in b))
    assert out == 'The cat: ```json\n[{"bbox_2d": [20, 40, 60, 80], "label": "cat"}]\n``` ok {"bbox_2d":[0, 0, 4, 4]}'
    with pytest.raises(DataError, match="outside"):
        boxes.rewrite_json_boxes(text, lambda b: None)


def test_rewrite_qwen_boxes():
    text = "<ref>a</ref><box>(100,200),(300,400)</box> and <box>(0,0),(10,10)</box>"
    out = boxes.rewrite_qwen_boxes(text, lambda b: (b[0] // 2, b[1] // 2, b[2] // 2, b[3] // 2))
    assert out == "<ref>a</ref><box>(50,100),(150,200)</box> and <box>(0,0),(5,5)</box>"
    with pytest.raises(DataError):
        boxes.rewrite_qwen_boxes("<box>(1,1),(2)</box>", lambda b: b)


def test_iou():
    assert boxes.iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert boxes.iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert boxes.iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert boxes.iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


def test_draw_does_not_modify_input():
    img = Image.new("RGB", (100, 80), (0, 0, 0))
    out = boxes.draw(img, [("red circle", (10, 20, 50, 60)), (None, (60, 10, 90, 70))])
    assert np.asarray(img).max() == 0 and out.size == img.size
    a = np.asarray(out)
    assert a[40, 10].any() and a[40, 49].any() and not a[40, 30].any()  # outline, hollow inside
    assert a[5:20, 10:60].any()  # label above the box
    norm = boxes.draw(img, boxes.parse("<ref>x</ref><box>(100,250),(500,750)</box>"), normalized=True)
    assert np.asarray(norm)[40, 10].any()


def test_draw_writes_each_label_in_its_box_colour():
    img = Image.new("RGB", (160, 100), (0, 0, 0))
    items = [("cat", (10, 40, 70, 90)), ("dog", (90, 40, 150, 90))]
    out = np.asarray(boxes.draw(img, items))
    bare = np.asarray(boxes.draw(img, [(None, b) for _, b in items]))
    for k, (_, (x1, y1, x2, y2)) in enumerate(items):
        color = boxes._PALETTE[k]
        assert tuple(out[(y1 + y2) // 2, x1]) == color and tuple(out[y1, (x1 + x2) // 2]) == color  # outline
        above = out[y1 - 16:y1, x1:x2].reshape(-1, 3)
        assert (above == color).all(1).sum() > 20  # the label's background, in the box colour
        assert (above.min(1) > 240).sum() > 5  # (antialiased) white text on it
        assert not bare[y1 - 16:y1, x1:x2].any()  # nothing there without a label
    assert (out[:, 75:85] == 0).all()  # nothing drawn between the boxes
    # labels follow boxes parsed from model text (normalized Qwen-VL boxes scaled to the image)
    parsed = boxes.parse("<ref>cat</ref><box>(62,400),(437,900)</box>")
    norm = np.asarray(boxes.draw(img, parsed, normalized=True))
    assert tuple(norm[65, 9]) == boxes._PALETTE[0] and (norm[24:40, 10:70].min(-1) > 240).any()
