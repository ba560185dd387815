"""The web demo's conversions, as plain functions (no Gradio objects, no model): what the page holds <-> the
conversation ``model.chat`` takes, and the boxes of a reply drawn on the image it is about.

- The demo's input box (a Gradio ``MultimodalTextbox``) gives ``{"text": str, "files": [path | {"path": ...}, ...]}``;
  :func:`input_turn` turns it into the ``(images, text)`` of one ``model.chat`` turn.
- The conversation is ``model.chat``'s plain history (``vlm.inference.chat``): user messages hold image parts (file
  paths) then a text part, assistant messages a text part. :func:`chatbot_messages` renders it as the messages a
  Gradio ``Chatbot`` shows (``{"role", "content": [...]}``; text as ``{"type": "text"}`` so Gradio keeps it verbatim,
  images as ``{"path": ..., "alt_text": ...}``), with each assistant reply that holds boxes followed by its drawing
  (see :func:`drawings`). The app keeps the conversation itself (a ``gr.State``) and renders the chatbot from it, so
  nothing is parsed back from the page.
- A reply's boxes are drawn (``vlm.draw_boxes``) on the latest image of the conversation up to that reply: the image
  the question was about (the turn's last image, else an earlier turn's).
"""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Message = dict[str, Any]

#: ``alt_text`` of a drawn image in the chatbot (the browser test and a screen reader find it by this prefix).
DRAWN_ALT = "boxes drawn on"


def _file_path(entry: Any) -> str:
    """The path of one uploaded file as Gradio hands it over (a path or a ``FileData``-like dict)."""
    if isinstance(entry, (str, os.PathLike)):
        return os.fspath(entry)
    if isinstance(entry, dict) and isinstance(entry.get("path"), str):
        return entry["path"]
    if isinstance(entry, dict) and isinstance(entry.get("file"), dict):
        return _file_path(entry["file"])
    raise ValueError(f"an uploaded file must be a path or a dict with 'path'; got {entry!r}")


def input_turn(value: dict[str, Any] | str | None) -> tuple[list[str], str]:
    """``(image paths, text)`` of the input box's value (``{"text", "files"}``; a plain string is text only).
    Raises ``ValueError`` for an empty question (``model.chat`` needs text; an image alone is not a question)."""
    if value is None:
        value = {}
    if isinstance(value, str):
        value = {"text": value}
    text = value.get("text") or ""
    files = [_file_path(f) for f in value.get("files") or []]
    if not text.strip():
        raise ValueError("type a question (an image alone is not a question)" if files else "type a question")
    return files, text


#: Control characters a browser drops or hides (all of C0 but tab and newline, DEL, C1): shown as escapes.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def shown_text(text: str) -> str:
    """``text`` as the page shows it: control characters (a tiny or broken model can emit NUL; a browser drops them)
    written as visible escapes (NUL as the four characters backslash, x, 0, 0), everything else as is. The
    conversation keeps the text unchanged."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _parts(message: Message) -> list[dict[str, Any]]:
    content = message.get("content")
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])


def message_text(message: Message) -> str:
    """The text parts of a conversation message, joined."""
    return "".join(p.get("text", "") for p in _parts(message) if p.get("type") == "text")


def _image_source(part: dict[str, Any]) -> Any:
    return part.get("image") if part.get("type") == "image" else None


@dataclass
class Drawing:
    """The boxes of assistant message ``index`` drawn on ``source`` (the conversation's image): ``image`` (PIL)."""

    index: int
    source: Any
    image: Any


def drawings(history: Sequence[Message], *, json_frame: tuple[int, int] | None = None) -> list[Drawing]:
    """One :class:`Drawing` per assistant reply with at least one box (``vlm.inference.draw.reply_boxes``), drawn on
    the latest image before it. ``json_frame``: the pixel frame the model answers absolute (JSON) boxes in
    (``vlm.eval.evaluator.model_frame``). A reply with boxes before any image is not drawn."""
    from vlm.data.images import load_image
    from vlm.inference.draw import draw_boxes, reply_boxes

    out, latest = [], None
    for i, message in enumerate(history):
        for part in _parts(message):
            if _image_source(part) is not None:
                latest = _image_source(part)
        if message.get("role") != "assistant" or latest is None:
            continue
        reply = message_text(message)
        image = load_image(latest)
        if reply_boxes(reply, image.size, json_frame=json_frame):
            out.append(Drawing(i, latest, draw_boxes(image, reply, json_frame=json_frame)))
    return out


def save_drawing(drawing: Drawing, folder: str | os.PathLike) -> str:
    """Write ``drawing.image`` as a PNG in ``folder`` (named by its content, so a redraw reuses the file); its path."""
    import io

    buf = io.BytesIO()
    drawing.image.save(buf, format="PNG")
    data = buf.getvalue()
    path = Path(folder) / f"boxes_{hashlib.sha256(data).hexdigest()[:16]}.png"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return str(path)


def chatbot_messages(history: Sequence[Message], drawn: dict[int, str] | None = None) -> list[Message]:
    """The Gradio ``Chatbot`` messages of a conversation: each user message's images (``{"path"}``, file paths only:
    the demo's conversations hold uploaded files) then its text, each assistant reply's text followed by the file of
    its drawing when ``drawn`` (assistant message index -> PNG path, from :func:`drawings` + :func:`save_drawing`)
    has one. Texts are shown with :func:`shown_text`."""
    out = []
    drawn = drawn or {}
    for i, message in enumerate(history):
        content: list[dict[str, Any]] = []
        for part in _parts(message):
            src = _image_source(part)
            if src is not None:
                if not isinstance(src, (str, os.PathLike)):
                    raise ValueError(f"message {i}: the demo shows images given as file paths; got {type(src)}")
                content.append({"path": os.fspath(src), "alt_text": f"image {Path(src).name}"})
            elif part.get("type") == "text":
                content.append({"type": "text", "text": shown_text(part["text"])})
        if i in drawn:
            content.append({"path": drawn[i], "alt_text": f"{DRAWN_ALT} the image"})
        out.append({"role": message["role"], "content": content})
    return out


def image_folders(history: Sequence[Message]) -> list[str]:
    """The folders of a conversation's image files (what the web server must be allowed to serve)."""
    folders = {str(Path(_image_source(p)).resolve().parent) for m in history for p in _parts(m)
               if isinstance(_image_source(p), (str, os.PathLike))}
    return sorted(folders)
