"""OpenAI chat messages -> what ``model.chat`` takes: ``(history, images, text)`` of the last user turn.

History messages keep their part order (text parts -> ``{"type": "text"}``, image_url parts -> ``{"type": "image"}``
holding the decoded image); an assistant message becomes ``vlm.inference.chat.assistant_turn`` of its text, as
``model.chat`` writes it into the history it returns. The last message must be the user's: its images and its text
(text parts joined with ``"\\n"``) are the turn ``model.chat(images, text, history)`` answers, so a request built from
a ``model.chat`` history gets exactly ``model.chat``'s reply.
"""
from __future__ import annotations

from typing import Any

from PIL import Image

from vlm.serve.errors import bad_request
from vlm.serve.images import ImagePolicy
from vlm.serve.schema import Message


def _parts(message: Message, i: int, policy: ImagePolicy) -> list[dict[str, Any]]:
    content = message.content
    if content is None:
        raise bad_request(f"messages[{i}].content: missing (a {message.role} message needs text)",
                          param=f"messages.{i}.content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    out = []
    for j, part in enumerate(content):
        where = f"messages[{i}].content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            out.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise bad_request(f"{where}.image_url.url: expected a string URL", param=f"{where}.image_url.url")
            out.append({"type": "image", "image": policy.open(url, f"{where}.image_url.url")})
        else:
            raise bad_request(f"{where}: unsupported content part {str(part)[:80]!r}; expected "
                              f"{{'type': 'text', 'text': ...}} or {{'type': 'image_url', 'image_url': {{'url': ...}}}}",
                              param=where)
    return out


def _text(parts: list[dict[str, Any]], i: int, role: str) -> str:
    if any(p["type"] == "image" for p in parts):
        raise bad_request(f"messages[{i}]: a {role} message cannot hold images (only user messages do)",
                          param=f"messages.{i}.content")
    return "\n".join(p["text"] for p in parts)


def convert(messages: list[Message], policy: ImagePolicy) -> tuple[list[dict[str, Any]], list[Image.Image], str]:
    """``(history, images of the last turn, text of the last turn)``; ``APIError`` 400 naming the message for a
    conversation that does not end with a user message, images outside user messages or a bad image."""
    from vlm.inference.chat import assistant_turn

    if messages[-1].role != "user":
        raise bad_request(f"messages[{len(messages) - 1}]: the last message must be the user's (role 'user'); got "
                          f"{messages[-1].role!r}", param="messages")
    history: list[dict[str, Any]] = []
    for i, m in enumerate(messages[:-1]):
        parts = _parts(m, i, policy)
        if m.role == "assistant":
            history.append(assistant_turn(_text(parts, i, m.role)))
        elif m.role in ("system", "developer"):
            history.append({"role": "system", "content": _text(parts, i, m.role)})
        else:
            history.append({"role": "user", "content": parts})
    last = _parts(messages[-1], len(messages) - 1, policy)
    images = [p["image"] for p in last if p["type"] == "image"]
    text = "\n".join(p["text"] for p in last if p["type"] == "text")
    return history, images, text
