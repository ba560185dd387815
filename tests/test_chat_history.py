"""Chat histories with images saved and loaded (``vlm.inference.save_history`` / ``load_history``)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import tiny_cfg
from PIL import Image

import vlm
from vlm.data.tokenizer import byte_tokenizer
from vlm.inference import load_history, save_history

NEW = 6


@pytest.fixture(scope="module")
def model():
    import torch

    torch.manual_seed(0)
    m = vlm.build(tiny_cfg("clip", "llama"), tokenizer=byte_tokenizer("chatml"))
    m.set_template("chatml")
    return m.eval()


def picture(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8))


def test_round_trip_and_chat_continues_identically(model, tmp_path):
    """PIL images, arrays and file paths in a history: saved as JSON + PNGs, loaded back; the next turn's reply from
    the loaded history equals the reply from the live one."""
    file = tmp_path / "elsewhere" / "cat.png"
    file.parent.mkdir()
    picture(2).save(file)
    _, history = model.chat([picture(0), np.asarray(picture(1))], "Compare them.", max_new_tokens=NEW)
    _, history = model.chat(str(file), "And this?", history, max_new_tokens=NEW)
    with pytest.raises(TypeError):
        json.dumps(history)  # the reason this exists: PIL images are not JSON
    saved = save_history(history, tmp_path / "talk" / "talk.json")
    assert saved.is_file() and sorted(p.name for p in (tmp_path / "talk" / "talk_images").iterdir()) == \
        ["001.png", "002.png", "003.png"]
    json.loads(saved.read_text())
    loaded = load_history(saved)
    images = [p["image"] for m in loaded for p in m["content"] if p.get("type") == "image"]
    for path, original in zip(images, [picture(0), picture(1), picture(2)]):
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(original))
    texts = [[p.get("text") for p in m["content"]] for m in loaded]
    assert texts == [[p.get("text") for p in m["content"]] for m in history]
    live = model.chat(picture(3), "What now?", history, max_new_tokens=NEW)
    again = model.chat(picture(3), "What now?", loaded, max_new_tokens=NEW)
    assert live[0] == again[0]
    # the folder moves as a whole
    moved = tmp_path / "moved"
    (tmp_path / "talk").rename(moved)
    assert model.chat(picture(3), "What now?", load_history(moved / "talk.json"), max_new_tokens=NEW)[0] == live[0]


@pytest.mark.parametrize("src", ["../outside.png", "/etc/hosts", "http://example.com/x.png"])
def test_load_refuses_images_outside_the_history_folder(tmp_path, src):
    (tmp_path / "outside.png").write_bytes(b"")
    folder = tmp_path / "h"
    folder.mkdir()
    bad = [{"role": "user", "content": [{"type": "image", "image": src}, {"type": "text", "text": "hi"}]}]
    (folder / "h.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"message 0, part 0: image .*(outside|expected a file path)"):
        load_history(folder / "h.json")


def test_load_names_a_bad_file(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_history(tmp_path / "x.json")
    (tmp_path / "x.json").write_text(json.dumps({"role": "user"}))
    with pytest.raises(ValueError, match="no list of messages"):
        load_history(tmp_path / "x.json")
    (tmp_path / "x.json").write_text(json.dumps([{"role": "user", "content": [{"type": "image", "image": "a.png"}]}]))
    with pytest.raises(FileNotFoundError, match="a.png"):
        load_history(tmp_path / "x.json")


def test_the_shipped_history_loads_and_is_the_recorded_session():
    """docs/chat_history.json is what save_history writes (its image beside it, in chat_history_images/): it loads,
    its image is the recorded question image and its turns are the transcript's (docs/chat_session.txt). The file
    shipped before named the image by a path from the repository root, which load_history cannot read."""
    from pathlib import Path

    docs = Path(__file__).resolve().parents[1] / "docs"
    history = load_history(docs / "chat_history.json")
    image = history[0]["content"][0]["image"]
    assert Path(image).parent == docs / "chat_history_images"
    assert np.array_equal(np.asarray(Image.open(image).convert("RGB")),
                          np.asarray(Image.open(docs / "images" / "chat" / "question.png").convert("RGB")))
    said = {line.split(": ", 1)[0]: line.split(": ", 1)[1] for line in (docs / "chat_session.txt").read_text()
            .splitlines() if line.startswith(("you: ", "assistant: ")) and not line.startswith("you: /")}
    assert history[0]["content"][1]["text"] == said["you"]
    assert history[1]["content"][0]["text"] == said["assistant"]
