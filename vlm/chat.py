"""``python -m vlm.chat MODEL_DIR``: chat with a model in the terminal.

MODEL_DIR is a ``vlm.load`` directory, a training run directory (its ``final/`` and its chat template) or a
transformers directory (LLaVA, ...) imported on the fly. Interactive commands::

    /image PATH   add an image to the next turn (several: repeat)
    /reset        forget the history (and pending images)
    /save FILE    write the history as JSON, its images as PNG files in FILE's folder (vlm.inference.load_history)
    /quit         leave (end of input too)

Anything else is your message; the reply streams as it is generated. A reply with boxes is drawn on the turn's last
image (or the latest image of the conversation), saved under ``--out-dir`` and its path printed. One-shot use in
scripts: ``--prompt TEXT [--image PATH ...]`` prints only the reply. Bad input (an image that cannot be opened, an
empty prompt, a prompt longer than the context window) prints an error and the session goes on.
"""
from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

HELP = "commands: /image PATH, /reset, /save FILE, /quit; anything else is your message"


class Session:
    """An interactive chat: history, pending images, where annotated images go. ``say(text)`` runs one turn."""

    def __init__(self, model: Any, processor: Any, out_dir: Path, out: TextIO | None = None,
                 **generate_kwargs: Any) -> None:
        from vlm.eval.evaluator import model_frame

        self.model, self.processor, self.out_dir, self.out = model, processor, out_dir, out or sys.stdout
        self.generate_kwargs = generate_kwargs
        self.history: list[dict[str, Any]] = []
        self.pending: list[str] = []
        self.frame = model_frame(processor)
        self.saved = 0

    def print(self, *parts: Any, end: str = "\n") -> None:
        print(*parts, end=end, file=self.out, flush=True)

    def command(self, line: str) -> bool:
        """Run one input line; ``False`` to quit."""
        from vlm.data.errors import DataError

        cmd, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        if cmd == "/quit":
            return False
        if cmd == "/reset":
            self.history, self.pending = [], []
            self.print("(history cleared)")
        elif cmd == "/image":
            self.add_image(arg)
        elif cmd == "/save":
            if not arg:
                self.print("error: /save needs a file name")
            else:
                from vlm.inference.history import save_history

                try:
                    save_history(self.history, arg)
                except (OSError, ValueError) as e:
                    self.print(f"error: {e}")
                else:
                    self.print(f"(history saved to {arg}, its images in {Path(arg).stem}_images/)")
        elif cmd.startswith("/") and cmd not in ("/", "//"):
            self.print(f"error: unknown command {cmd!r}; {HELP}")
        else:
            try:
                self.say(line.strip())
            except (DataError, ValueError) as e:
                self.print(f"\nerror: {e}")
        return True

    def add_image(self, path: str) -> None:
        from vlm.data.errors import DataError
        from vlm.data.images import load_image

        if not path:
            self.print("error: /image needs a path")
            return
        try:
            load_image(path)
        except DataError as e:
            self.print(f"error: {e}")
            return
        self.pending.append(path)
        self.print(f"(image {path} added to the next turn)")

    def say(self, text: str) -> str:
        """One turn with the pending images: stream the reply, save the annotated image when it has boxes."""
        from vlm.inference.chat import chat_stream

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            stream = chat_stream(self.model, self.pending or None, text, self.history, processor=self.processor,
                                 **self.generate_kwargs)
            self.print("assistant: ", end="")
            for piece in stream:
                self.print(piece, end="")
            self.print()
        for w in caught:
            self.print(f"note: {w.message}")
        self.history = stream.history
        self.pending = []
        if not stream.reply.strip():
            self.print("note: the reply is empty (the model ended its turn at once, as an untrained model often "
                       "does); sampling (--temperature 1.0) shows what it would say")
        self.annotate(stream.reply)
        return stream.reply

    def latest_image(self) -> str | None:
        for message in reversed(self.history):
            for part in reversed(message["content"] if isinstance(message["content"], list) else []):
                if part.get("type") == "image" and isinstance(part.get("image"), str):
                    return part["image"]
        return None

    def annotate(self, reply: str) -> Path | None:
        from vlm.inference.draw import draw_boxes, reply_boxes

        image = self.latest_image()
        if image is None:
            return None
        from vlm.data.images import load_image

        pil = load_image(image)
        if not reply_boxes(reply, pil.size, json_frame=self.frame):
            return None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.saved += 1
        path = self.out_dir / f"boxes_{self.saved:03d}.png"
        draw_boxes(pil, reply, json_frame=self.frame).save(path)
        self.print(f"(boxes drawn on {image}: {path})")
        return path


def main(argv: Sequence[str] | None = None, stdin: TextIO | None = None) -> int:
    import argparse

    from vlm.quantize import SCHEMES

    ap = argparse.ArgumentParser(prog="python -m vlm.chat", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--image", action="append", default=[], help="an image for the first turn (repeatable)")
    ap.add_argument("--prompt", default=None, help="one-shot: answer this and print only the reply")
    ap.add_argument("--template", default=None, help="chat template (default: the run's, else the directory's)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=None, help="sample with this temperature (default greedy)")
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--repetition-penalty", type=float, default=None)
    ap.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    ap.add_argument("--out-dir", default="chat_images", help="where images with drawn boxes are saved")
    ap.add_argument("--device", default=None)
    ap.add_argument("--quantize", default=None, choices=SCHEMES.names(),
                    help="weight-only quantization of the LLM's linear layers (vlm.quantize; default: none)")
    a = ap.parse_args(argv)
    from vlm.data.errors import DataError
    from vlm.inference.chat import chat, processor_for
    from vlm.inference.load import open_model

    try:
        opened = open_model(a.model_dir, device=a.device, quantize=a.quantize)
        processor = processor_for(opened.model, a.template or opened.template)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"vlm.chat: {e}", file=sys.stderr)
        return 2
    options = {k: v for k, v in {"max_new_tokens": a.max_new_tokens, "temperature": a.temperature, "top_p": a.top_p,
                                 "top_k": a.top_k, "repetition_penalty": a.repetition_penalty}.items()
               if v is not None}
    if a.prompt is not None:
        try:
            reply, _ = chat(opened.model, a.image or None, a.prompt, processor=processor, stop=a.stop, **options)
        except (DataError, ValueError) as e:
            print(f"vlm.chat: {e}", file=sys.stderr)
            return 2
        print(reply)
        if not reply.strip():
            print("vlm.chat: note: the reply is empty (the model ended its turn at once, as an untrained model "
                  "often does); sampling (--temperature 1.0) shows what it would say", file=sys.stderr)
        return 0
    session = Session(opened.model, processor, Path(a.out_dir), stop=a.stop, **options)
    for path in a.image:
        session.add_image(path)
    stdin = stdin or sys.stdin
    interactive = stdin.isatty()
    session.print(f"vlm.chat: {a.model_dir} (template {processor.template.name}). {HELP}")
    while True:
        if interactive:
            session.print("you: ", end="")
        line = stdin.readline()
        if not line:
            break
        if not interactive:
            text = line.rstrip("\n")
            session.print(f"you: {text if len(text) <= 80 else text[:77] + '...'}")
        if not session.command(line):
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
