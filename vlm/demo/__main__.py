"""``python -m vlm.demo MODEL_DIR``: chat with a model about images in the browser.

MODEL_DIR is what ``python -m vlm.chat`` opens: a ``vlm.load`` directory, a training run directory (its ``final/``
and its chat template) or a transformers directory of a supported family, imported on the fly. The page is served on
``--host`` (default 127.0.0.1: this machine only) and ``--port``; it needs no internet (no CDN assets, telemetry
off). ``--share`` (off by default) would open a public Gradio tunnel, which needs internet. ``--history FILE`` starts
from a conversation saved by ``vlm.chat``'s ``/save`` (``vlm.inference.save_history``).
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any


def parser() -> Any:
    import argparse

    from vlm.quantize import SCHEMES

    ap = argparse.ArgumentParser(prog="python -m vlm.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--share", action="store_true", help="open a public Gradio share link (needs internet)")
    ap.add_argument("--template", default=None, help="chat template (default: the run's, else the directory's)")
    ap.add_argument("--history", default=None, help="start from a saved conversation (vlm.chat's /save)")
    ap.add_argument("--temperature", type=float, default=0.0, help="initial temperature (0: greedy)")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: where vlm.load puts it)")
    ap.add_argument("--quantize", default=None, choices=SCHEMES.names(),
                    help="weight-only quantization of the LLM's linear layers (vlm.quantize; default: none)")
    return ap


def main(argv: Sequence[str] | None = None, *, block: bool = True) -> Any:
    """Parse ``argv``, open the model, serve the page. Returns 2 (an error printed) for a bad directory / history;
    with ``block=False`` the launched app (stop it with ``app.close()``)."""
    a = parser().parse_args(argv)
    from vlm.demo.app import build_app, launch
    from vlm.inference.chat import processor_for
    from vlm.inference.history import load_history
    from vlm.inference.load import open_model
    from pathlib import Path

    try:
        opened = open_model(a.model_dir, device=a.device, quantize=a.quantize)
        processor = processor_for(opened.model, a.template or opened.template)
        history = load_history(a.history) if a.history else None
    except (FileNotFoundError, ValueError) as e:
        print(f"vlm.demo: {e}", file=sys.stderr)
        return 2
    app = build_app(opened.model, processor=processor, history=history, temperature=a.temperature, top_p=a.top_p,
                    max_new_tokens=a.max_new_tokens, stop=a.stop, title=f"vlm demo: {Path(a.model_dir).resolve().name}")
    if block:  # SIGTERM stops the page as Ctrl-C does (gradio closes the server on KeyboardInterrupt): exit 0
        import signal

        def stop(*_: Any) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, stop)
    launch(app, host=a.host, port=a.port, share=a.share, block=block)
    return app if not block else 0


if __name__ == "__main__":
    sys.exit(main())
