"""``python -m vlm.serve`` against the official ``openai`` client: a live server subprocess on 127.0.0.1 serving a
tiny random model saved to a temporary directory (context window 512 tokens).

Replies equal ``model.chat`` (one image, two images, two turns); streamed deltas join to the reply; 16 concurrent
clients x 4 requests each get their solo reply (and share batched generate calls); every bad input gets OpenAI's
error JSON with the right code while the server keeps serving; a full queue answers 503 with Retry-After and a client
that disconnects frees its slot; SIGTERM answers the request in flight, then exits 0.
"""
from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tests.conftest import tiny_cfg

ROOT = Path(__file__).resolve().parents[1]
KEY, NAME, CONTEXT, NEW = "sk-test-key", "tiny-vlm", 512, 8


def picture(seed: int, size: int = 32) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


def data_url(image: Image.Image | bytes) -> str:
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        image = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(image).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def user(text: str, *urls: str) -> dict:
    return {"role": "user", "content": [*(image_part(u) for u in urls), {"type": "text", "text": text}]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """The server subprocess over a saved tiny model: ``start`` (again after a test stopped it: under pytest-xdist
    any test of this module may run after the SIGTERM test on the same worker), ``stop``."""

    def __init__(self, tmp: Path) -> None:
        import torch

        import vlm
        from vlm.data.tokenizer import byte_tokenizer

        self.tmp = tmp
        torch.manual_seed(0)
        cfg = tiny_cfg("clip", "llama")
        cfg["llm"]["config"]["max_position_embeddings"] = CONTEXT
        model = vlm.build(cfg, tokenizer=byte_tokenizer("chatml"))
        model.set_template("chatml")
        model.save_pretrained(tmp / NAME)
        self.root = tmp / "images"
        self.root.mkdir()
        picture(1).save(self.root / "one.png")
        picture(2).save(tmp / "outside.png")
        os.symlink(tmp / "outside.png", self.root / "link.png")
        self.proc: subprocess.Popen | None = None
        self.spawn()
        self.model = vlm.load(tmp / NAME)   # the reference: the same directory, loaded while the server starts
        self.ready()

    def spawn(self) -> None:
        self.port = free_port()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self.log = self.tmp / f"server_{self.port}.log"
        with self.log.open("w") as log:   # the child keeps its own copy of the file descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vlm.serve", str(self.tmp / NAME), "--port", str(self.port), "--api-key",
                 KEY, "--image-root", str(self.root), "--max-queue", "16", "--max-batch", "16", "--batch-wait-ms",
                 "20", "--default-max-tokens", str(NEW), "--max-image-pixels", "4096"],
                env=env, cwd=self.tmp, stdout=log, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ready(self) -> None:
        deadline = time.time() + 180
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                pytest.fail(f"the server did not start:\n{self.output()}")
            time.sleep(0.2)

    def alive(self) -> Served:
        if self.proc.poll() is not None:
            self.spawn()
            self.ready()
        return self

    def output(self) -> str:
        return self.log.read_text()[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Served(tmp_path_factory.mktemp("serve"))
    yield s
    s.stop()


@pytest.fixture
def served(server):
    """``(model, base_url, proc, image_root)`` of a running server."""
    server.alive()
    return server.model, server.url, server.proc, server.root


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[1] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def ask(client, messages, **kw):
    return client.chat.completions.create(model=NAME, messages=messages, **kw)


def test_replies_equal_model_chat(served, client):
    model, _, _, root = served
    a, b = picture(3), picture(4)
    r = ask(client, [user("What is it?", data_url(a))])
    assert r.choices[0].message.content == model.chat(a, "What is it?", max_new_tokens=NEW)[0]
    assert r.model == NAME and r.usage.completion_tokens <= NEW
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    r = ask(client, [user("Compare them.", data_url(a), f"file://{root}/one.png")], max_tokens=6)
    assert r.choices[0].message.content == model.chat([a, str(root / "one.png")], "Compare them.",
                                                      max_new_tokens=6)[0]
    r1, history = model.chat(b, "Describe.", max_new_tokens=NEW)
    r2, _ = model.chat(None, "And the colour?", history, max_new_tokens=NEW)
    got = ask(client, [user("Describe.", data_url(b)), {"role": "assistant", "content": r1},
                       {"role": "user", "content": "And the colour?"}], max_completion_tokens=NEW)
    assert got.choices[0].message.content == r2
    assert [m.id for m in client.models.list().data] == [NAME]


def test_stream_joins_to_the_reply(served, client):
    model = served[0]
    messages = [user("Stream it.", data_url(picture(5)))]
    whole = ask(client, messages, max_tokens=10)
    chunks = list(ask(client, messages, max_tokens=10, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content == model.chat(picture(5), "Stream it.", max_new_tokens=10)[0]
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_sixteen_concurrent_clients_get_their_solo_replies(served, client):
    model, url = served[0], served[1]
    prompts = [(picture(10 + i) if i % 2 else None, f"Question {i}?", 4 + i) for i in range(4)]
    solo = [model.chat(img, text, max_new_tokens=n)[0] for img, text, n in prompts]
    before = httpx.get(f"{url}/health").json()

    def one_client(c: int) -> list[tuple[int, str]]:
        out = []
        for k in range(4):
            i = (c + k) % len(prompts)
            img, text, n = prompts[i]
            msg = user(text, data_url(img)) if img is not None else {"role": "user", "content": text}
            out.append((i, ask(client, [msg], max_tokens=n).choices[0].message.content))
        return out

    with cf.ThreadPoolExecutor(16) as pool:
        results = [r for rs in pool.map(one_client, range(16)) for r in rs]
    assert len(results) == 64
    for i, text in results:
        assert text == solo[i], i
    after = httpx.get(f"{url}/health").json()
    assert after["served"] - before["served"] == 64
    assert after["batches"] - before["batches"] < 64   # requests that arrived together shared a generate call


def error_of(response: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    if code is not None:
        assert body["error"]["code"] == code, body
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]["message"]


def test_bad_input_gets_openai_errors_and_the_server_keeps_serving(served, client):
    model, url, _, root = served
    auth = {"Authorization": f"Bearer {KEY}"}

    def post(payload=None, content=None, headers=auth):
        return httpx.post(f"{url}/v1/chat/completions", json=payload, content=content, headers=headers, timeout=60)

    def req(*messages, **kw):
        return {"model": NAME, "messages": list(messages), **kw}

    hi = {"role": "user", "content": "hi"}
    assert "not valid JSON" in error_of(post(content=b'{"model": '), 400, "invalid_json")
    assert "base64" in error_of(post(req(user("x", "data:image/png;base64,@@@"))), 400, "invalid_base64")
    assert "not an image" in error_of(post(req(user("x", data_url(b"plain text")))), 400, "invalid_image")
    assert "4096" in error_of(post(req(user("x", data_url(picture(0, 65))))), 400, "image_too_large")
    big = json.dumps(req(user("x", "data:image/png;base64," + "A" * (30 * 2**20)))).encode()
    assert "--max-body-mb" in error_of(post(content=big), 413)
    assert "context window of 512" in error_of(post(req({"role": "user", "content": "word " * 200})), 400,
                                               "context_length_exceeded")
    assert "'nope'" in error_of(post({**req(hi), "model": "nope"}), 404, "model_not_found", "model")
    assert "missing API key" in error_of(post(req(hi), headers={}), 401, "invalid_api_key")
    assert "incorrect API key" in error_of(post(req(hi), headers={"Authorization": "Bearer nope"}), 401)
    error_of(httpx.get(f"{url}/v1/models"), 401, "invalid_api_key")
    assert httpx.get(f"{url}/health").status_code == 200            # no key needed
    for extra, param in [({"n": 2}, "n"), ({"logprobs": True}, "logprobs"),
                         ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
                         ({"frobnicate": 1}, "frobnicate")]:
        assert param in error_of(post(req(hi, **extra)), 400, param=param)
    for path in ["/etc/hostname", f"{root}/../outside.png", f"{root}/link.png"]:
        assert "outside --image-root" in error_of(post(req(user("x", f"file://{path}"))), 400,
                                                  "image_path_outside_root")
    assert "--allow-urls" in error_of(post(req(user("x", "http://127.0.0.1:1/a.png"))), 400, "image_url_refused")
    assert "at most 16" in error_of(post(req(hi, stop=[f"s{i}" for i in range(10_000)])), 400, param="stop")
    error_of(post(req(hi, max_tokens=0)), 400, param="max_tokens")
    error_of(httpx.get(f"{url}/v1/nothing", headers=auth), 404)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="n=3"):
        ask(client, [hi], n=3)
    # max_tokens far beyond the context: clamped to the room left, a 200 that ends with "length"
    long = {"role": "user", "content": "word " * 90}
    r = ask(client, [long], max_tokens=10**9)
    assert r.choices[0].finish_reason == "length" and r.usage.total_tokens == CONTEXT
    assert ask(client, [hi]).choices[0].message.content == model.chat(None, "hi", max_new_tokens=NEW)[0]


def test_full_queue_is_503_and_a_disconnect_frees_its_slot(served):
    """16 streams held open (max_tokens 10**9: ~490 tokens each) fill --max-queue 16: the 17th gets 503 with
    Retry-After; closing the streams cancels their rows and frees every slot."""
    url = served[1]
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"model": NAME, "messages": [{"role": "user", "content": "go"}], "max_tokens": 10**9, "stream": True}
    http = httpx.Client(timeout=60, headers=auth, limits=httpx.Limits(max_connections=32))
    before = http.get(f"{url}/health").json()
    streams, lines = [], []
    try:
        for _ in range(16):
            cm = http.stream("POST", f"{url}/v1/chat/completions", json=body)
            resp = cm.__enter__()
            streams.append(cm)
            assert resp.status_code == 200
            lines.append(resp.iter_lines())
            assert next(lines[-1]).startswith("data: ")       # admitted: the role chunk came
        assert http.get(f"{url}/health").json()["active"] == 16
        busy = http.post(f"{url}/v1/chat/completions", json={**body, "stream": False})
        assert "--max-queue 16" in error_of(busy, 503, "server_overloaded")
        assert busy.headers["retry-after"] == "1"
    finally:
        for cm in streams:
            cm.__exit__(None, None, None)
    deadline = time.time() + 30
    while (health := http.get(f"{url}/health").json())["active"] and time.time() < deadline:
        time.sleep(0.1)
    assert health["active"] == 0 and health["cancelled"] - before["cancelled"] == 16, health
    http.close()


def test_sigterm_answers_the_request_in_flight_then_exits_0(server, served, client):
    """The server stops here (a later test of this module on the same worker starts it again)."""
    model, url, proc = served[0], served[1], served[2]
    got: list = []
    worker = threading.Thread(target=lambda: got.append(ask(client, [{"role": "user", "content": "last"}],
                                                            max_tokens=40)))
    worker.start()
    deadline = time.time() + 30
    while httpx.get(f"{url}/health").json()["active"] == 0 and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    worker.join(60)
    assert proc.wait(60) == 0, server.output()
    assert got and got[0].choices[0].message.content == model.chat(None, "last", max_new_tokens=40)[0]




def test_quantize_reaches_the_loader(monkeypatch, capsys):
    """``--quantize`` offers the schemes ``vlm.quantize`` registers and passes the one chosen to the loader as
    ``quantize=``; any other value is refused by the parser, naming the choices."""
    from vlm.inference import load
    from vlm.quantize import SCHEMES
    from vlm.serve.__main__ import main

    calls = []

    def refuse(path, *, device=None, quantize=None):
        calls.append((path, quantize))
        raise ValueError("no such directory")

    monkeypatch.setattr(load, "open_model", refuse)
    for scheme in SCHEMES.names():
        assert main(["some_dir", "--quantize", scheme]) == 2
    assert calls == [("some_dir", s) for s in SCHEMES.names()]
    with pytest.raises(SystemExit):
        main(["some_dir", "--quantize", "int3"])
    assert "invalid choice: 'int3'" in capsys.readouterr().err
