"""vlm.draw_boxes: boxes parsed from a reply (Qwen-VL [0, 1000) and absolute bbox_2d JSON) drawn with labels."""
from __future__ import annotations

import numpy as np
from PIL import Image

import vlm
from vlm.data import boxes
from vlm.inference.draw import reply_boxes

REPLY = ("There is <ref>red circle</ref><box>(100,200),(400,600)</box> and <ref>two squares</ref>"
         "<box>(500,100),(700,300)</box><box>(800,800),(950,990)</box>. Also "
         '```json\n[{"bbox_2d": [10, 20, 30, 40], "label": "dot"}]\n```')


def test_reply_boxes_reads_every_format_with_its_label():
    found = reply_boxes(REPLY, (200, 100))
    assert found == [("red circle", (20, 20, 80, 60)), ("two squares", (100, 10, 140, 30)),
                     ("two squares", (160, 80, 190, 99)), ("dot", (10, 20, 30, 40))]
    # JSON boxes in the model's 50x50 frame are scaled to the 200x100 image; Qwen2 tags are read as well
    scaled = reply_boxes('{"bbox_2d": [5, 5, 25, 50]} <|object_ref_start|>cat<|object_ref_end|>'
                         '<|box_start|>(0,0),(500,500)<|box_end|>', (200, 100), json_frame=(50, 50))
    assert scaled == [("cat", (0, 0, 100, 50)), (None, (20.0, 10.0, 100.0, 100.0))]


def test_draw_boxes_equals_drawing_the_parsed_pixel_boxes(tmp_path):
    img = Image.new("RGB", (200, 100), (0, 0, 0))
    path = tmp_path / "scene.png"
    img.save(path)
    out = vlm.draw_boxes(str(path), REPLY)
    expected = boxes.draw(img, [("red circle", (20, 20, 80, 60)), ("two squares", (100, 10, 140, 30)),
                                ("two squares", (160, 80, 190, 99)), ("dot", (10, 20, 30, 40))])
    assert np.array_equal(np.asarray(out), np.asarray(expected))
    px = np.asarray(out)
    assert tuple(px[40, 20]) == boxes._PALETTE[0]  # the red circle's left edge, in the first colour
    assert (px[45:55, 30:70] == 0).all()  # its inside is untouched
    assert np.array_equal(np.asarray(vlm.draw_boxes(np.asarray(img), REPLY)), px)  # arrays work too
    assert np.array_equal(np.asarray(vlm.draw_boxes(img, "no boxes here")), np.asarray(img))
    assert np.asarray(img).sum() == 0  # the input is not modified


def test_malformed_boxes_in_a_reply_are_skipped():
    text = "<box>(1,2),(3)</box> <box>(10,10),(2000,20)</box> <box>(0,0),(500,500)</box> {\"bbox_2d\": [5, 1]}"
    assert reply_boxes(text, (100, 100)) == [(None, (0, 0, 50, 50))]
