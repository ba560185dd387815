"""python -m vlm.chat: a scripted session (stdin), one-shot use, bad input keeps the session going."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

import vlm
from tests.conftest import chat_model
from vlm.chat import Session, main
from vlm.inference import processor_for


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("model")
    chat_model().save_pretrained(out)
    return out


@pytest.fixture
def files(tmp_path):
    good = tmp_path / "cat.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(good)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    return good, bad


def run(model_dir, lines, tmp_path, capsys, *extra):
    code = main([str(model_dir), "--max-new-tokens", "6", "--out-dir", str(tmp_path / "imgs"), *extra],
                stdin=io.StringIO("".join(f"{x}\n" for x in lines)))
    return code, capsys.readouterr().out


def test_scripted_session(model_dir, files, tmp_path, capsys):
    good, bad = files
    save = tmp_path / "history.json"
    code, out = run(model_dir, [f"/image {bad}", f"/image {good}", "What is this?", "   ", "And now?",
                                "x" * 3000, "/frobnicate", f"/save {save}", "/reset", "hello", "/quit", "never read"],
                    tmp_path, capsys, "--stop", "never-here")
    assert code == 0
    assert "error:" in out and "broken.jpg" in out  # the unopenable image is named; the session goes on
    assert f"(image {good} added to the next turn)" in out
    assert out.count("assistant: ") == 3  # the two questions and "hello"; not the blank line nor the long prompt
    assert "empty prompt" in out and "context window" in out and "unknown command '/frobnicate'" in out and "(history cleared)" in out
    assert "never read" not in out
    assert "note: no stop string ['never-here'] occurred within max_new_tokens=6" in out
    history = json.loads(save.read_text())
    assert [m["role"] for m in history] == ["user", "assistant"] * 2
    assert history[0]["content"][0] == {"type": "image", "image": "history_images/001.png"}  # saved beside it
    assert np.array_equal(np.asarray(Image.open(save.parent / "history_images/001.png")), np.asarray(Image.open(good)))
    # the streamed replies are model.chat's replies for the same history
    model = vlm.load(model_dir)
    reply, _ = model.chat(str(good), "What is this?", max_new_tokens=6)
    assert history[1]["content"][0]["text"] == reply
    assert f"assistant: {reply}\n" in out


def test_one_shot_prints_only_the_reply(model_dir, files, capsys):
    good, bad = files
    assert main([str(model_dir), "--image", str(good), "--prompt", "What is this?", "--max-new-tokens", "6"]) == 0
    reply, _ = vlm.load(model_dir).chat(str(good), "What is this?", max_new_tokens=6)
    assert capsys.readouterr().out == reply + "\n"
    assert main([str(model_dir), "--image", str(bad), "--prompt", "What is this?"]) == 2
    assert "broken.jpg" in capsys.readouterr().err
    assert main([str(model_dir), "--prompt", ""]) == 2
    assert "empty prompt" in capsys.readouterr().err


def test_not_a_model_directory(tmp_path, capsys):
    assert main([str(tmp_path), "--prompt", "hi"]) == 2
    assert "not a model directory" in capsys.readouterr().err


def test_a_reply_with_boxes_saves_the_annotated_image(model_dir, files, tmp_path):
    good, _ = files
    model = vlm.load(model_dir)
    out = io.StringIO()
    session = Session(model, processor_for(model), tmp_path / "imgs", out=out, max_new_tokens=4)
    session.pending = [str(good)]
    session.say("Where?")
    path = session.annotate("<ref>cat</ref><box>(0,0),(500,500)</box>")
    assert path is not None and path.is_file() and f"(boxes drawn on {good}: {path})" in out.getvalue()
    expected = vlm.draw_boxes(str(good), "<ref>cat</ref><box>(0,0),(500,500)</box>")
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(expected))
    assert session.annotate("no boxes") is None
