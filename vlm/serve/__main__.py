"""``python -m vlm.serve MODEL_DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY] ...``: serve a model with an
OpenAI-compatible API (``/v1/chat/completions``, ``/v1/models``, ``/health``); docs/deploy.md.

MODEL_DIR: a ``vlm.load`` directory, a training run directory (its ``final/`` and chat template) or a transformers
directory vlm imports (LLaVA, BLIP-2, InternVL, Qwen2-VL). SIGTERM / Ctrl-C: stop accepting, answer the requests in
flight, exit 0.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def parser() -> argparse.ArgumentParser:
    from vlm.quantize import SCHEMES

    ap = argparse.ArgumentParser(prog="python -m vlm.serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--api-key", default=os.environ.get("VLM_SERVE_API_KEY"),
                    help="require 'Authorization: Bearer KEY' (default: $VLM_SERVE_API_KEY; unset: no key)")
    ap.add_argument("--model-name", default=None, help="the served model id (default: MODEL_DIR's name)")
    ap.add_argument("--template", default=None, help="chat template (default: the run's, else the directory's)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--quantize", default=None, choices=SCHEMES.names(),
                    help="weight-only quantization of the LLM's linear layers (vlm.quantize; default: none)")
    ap.add_argument("--max-queue", type=int, default=64, help="requests waiting or running; more get 503")
    ap.add_argument("--max-batch", type=int, default=16, help="rows of one batched generate call")
    ap.add_argument("--batch-wait-ms", type=float, default=10.0,
                    help="how long the first request of a batch waits for others to join")
    ap.add_argument("--default-max-tokens", type=int, default=128,
                    help="max_tokens of a request that gives none (model.chat's default)")
    ap.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="width x height of one image")
    ap.add_argument("--max-body-mb", type=float, default=20.0, help="request body limit; larger bodies get 413")
    ap.add_argument("--image-root", default=None, help="serve file:// image URLs from under this folder only")
    ap.add_argument("--allow-urls", action="store_true", help="fetch http(s) image URLs (off by default)")
    ap.add_argument("--log-level", default="warning")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    a = parser().parse_args(argv)
    import uvicorn

    from vlm.inference.chat import processor_for
    from vlm.serve.app import ServeConfig, create_app
    from vlm.serve.images import ImagePolicy
    from vlm.serve.scheduler import Scheduler

    if a.max_queue < 1 or a.max_batch < 1 or a.default_max_tokens < 1 or a.max_image_pixels < 1 or a.max_body_mb <= 0:
        print("vlm.serve: --max-queue, --max-batch, --default-max-tokens, --max-image-pixels and --max-body-mb must "
              "be positive", file=sys.stderr)
        return 2
    if a.image_root is not None and not Path(a.image_root).is_dir():
        print(f"vlm.serve: --image-root {a.image_root!r} is not a directory", file=sys.stderr)
        return 2
    try:
        from vlm.inference.load import open_model

        opened = open_model(a.model_dir, device=a.device, quantize=a.quantize)
        processor = processor_for(opened.model, a.template or opened.template)
    except (FileNotFoundError, ValueError, TypeError) as e:
        print(f"vlm.serve: {e}", file=sys.stderr)
        return 2
    name = a.model_name or Path(os.path.abspath(a.model_dir)).name
    scheduler = Scheduler(opened.model, processor.tokenizer, max_queue=a.max_queue, max_batch=a.max_batch,
                          batch_wait_s=a.batch_wait_ms / 1000)
    max_bytes = int(a.max_body_mb * 2**20)
    cfg = ServeConfig(model_name=name, api_key=a.api_key or None, max_body_bytes=max_bytes,
                      default_max_tokens=a.default_max_tokens,
                      images=ImagePolicy(root=Path(a.image_root) if a.image_root else None, allow_urls=a.allow_urls,
                                         max_pixels=a.max_image_pixels, max_bytes=max_bytes))
    app = create_app(opened.model, processor, scheduler, cfg)
    scheduler.start()
    # uvicorn answers SIGTERM / SIGINT gracefully (in-flight requests finish), then re-raises the signal to the
    # handler found before it: a no-op one here, so a graceful stop exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    print(f"vlm.serve: {name} on http://{a.host}:{a.port}/v1 (template {processor.template.name})", flush=True)
    try:
        uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level, timeout_graceful_shutdown=None)
    finally:
        scheduler.stop(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
