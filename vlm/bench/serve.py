"""``serve``: serving throughput (completion tokens/s) and p50 / p95 request latency at 1, 4 and 16 concurrent
clients, ``python -m vlm.serve`` vs ``transformers serve`` on the same model side by side in one run.

One random model of the bench's size (``vlm.bench.models``; the byte tokenizer with the chatml template) is saved
with ``save_pretrained`` (what ``vlm.serve`` opens) and exported with ``vlm.interop.to_hf`` (a LLaVA directory, what
``transformers serve`` opens). Each server runs as its own subprocess on 127.0.0.1 and gets the same requests from
the official ``openai`` client in threads: one image + a question, greedy, ``max_tokens`` fixed. tokens/s is the
sum of the replies' ``usage.completion_tokens`` over the wall time of a concurrency level; latency is each request's
wall time. ``transformers serve`` runs twice when it starts: as it comes (``transformers``: one request at a time)
and with ``--continuous-batching`` (``transformers_cb``). ``--server-threads N`` sets ``OMP_NUM_THREADS`` of every
server alike (on an oversubscribed CPU, torch's intra-op threads wait on each other). ``--quick`` serves ours only (1 and 4 clients: one server
start) and says so. A server that cannot start gets a row saying why.
"""
from __future__ import annotations

import argparse
import base64
import concurrent.futures as cf
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from vlm.bench.models import model_config, size
from vlm.bench.registry import BENCHES

LEVELS, QUICK_LEVELS = (1, 4, 16), (1, 4)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _image_url(seed: int, px: int) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (px, px, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class Server:
    """A server subprocess: started, waited for (``/health``), stopped with SIGTERM."""

    def __init__(self, cmd: list[str], port: int, log: Path, startup_s: float = 600,
                 threads: int | None = None) -> None:
        import httpx

        self.port, self.log = port, log
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")]),
               **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
        self.proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.time() + startup_s
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"{cmd[0]} {' '.join(cmd[1:3])} did not start; its log ends:\n"
                                   f"{log.read_text()[-1500:]}")
            time.sleep(0.3)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def measure(port: int, model: str, clients: int, per_client: int, max_tokens: int, px: int) -> dict[str, Any]:
    """``clients`` threads x ``per_client`` requests (one image each) -> tokens/s, p50 / p95 latency."""
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bench", max_retries=0, timeout=600)
    urls = [_image_url(i, px) for i in range(clients * per_client)]

    def one(i: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        r = client.chat.completions.create(model=model, max_tokens=max_tokens, temperature=0, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": urls[i]}},
                                         {"type": "text", "text": f"Describe picture {i}."}]}])
        return time.perf_counter() - t0, r.usage.completion_tokens

    one(0)  # warm-up (first-call costs: lazy loading, allocator)

    def worker(c: int) -> list[tuple[float, int]]:
        return [one(c * per_client + k) for k in range(per_client)]

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        done = [r for rs in pool.map(worker, range(clients)) for r in rs]
    wall = time.perf_counter() - t0
    lat = sorted(t for t, _ in done)
    tokens = sum(n for _, n in done)
    return {"requests": len(done), "completion_tokens": tokens, "tokens_per_s": tokens / wall,
            "p50_s": float(np.percentile(lat, 50)), "p95_s": float(np.percentile(lat, 95)), "wall_s": wall}


def _servers(quick: bool, ours_dir: Path, hf_dir: Path, device: str) -> list[tuple[str, list[str], str]]:
    """``(name, command, served model id)`` of every server compared; the port goes last."""
    ours = [sys.executable, "-m", "vlm.serve", str(ours_dir), "--max-batch", "16", "--max-queue", "256",
            "--device", device, "--port"]
    out = [("ours", ours, ours_dir.name)]
    if quick:
        return out
    exe = shutil.which("transformers") or str(Path(sys.executable).parent / "transformers")
    theirs = [exe, "serve", str(hf_dir), "--device", device, "--host", "127.0.0.1", "--log-level", "warning"]
    out += [("transformers", [*theirs, "--port"], str(hf_dir)),
            ("transformers_cb", [*theirs, "--continuous-batching", "--port"], str(hf_dir))]
    return out


@BENCHES.register("serve")
def serve(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import vlm
    from vlm.data.tokenizer import byte_tokenizer
    from vlm.interop import to_hf

    spec = size(args.quick, args.size)
    levels = QUICK_LEVELS if args.quick else LEVELS
    per_client, max_tokens = (1, 4) if args.quick else (2, 32)
    px = spec["encoder"]["image_size"]
    rows: list[dict[str, Any]] = []
    notes: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        torch.manual_seed(0)
        model = vlm.build(model_config(spec), tokenizer=byte_tokenizer("chatml"))
        model.set_template("chatml")
        model.save_pretrained(tmp / "bench-vlm")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            to_hf(model.eval(), tmp / "bench-hf")
        del model
        if args.quick:
            notes["transformers"] = "not run with --quick (a second server start); run without --quick to compare"
        for name, cmd, model_id in _servers(args.quick, tmp / "bench-vlm", tmp / "bench-hf", args.device):
            port = _port()
            try:
                server = Server([*cmd, str(port)], port, tmp / f"{name}.log",
                                threads=getattr(args, "server_threads", None))
            except (RuntimeError, OSError) as e:
                notes[name] = f"could not start: {e}"
                continue
            try:
                for clients in levels:
                    rows.append({"server": name, "clients": clients,
                                 **measure(port, model_id, clients, per_client, max_tokens, px)})
            except Exception as e:  # noqa: BLE001 -- a server that fails mid-run is reported, the others still run
                notes[name] = f"failed while measuring: {type(e).__name__}: {e}"
            finally:
                server.stop()
    ref = {r["clients"]: r["tokens_per_s"] for r in rows if r["server"] == "transformers_cb"} or \
        {r["clients"]: r["tokens_per_s"] for r in rows if r["server"] == "transformers"}
    for r in rows:
        if r["clients"] in ref:
            r["throughput_ratio"] = r["tokens_per_s"] / ref[r["clients"]]
    return {"rows": rows, "columns": ["server", "clients", "requests", "completion_tokens", "tokens_per_s", "p50_s",
                                      "p95_s", "throughput_ratio"],
            "setup": {"size": args.size or ("quick" if args.quick else "full"), "spec": spec,
                      "per_client": per_client, "max_tokens": max_tokens, "levels": list(levels),
                      "server_threads": getattr(args, "server_threads", None),
                      "ratio_reference": "transformers_cb" if any(r["server"] == "transformers_cb" for r in rows)
                      else "transformers"},
            "notes": notes, "targets": {"throughput_ratio_at_16_clients": 1.0}}
