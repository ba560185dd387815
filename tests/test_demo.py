"""python -m vlm.demo: the page's conversions (vlm.demo.turns), its chat function against model.chat, and the page in a
real headless Chromium (Playwright): upload an image, ask a grounding question, see the reply and the drawn box,
with no request leaving 127.0.0.1.

The browser test needs Debian's /usr/bin/chromium; without it the test is skipped, unless VLM_REQUIRE_BROWSER=1 (CI),
where it fails. VLM_DEMO_SCREENSHOT=PATH saves a screenshot of the page (docs/images/demo.png).
"""
from __future__ import annotations

import base64
import io
import os
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import vlm
from tests.conftest import chat_model
from vlm.demo.turns import chatbot_messages, drawings, image_folders, input_turn, save_drawing, shown_text
from vlm.inference.history import load_history

CHROMIUM = "/usr/bin/chromium"
NEW = 8
BOX_REPLY = "<ref>red ball</ref><box>(125,250),(500,750)</box>"
QUESTION = "Where is the blue square? Answer with a box."


def scene(path: Path, shape: str, color: str, xy: tuple[int, int, int, int], size=(128, 96)) -> str:
    """A picture of one shape (a grounding target) on a light background, written as PNG."""
    img = Image.new("RGB", size, (235, 235, 225))
    draw = ImageDraw.Draw(img)
    (draw.ellipse if shape == "ball" else draw.rectangle)(xy, fill=color)
    img.save(path)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    model_dir = root / "tiny_vlm"
    chat_model().save_pretrained(model_dir)
    ball = scene(root / "ball.png", "ball", "red", (16, 24, 64, 72))
    square = scene(root / "square.png", "square", "blue", (70, 30, 110, 70))
    return root, model_dir, ball, square


@pytest.fixture(scope="module")
def model(files):
    return vlm.load(files[1])


@pytest.fixture(scope="module")
def demo(model):
    from vlm.demo.app import Demo

    return Demo(model)


RECORDED = Path(__file__).resolve().parents[1] / "docs" / "chat_history.json"


def recorded_history() -> list[dict]:
    """The recorded `python -m vlm.chat` session of docs/inference.md: the default job's trained checkpoint answered
    a grounding question about a shapes image with a box."""
    history = load_history(RECORDED)
    assert drawings(history), "docs/chat_history.json should hold a reply with a box"
    return history


# ------------------------------------------------------------------------------------------------------------ turns
def test_input_turn_reads_the_multimodal_box():
    assert input_turn({"text": "What?", "files": ["/a.png", {"path": "/b.png"}]}) == (["/a.png", "/b.png"], "What?")
    assert input_turn("Hi") == ([], "Hi")
    assert input_turn({"text": "x", "files": [{"type": "file", "file": {"path": "/c.png"}}]}) == (["/c.png"], "x")
    with pytest.raises(ValueError, match="an image alone is not a question"):
        input_turn({"text": " ", "files": ["/a.png"]})
    with pytest.raises(ValueError, match="type a question"):
        input_turn(None)
    with pytest.raises(ValueError, match="must be a path or a dict with 'path'"):
        input_turn({"text": "x", "files": [3]})


def test_chatbot_messages_and_drawings_of_a_multi_image_conversation(files, tmp_path):
    """Two images in the first turn, a box reply, a text-only turn, a reply without boxes, a JSON box reply: each
    box reply is drawn on the latest image before it (pixel-equal to vlm.draw_boxes), the others are not."""
    _, _, ball, square = files
    json_reply = '{"bbox_2d": [4, 4, 16, 16], "label": "square"}'
    history = [
        {"role": "user", "content": [{"type": "image", "image": ball}, {"type": "image", "image": square},
                                     {"type": "text", "text": "Where is the square?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": BOX_REPLY}]},
        {"role": "user", "content": [{"type": "text", "text": "And the colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "blue"}]},
        {"role": "user", "content": [{"type": "image", "image": ball}, {"type": "text", "text": "JSON?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": json_reply}]},
    ]
    found = drawings(history, json_frame=(32, 32))
    assert [(d.index, d.source) for d in found] == [(1, square), (5, ball)]
    assert np.array_equal(np.asarray(found[0].image), np.asarray(vlm.draw_boxes(square, BOX_REPLY)))
    assert np.array_equal(np.asarray(found[1].image),
                          np.asarray(vlm.draw_boxes(ball, json_reply, json_frame=(32, 32))))
    drawn = {d.index: save_drawing(d, tmp_path) for d in found}
    assert save_drawing(found[0], tmp_path) == drawn[1]  # content-named: a redraw reuses the file
    shown = chatbot_messages(history, drawn)
    assert [m["role"] for m in shown] == [m["role"] for m in history]
    assert shown[0]["content"] == [{"path": ball, "alt_text": "image ball.png"},
                                   {"path": square, "alt_text": "image square.png"},
                                   {"type": "text", "text": "Where is the square?"}]
    assert shown[1]["content"][0] == {"type": "text", "text": BOX_REPLY}
    assert shown[1]["content"][1]["path"] == drawn[1] and len(shown[1]["content"]) == 2
    assert shown[3]["content"] == [{"type": "text", "text": "blue"}]
    # control characters, which a browser drops, are shown as escapes; the conversation keeps them
    weird = [{"role": "assistant", "content": [{"type": "text", "text": "a\x00b\n\tc\x7f\u00e9"}]}]
    assert chatbot_messages(weird)[0]["content"] == [{"type": "text", "text": "a\\x00b\n\tc\\x7f\u00e9"}]
    assert np.array_equal(np.asarray(Image.open(drawn[1]).convert("RGB")), np.asarray(found[0].image))
    assert image_folders(history) == [str(Path(ball).resolve().parent)]
    assert drawings([{"role": "assistant", "content": BOX_REPLY}]) == []  # no image to draw on
    with pytest.raises(ValueError, match="message 0: the demo shows images given as file paths"):
        chatbot_messages([{"role": "user", "content": [{"type": "image", "image": Image.open(ball)}]}])


def test_sampling_options():
    from vlm.demo.app import sampling_options

    assert sampling_options(0.0, 0.5, 7) == {"max_new_tokens": 7}  # temperature 0: greedy, top_p unused
    assert sampling_options(0.7, 0.9, 5.0) == {"max_new_tokens": 5, "temperature": 0.7, "top_p": 0.9}


# ------------------------------------------------------------------------------------------------- chat function
def run_turn(demo, value, history, *controls):
    steps = list(demo.respond(value, history, *controls))
    return steps, steps[-1]


def test_the_chat_function_answers_as_model_chat(demo, model, files):
    """The streamed turn ends with model.chat's reply and history (greedy; and sampled with the same seed), each
    step shows a prefix of it, and a box reply of the history is drawn on its image."""
    square = files[3]
    history = recorded_history()
    steps, (shown, new_history, box_value, latest) = run_turn(demo, {"text": QUESTION, "files": [square]}, history,
                                                              0.0, 1.0, NEW)
    reply, expected = model.chat(square, QUESTION, history, max_new_tokens=NEW)
    assert new_history == expected and shown[-1]["content"] == [{"type": "text", "text": shown_text(reply)}]
    assert box_value == {"text": "", "files": []}
    streamed = [s[0][-1]["content"][0]["text"] for s in steps[:-1]]
    assert all(shown_text(reply).startswith(t) for t in streamed) and streamed[-1] == shown_text(reply)
    assert shown[2]["content"][0] == {"path": square, "alt_text": "image square.png"}
    drawn = drawings(new_history)  # the recorded box reply (first), and the new reply's boxes if it has any
    assert drawn[0].index == 1 and np.array_equal(np.asarray(drawn[0].image), np.asarray(
        vlm.draw_boxes(history[0]["content"][0]["image"], history[1]["content"][0]["text"])))
    assert np.array_equal(np.asarray(Image.open(latest).convert("RGB")), np.asarray(drawn[-1].image))
    # a follow-up text-only turn continues the conversation
    _, (_, h2, _, _) = run_turn(demo, {"text": "Why?", "files": []}, new_history, 0.0, 1.0, NEW)
    assert h2 == model.chat(None, "Why?", new_history, max_new_tokens=NEW)[1]
    # sampling controls reach generation: same seed, same sample as model.chat
    torch.manual_seed(3)
    _, (_, sampled, _, _) = run_turn(demo, {"text": QUESTION, "files": [square]}, [], 1.5, 0.9, NEW)
    torch.manual_seed(3)
    assert sampled == model.chat(square, QUESTION, max_new_tokens=NEW, temperature=1.5, top_p=0.9)[1]


def test_bad_input_is_a_page_error_and_keeps_the_conversation(demo, files, tmp_path):
    import gradio as gr

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(gr.Error, match="type a question"):
        list(demo.respond({"text": "", "files": [files[2]]}, [], 0.0, 1.0, NEW))
    with pytest.raises(gr.Error, match="broken.png"):
        list(demo.respond({"text": "What?", "files": [str(broken)]}, [], 0.0, 1.0, NEW))
    assert demo.clear() == ([], [], {"text": "", "files": []}, None)


def test_command_line(files, capsys):
    from vlm.demo.__main__ import main, parser

    a = parser().parse_args(["dir"])
    assert (a.host, a.share, a.temperature, a.max_new_tokens) == ("127.0.0.1", False, 0.0, 128)
    assert main([str(files[0] / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------- browser
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def browser_or_skip():
    required = os.environ.get("VLM_REQUIRE_BROWSER") == "1"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if required:
            pytest.fail("VLM_REQUIRE_BROWSER=1 but the playwright package is not installed")
        pytest.skip("the playwright package is not installed (pip install playwright)")
    if not Path(CHROMIUM).is_file():
        if required:
            pytest.fail(f"VLM_REQUIRE_BROWSER=1 but {CHROMIUM} is missing (apt-get install chromium)")
        pytest.skip(f"{CHROMIUM} is missing (Debian's chromium package); VLM_REQUIRE_BROWSER=1 makes this a failure")
    return sync_playwright


PASTE = """b64 => {
    const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
    const data = new DataTransfer();
    data.items.add(new File([bytes], "pasted.png", {type: "image/png"}));
    document.querySelector("#question textarea").dispatchEvent(
        new ClipboardEvent("paste", {clipboardData: data, bubbles: true, cancelable: true}));
}"""


def ask(page, text: str, reply: str, n: int) -> None:
    """Wait for the input box's image thumbnail, type ``text``, press Enter, wait for the ``n``-th reply to read
    ``reply`` (as the page shows text: ``shown_text``; failing with what the page shows after 60 s)."""
    page.locator("#question img").first.wait_for(timeout=30_000)
    page.fill("#question textarea", text)
    page.press("#question textarea", "Enter")
    texts = page.locator('#chatbot [data-testid="bot"] .message-content')
    deadline = time.monotonic() + 60
    while (texts.count() < n or texts.last.text_content() != shown_text(reply)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert texts.count() == n and texts.last.text_content() == shown_text(reply)


def image_at(page, url: str) -> np.ndarray:
    response = page.request.get(url)
    assert response.ok, url
    return np.asarray(Image.open(io.BytesIO(response.body())).convert("RGB"))


def test_the_page_in_chromium(files, model):
    """`python -m vlm.demo DIR --history docs/chat_history.json` on a free port of 127.0.0.1; in headless Chromium: the
    recorded turn's box is drawn, an uploaded image + a grounding question get model.chat's reply, every drawn box image
    equals vlm.draw_boxes of its reply, a pasted image + a follow-up get model.chat's reply, Clear empties the page,
    and no request goes to another host."""
    sync_playwright = browser_or_skip()
    from vlm.demo.__main__ import main

    _, model_dir, ball, square = files
    history = recorded_history()
    port = free_port()
    app = main([str(model_dir), "--port", str(port), "--history", str(RECORDED),
                "--max-new-tokens", str(NEW)], block=False)
    requests: list[str] = []
    try:
        reply, final = model.chat(square, QUESTION, history, max_new_tokens=NEW)
        assert reply.strip(), "the tiny model's reply is empty: the page would show nothing to compare"
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"])
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 960})
                page.on("request", lambda r: requests.append(r.url))
                page.on("websocket", lambda ws: requests.append(ws.url))
                page.goto(f"http://127.0.0.1:{port}/", wait_until="load")
                bot_images = page.locator('#chatbot [data-testid="bot"] img')
                bot_images.first.wait_for(timeout=30_000)  # the recorded turn's box, drawn on load
                assert bot_images.count() == 1

                page.set_input_files("#question input[type=file]", square)
                ask(page, QUESTION, reply, 2)
                users = page.locator('#chatbot [data-testid="user"]')
                assert page.locator('#chatbot [data-testid="user"] img').count() == 2  # the recorded image + square
                assert users.last.text_content().strip() == QUESTION

                expected = drawings(final)  # the recorded box reply, and the new reply's boxes if it has any
                page.wait_for_function(f"document.querySelectorAll('#chatbot [data-testid=\"bot\"] img').length"
                                       f" == {len(expected)}", timeout=10_000)
                for img, drawing in zip(bot_images.all(), expected):
                    assert np.array_equal(image_at(page, img.get_attribute("src")), np.asarray(drawing.image))
                side = page.locator("#boxes img")
                assert np.array_equal(image_at(page, side.get_attribute("src")), np.asarray(expected[-1].image))
                if os.environ.get("VLM_DEMO_SCREENSHOT"):
                    page.screenshot(path=os.environ["VLM_DEMO_SCREENSHOT"])

                # a pasted image (the clipboard's file, as Ctrl+V of a copied image gives) and a follow-up question
                reply2, final2 = model.chat(ball, "And this one?", final, max_new_tokens=NEW)
                assert reply2.strip(), "the tiny model's second reply is empty"
                page.evaluate(PASTE, base64.b64encode(Path(ball).read_bytes()).decode())
                ask(page, "And this one?", reply2, 3)
                assert page.locator('#chatbot [data-testid="user"] img').count() == 3
                assert bot_images.count() == len(drawings(final2))

                page.click("#clear")
                page.wait_for_function("document.querySelectorAll('#chatbot [data-testid=\"bot\"], "
                                       "#chatbot [data-testid=\"user\"]').length == 0",
                                       timeout=10_000)
                assert page.locator("#boxes img").count() == 0
            finally:
                browser.close()
    finally:
        app.close()
    hosts = {urlparse(u).hostname for u in requests if urlparse(u).scheme in ("http", "https", "ws", "wss")}
    assert requests and hosts == {"127.0.0.1"}, f"requests to other hosts: {sorted(hosts - {'127.0.0.1'})}"
