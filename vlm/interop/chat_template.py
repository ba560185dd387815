"""The chat template an export writes for a model that takes videos.

vlm renders a ``{"type": "video"}`` part that the tokenizer's chat template does not write itself (a template with
no video branch, e.g. ``vlm.data.byte_tokenizer("chatml")``'s) as a text part holding the video placeholder
(``vlm.data.templates.jinja``: ``VIDEO_SENTINEL``), so ``model.chat`` with a video works. transformers' processors
render the template as is: such a template drops the video part, and the processor then finds 0 video tokens for 1
video. ``template_with_videos`` returns the template with a preamble that rewrites every video part into exactly
that text part (``video_token``), so the exported directory renders the prompt ``model.chat`` renders.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any

from vlm.data.templates.jinja import image_rendering, jinja_literal


def video_preamble(video_token: str) -> str:
    """Jinja that rebinds ``messages`` with each list content's ``{"type": "video"}`` part replaced by the text part
    ``{"type": "text", "text": video_token}`` (other parts, string contents and other message keys unchanged)."""
    text_part = "{'type': 'text', 'text': " + jinja_literal(video_token) + "}"
    return ("{%- set vlm_ns = namespace(messages=[]) -%}{%- for vlm_m in messages -%}"
            "{%- if vlm_m['content'] is string or vlm_m['content'] is none -%}"
            "{%- set vlm_ns.messages = vlm_ns.messages + [vlm_m] -%}{%- else -%}"
            "{%- set vlm_parts = namespace(c=[]) -%}{%- for vlm_p in vlm_m['content'] -%}"
            "{%- if vlm_p['type'] == 'video' -%}{%- set vlm_parts.c = vlm_parts.c + [" + text_part + "] -%}"
            "{%- else -%}{%- set vlm_parts.c = vlm_parts.c + [vlm_p] -%}{%- endif -%}{%- endfor -%}"
            "{%- set vlm_ns.messages = vlm_ns.messages + [dict(vlm_m, content=vlm_parts.c)] -%}"
            "{%- endif -%}{%- endfor -%}{%- set messages = vlm_ns.messages -%}")


def writes_videos(tokenizer: Any, chat_template: str, video_token: str) -> bool:
    """Whether ``chat_template`` writes ``video_token`` exactly once for one ``{"type": "video"}`` part."""
    return image_rendering(tokenizer, chat_template, video_token, kind="video") is not None


def template_with_videos(tokenizer: Any, video_token: str) -> str | None:
    """The tokenizer's chat template, with ``video_preamble`` prepended when it writes nothing for a video part;
    unchanged when it already writes ``video_token``; ``None`` when there is no template or even the rewritten one
    does not write ``video_token`` once per video part (e.g. a template that takes string content only)."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or not template:
        return None
    if writes_videos(tokenizer, template, video_token):
        return template
    rewritten = video_preamble(video_token) + template
    return rewritten if writes_videos(tokenizer, rewritten, video_token) else None


def tokenizer_for_export(model: Any) -> Any:
    """``model.tokenizer`` as an export writes it: for a model that takes videos (``video_token_id`` set) whose chat
    template writes nothing for a video part, a copy whose template writes ``model.video_token`` for one (the
    model is not changed). Warns, naming the fix, when the template cannot be made to write videos."""
    tokenizer = model.tokenizer
    if tokenizer is None or getattr(model, "video_token_id", None) is None:
        return tokenizer
    video_token = model.video_token
    template = template_with_videos(tokenizer, video_token)
    if template is None:
        warnings.warn(f"to_hf: the model takes videos but its tokenizer's chat template does not write "
                      f"{video_token!r} for a {{'type': 'video'}} part, so transformers' processor will find no "
                      f"video tokens for a video; call model.set_template(NAME) (e.g. 'chatml') before exporting "
                      f"to write a template that does", stacklevel=4)
        return tokenizer
    if template == tokenizer.chat_template:
        return tokenizer
    out = copy.deepcopy(tokenizer)
    out.chat_template = template
    return out
