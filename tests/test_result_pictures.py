"""Results you can look at: a sweep's ``summary.png`` beside ``summary.md``, ``vlm.eval``'s ``report.html`` gallery
(images with boxes, escaped text) and a bench's plot of its table (``python -m vlm.bench NAME`` -> ``NAME.png``)."""
from __future__ import annotations

import json
import re

import numpy as np
from PIL import Image, ImageDraw

from vlm.bench.common import plot_table
from vlm.data import Message, Sample
from vlm.data.sample import ImageRef
from vlm.eval.report import write_report
from vlm.train.sweep import summarize_sweep


def job(root, name, overrides, loss, acc):
    d = root / name
    d.mkdir(parents=True)
    (d / "overrides.json").write_text(json.dumps(overrides))
    (d / "result.json").write_text(json.dumps({
        "run_dir": str(d), "seconds": 60.0, "eval": {"all": acc, "vqa_color": acc / 2, "vqa_color/n": 4},
        "stages": [{"name": "pretrain", "final_loss": loss + 1}, {"name": "sft", "final_loss": loss}]}))


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def test_sweep_writes_summary_png_linked_from_summary_md(tmp_path):
    for root, acc in ((tmp_path / "a", 0.9), (tmp_path / "b", 0.2)):
        job(root, "0", ["connector=mlp"], 0.5, acc)
        job(root, "1", ["connector=linear"], 0.7, 0.6)
        (root / "2").mkdir()  # unfinished: no bar
        md = summarize_sweep(root).read_text()
        assert "![metrics per job](summary.png)" in md
    a, b = pixels(tmp_path / "a" / "summary.png"), pixels(tmp_path / "b" / "summary.png")
    assert a.shape == b.shape and (a != b).any()  # the bars follow the table's values


def test_a_sweep_without_a_finished_job_has_no_chart(tmp_path):
    (tmp_path / "0").mkdir()
    md = summarize_sweep(tmp_path).read_text()
    assert not (tmp_path / "summary.png").exists() and "summary.png" not in md


def test_eval_report_html_shows_image_boxes_and_escaped_text(tmp_path):
    img = Image.new("RGB", (32, 32), "white")
    ImageDraw.Draw(img).rectangle((4, 4, 12, 12), fill="red")
    samples = [Sample([Message("user", [ImageRef(0), "Where is <b>the</b> square & why?"]),
                       Message("assistant", ["x"])], images=[img], id=f"s{i}") for i in range(2)]
    records = [{"id": "s0", "prediction": "<ref>sq</ref><box>(125,125),(400,400)</box>",
                "target": "<ref>sq</ref><box>(125,125),(375,375)</box>", "score": 1.0, "iou": 0.8},
               {"id": "s1", "prediction": "<script>alert(1)</script>", "target": "red", "score": 0.0}]
    write_report(tmp_path, {"all": 0.5}, records, samples, title="eval <test>", info={"data": "val"}, gallery=2)
    page = (tmp_path / "report.html").read_text()
    assert page.startswith("<!doctype html>") and page.count('class="card"') == 2
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "Where is &lt;b&gt;the&lt;/b&gt; square &amp; why?" in page and "eval &lt;test&gt;" in page
    assert "&lt;box&gt;(125,125),(375,375)&lt;/box&gt;" in page and "0.5000" in page
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert srcs == ["images/000.png", "images/001.png"]
    boxed, plain = pixels(tmp_path / srcs[0]), pixels(tmp_path / srcs[1])
    assert boxed.shape == plain.shape and (boxed != plain).any()  # the predicted and reference boxes are drawn


def test_bench_plot_of_its_table(tmp_path):
    result = {"bench": "generate", "columns": ["impl", "batch", "tok/s", "ms"],
              "rows": [{"impl": "vlm", "batch": 1, "tok/s": 100.0, "ms": 5.0},
                       {"impl": "transformers", "batch": 1, "tok/s": 80.0, "ms": 6.0}]}
    first = pixels(plot_table(result, tmp_path / "a.png"))
    result["rows"][1]["tok/s"] = 20.0
    second = pixels(plot_table(result, tmp_path / "b.png"))
    assert first.shape == second.shape and (first != second).any()
    assert plot_table({"bench": "x", "rows": [{"name": "a"}]}, tmp_path / "c.png") is None

