"""python -m vlm.eval on your own file: per-task tables, eval.json, report.md, gallery PNGs; bad directories."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tests.conftest import chat_model
from vlm.eval.__main__ import main
from vlm.eval.score import score_samples


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("model")
    chat_model().save_pretrained(out)
    return out


def write_data(folder):
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")

    def rec(i, q, a, **extra):
        return {"messages": [{"role": "user", "content": [{"type": "image", "image": f"{i}.png"},
                                                          {"type": "text", "text": q}]},
                             {"role": "assistant", "content": a}], **extra}

    records = [rec(0, "Colour?", "red", task="colour", answers=["red"] * 9 + ["pink"]),
               rec(1, "Where is the cat?", "<ref>cat</ref><box>(10,10),(500,600)</box>"),
               rec(2, "Which?", "B", options=["red", "blue"], task="choice"),
               rec(0, "Describe.", "a red square", captions=["a red square", "red square on grey"], task="caption")]
    path = folder / "val.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    return path


def test_eval_on_a_file_writes_tables_report_and_gallery(model_dir, tmp_path, capsys):
    data = write_data(tmp_path)
    out = tmp_path / "out"
    metrics = main([str(model_dir), "data=files", f"data.eval={data}", "--out", str(out), "--max-new-tokens", "4",
                    "--batch-size", "3", "--device", "cpu"])
    assert {"colour", "grounding", "grounding/iou", "choice", "caption", "caption/bleu4", "all"} <= set(metrics)
    saved = json.loads((out / "eval.json").read_text())
    assert saved["metrics"] == pytest.approx(metrics) and saved["samples"] == 4
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["task"] for r in records] == ["colour", None, "choice", "caption"]
    # the table is what score_samples gives for the predictions written out
    from vlm.data.datasets import build_dataset

    samples = build_dataset({"name": "files", "train": str(data), "eval": str(data), "part": "eval"})
    again, _ = score_samples([r["prediction"] for r in records], [samples[i] for i in range(4)], json_frame=(32, 32))
    assert {k: v for k, v in metrics.items() if k != "eval_seconds"} == pytest.approx(again)
    report = (out / "report.md").read_text()
    assert "| grounding (Acc@IoU0.5) |" in report and "gallery/000.png" in report
    assert len(list((out / "gallery").glob("*.png"))) == 4
    assert Image.open(out / "gallery" / "001.png").width == 360
    assert "| colour |" in capsys.readouterr().out


def test_eval_rejects_a_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(SystemExit, match="not a model directory"):
        main([str(tmp_path), "data=shapes"])
    with pytest.raises(SystemExit, match="not a directory"):
        main([str(tmp_path / "nope"), "data=shapes"])


def test_eval_drops_a_blank_reference_and_reports_the_evaluated_file(model_dir, tmp_path):
    """A blank reference answer is a named drop (not a traceback); report.md says which file was evaluated (it
    listed the data spec, whose first key read 'train' for the evaluation file); the gallery shows each answered
    sample itself, not the neighbour a skipping dataset serves in a dropped one's place."""
    data = write_data(tmp_path)
    records = [json.loads(line) for line in data.read_text().splitlines()]
    records[0].pop("answers")
    records[0]["messages"][-1]["content"] = "  "
    data.write_text("\n".join(json.dumps(r) for r in records))
    out = tmp_path / "out"
    metrics = main([str(model_dir), "data=files", f"data.eval={data}", "--out", str(out), "--max-new-tokens", "4",
                    "--batch-size", "3", "--device", "cpu"])
    assert metrics["eval_dropped"] == 1 and "colour" not in metrics and metrics["all/n"] == 2
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert preds[0]["prediction"] is None and "blank reference answer '  '" in preds[0]["dropped"]
    report = (out / "report.md").read_text()
    assert f"- data: `{data}`" in report and "'train'" not in report
    saved = json.loads((out / "eval.json").read_text())
    assert saved["data"] == str(data) and saved["data_config"]["eval"] == str(data)
    assert sorted(p.name for p in (out / "gallery").glob("*.png")) == ["001.png", "002.png", "003.png"]
