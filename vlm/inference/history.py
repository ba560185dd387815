"""Save and load a chat history (``model.chat``'s plain list of messages) with its images.

``save_history(history, "talk.json")`` writes the messages as JSON and every image of the conversation (a path, a
``PIL`` image or an array) as a PNG file in ``talk_images/`` next to it, referenced by its path relative to the JSON
file; so the saved history is self-contained and can be moved as a folder. ``load_history("talk.json")`` reads it
back with image paths resolved against the JSON file's folder. Safe by default: an image path that leads outside
that folder (``../x.png``, an absolute path; e.g. in a history edited or received from elsewhere) is refused with an
error naming it, unless ``allow_outside=True``. Only image files are read (decoded as images by ``vlm.data.images``
when chat uses them); nothing is pickled.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

Message = dict[str, Any]
SOURCE_KEYS = ("image", "path", "url", "image_url")


def _image_dir(path: Path) -> Path:
    return path.with_name(f"{path.stem}_images")


def _source(part: dict[str, Any]) -> tuple[str | None, Any]:
    """``(key, source)`` of an image part (``(None, None)`` for a part without one)."""
    for key in SOURCE_KEYS:
        if part.get(key) is not None:
            return key, part[key]
    return None, None


def save_history(history: list[Message], path: str | os.PathLike) -> Path:
    """Write ``history`` to ``path`` (JSON) and its images as PNG files in ``<stem>_images/`` beside it (replacing
    that folder's PNGs of an earlier save). Returns ``path``. Raises ``ValueError`` naming the message and part of an
    image that cannot be read, or a URL (not fetched: give a local file)."""
    from vlm.data.errors import DataError
    from vlm.data.images import load_image

    path = Path(path)
    folder = _image_dir(path)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    count = 0
    out: list[Message] = []
    for i, message in enumerate(history):
        content = message.get("content")
        if not isinstance(content, list):
            out.append(dict(message))
            continue
        parts = []
        for j, part in enumerate(content):
            key, src = _source(part) if isinstance(part, dict) and part.get("type") in ("image", "image_url") \
                else (None, None)
            if key is None:
                parts.append(part)
                continue
            if isinstance(src, np.ndarray):
                src = Image.fromarray(src if src.dtype == np.uint8 else np.clip(src, 0, 255).astype(np.uint8))
            try:
                image = load_image(os.fspath(src) if isinstance(src, os.PathLike) else src)
            except (DataError, OSError) as e:
                raise ValueError(f"save_history: message {i}, part {j}: the image cannot be saved: {e}") from e
            count += 1
            name = f"{count:03d}.png"
            image.save(folder / name)
            parts.append({"type": "image", "image": f"{folder.name}/{name}"})
        out.append({**message, "content": parts})
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(out, indent=1, ensure_ascii=False))
    os.replace(tmp, path)
    return path


def load_history(path: str | os.PathLike, *, allow_outside: bool = False) -> list[Message]:
    """The history ``save_history`` wrote to ``path``, image paths made absolute (resolved against the JSON file's
    folder). Raises ``ValueError`` for a file that is not a list of messages, and for an image path outside that
    folder (unless ``allow_outside``) or a URL, naming the message and the path; ``FileNotFoundError`` naming a
    missing image."""
    path = Path(path)
    try:
        history = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"load_history: {str(path)!r} is not valid JSON: {e}") from e
    if not isinstance(history, list) or not all(isinstance(m, dict) for m in history):
        raise ValueError(f"load_history: {str(path)!r} holds no list of messages (expected what save_history "
                         f"writes: [{{'role': ..., 'content': ...}}, ...])")
    root = path.resolve().parent
    for i, message in enumerate(history):
        content = message.get("content")
        for j, part in enumerate(content if isinstance(content, list) else []):
            key, src = _source(part) if isinstance(part, dict) and part.get("type") in ("image", "image_url") \
                else (None, None)
            if key is None:
                continue
            where = f"load_history: {str(path)!r}, message {i}, part {j}: image {src!r}"
            if not isinstance(src, str) or "://" in src or src.startswith("data:"):
                raise ValueError(f"{where}: expected a file path (save_history writes PNG files next to the JSON)")
            file = (root / src).resolve()
            if not allow_outside and not file.is_relative_to(root):
                raise ValueError(f"{where} is outside {str(root)!r}; refused (a saved history keeps its images "
                                 f"beside it); pass allow_outside=True to read it anyway")
            if not file.is_file():
                raise FileNotFoundError(f"{where}: no such file")
            part.pop(key)
            part["image"] = str(file)
    return history
