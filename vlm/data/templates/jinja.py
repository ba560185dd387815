"""The ``tokenizer`` template: render with the tokenizer's own Jinja chat template, find assistant spans.

How assistant spans are found (``method``):

- ``"generation"``: the chat template wraps assistant replies in ``{% generation %}..{% endgeneration %}``;
  transformers' renderer (the machinery behind ``apply_chat_template(return_assistant_tokens_mask=True)``) returns the
  exact character spans of those blocks. The template author decides what is inside (normally content + end token).
- ``"prefix"``: render incrementally and diff. For the assistant message ``i``, ``a = render(messages[:i],
  add_generation_prompt=True)`` and ``b = render(messages[:i+1])``; the reply is ``b[len(a):]``, kept up to and
  including the last end-of-turn token inside it (``end_of_turn``, default the tokenizer's ``eos_token``; without
  one, trailing whitespace is dropped). This requires every prefix render to be a prefix of the next one (true for
  chatml, llama3, mistral, gemma, ...); when it is not (templates that rewrite earlier turns, e.g. strip reasoning),
  a ``ValueError`` says so — use a template with ``{% generation %}`` then.
- ``"auto"`` (default): ``generation`` when the template has the tag, else ``prefix``.

Images: with ``content_format="string"`` each image is passed inside the content string as a private sentinel
character, located in the rendered text and turned into an image slot (the processor adds image markers if
configured). With ``content_format="list"`` messages are ``[{"type": "image"}, {"type": "text", "text": ...}]`` and the
template writes its own placeholder, ``image_placeholder`` (e.g. ``<|image_pad|>`` for Qwen2-VL), which is located
instead; whatever the template writes around it (``<|vision_start|>``, ``<img>``/``</img>``, a newline) stays as text.
``content_format="auto"`` (default) asks the template how it writes an image (:func:`image_rendering`: a probe
message rendered with and without an image part): ``list`` with the processor's image token as the placeholder when
what an image part adds holds that token once (so images render exactly as transformers' ``apply_chat_template``
renders them), else ``string`` (also whenever ``image_start`` / ``image_end`` are configured).

Videos: in list content a ``{"type": "video"}`` part when the template writes the processor's video token for one
(Qwen2-VL's ``<|vision_start|><|video_pad|><|vision_end|>``), located like an image's placeholder; otherwise (string
content, or a template that writes nothing for video parts) a second private sentinel character inside the text.
"""
from __future__ import annotations

import copy
import itertools
import json
import os
import re
from typing import Any

from vlm.data.sample import ImageRef, Sample, VideoRef
from vlm.data.templates.base import TEMPLATES, ImageSlot, Segment, Template, Text, VideoSlot, merge

def jinja_literal(text: str) -> str:
    """``text`` as a Jinja string literal (escapes decoded by Jinja's lexer give back exactly ``text``)."""
    return json.dumps(text, ensure_ascii=False)


def content_macro(image_text: str, keep_text: bool = True, name: str = "content", image_placement: Any = None,
                  video_text: str | None = None) -> str:
    """A Jinja macro ``name(c)`` (default ``content(c)``): a string content as is, a list content as its parts in order (``image`` parts
    as ``image_text``, ``text`` parts as their text; only the images when ``keep_text`` is false). With an
    ``image_placement`` (``vlm.data.image_placement.ImagePlacement``) each image part also gets its label and separator
    (text, so not with ``keep_text`` false), as ``model.chat`` joins a turn's images and text. ``video_text``: what
    a ``{"type": "video"}`` part is written as (``None``: video parts are left out)."""
    text = "{{- p['text'] -}}" if keep_text else ""
    plain = "{{- c -}}" if keep_text else ""
    image = "{{- " + jinja_literal(image_text) + " -}}"
    setup = ""
    if image_placement is not None and keep_text:
        image = image_placement.jinja_image(image_text)
        setup = image_placement.JINJA_SETUP
    video = "{%- elif p['type'] == 'video' -%}{{- " + jinja_literal(video_text) + " -}}" if video_text else ""
    return ("{%- macro " + name + "(c) -%}{%- if c is string -%}" + plain + "{%- else -%}" + setup +
            "{%- for p in c -%}{%- if p['type'] == 'image' -%}" + image + video +
            "{%- elif p['type'] == 'text' -%}" + text + "{%- endif -%}{%- endfor -%}{%- endif -%}{%- endmacro -%}")


SENTINEL = "\ue000"  # a private-use character: never in real text, survives Jinja filters like trim
VIDEO_SENTINEL = "\ue001"  # the same for a video the template does not write itself
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
#: the text parts of the probe message :func:`image_rendering` renders (an image part goes between them)
PROBE_TEXT = ("(probe text before)", "[probe text after]")


def render_messages(tokenizer: Any, chat_template: str, messages: list[dict[str, Any]],
                    add_generation_prompt: bool = False) -> str:
    """``messages`` rendered to text with ``chat_template`` (transformers' renderer, the tokenizer's special tokens
    as variables), as ``apply_chat_template(..., tokenize=False)`` renders them."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         chat_template=chat_template)


def image_rendering(tokenizer: Any, chat_template: str, image_token: str, kind: str = "image") -> str | None:
    """What ``chat_template`` writes for one ``{"type": "image"}`` part of a list content (e.g.
    ``"<img><IMG_CONTEXT></img>"``, ``"<IMG_CONTEXT>\\n"``), found by rendering a probe user message as
    ``[text, image, text]`` and as ``[text, text]`` and taking what the image part adds. ``None`` when the template
    does not take list content (it fails, or prints the list itself), the image part adds more than one insertion,
    or what it adds does not hold ``image_token`` exactly once. ``kind="video"``: the same for a ``{"type":
    "video"}`` part (``image_token`` then the video token)."""
    before, after = PROBE_TEXT
    text = [{"type": "text", "text": before}, {"type": "text", "text": after}]
    try:
        plain = render_messages(tokenizer, chat_template, [{"role": "user", "content": text}])
        with_image = render_messages(tokenizer, chat_template,
                                     [{"role": "user", "content": [text[0], {"type": kind}, text[1]]}])
    except Exception:  # noqa: BLE001 - a template rejecting list content (or images) raises its own errors
        return None
    if before not in plain or after not in plain:
        return None
    start = len(os.path.commonprefix([plain, with_image]))
    end = len(os.path.commonprefix([plain[start:][::-1], with_image[start:][::-1]]))
    added = with_image[start:len(with_image) - end]
    if start + end != len(plain) or added.count(image_token) != 1:
        return None
    return added


@TEMPLATES.register("tokenizer")
class TokenizerTemplate(Template):
    """Use ``tokenizer.chat_template`` (see the module docstring for the span-finding methods)."""

    name = "tokenizer"

    def __init__(self, method: str = "auto", content_format: str = "auto", image_placeholder: str | None = None,
                 end_of_turn: str | None = None, image_start: str | None = None, image_end: str | None = None,
                 chat_template: str | None = None) -> None:
        if method not in ("auto", "generation", "prefix"):
            raise ValueError(f"method must be 'auto', 'generation' or 'prefix'; got {method!r}")
        if content_format not in ("auto", "string", "list"):
            raise ValueError(f"content_format must be 'auto', 'string' or 'list'; got {content_format!r}")
        super().__init__(image_start, image_end)
        self.method, self.content_format = method, content_format
        self.image_placeholder = image_placeholder or {"list": "<image>", "string": SENTINEL}.get(content_format)
        self.eot, self.chat_template = end_of_turn, chat_template
        self.image_token: str | None = None  # the processor's (for_image_token); content_format="auto" looks for it
        self.video_token: str | None = None  # the processor's (for_video_token): a list content's video part writes it

    def for_image_token(self, image_token: str) -> TokenizerTemplate:
        """A copy whose ``content_format="auto"`` looks for ``image_token`` in what the template writes per image."""
        out = copy.copy(self)
        out.image_token = image_token
        return out

    def for_video_token(self, video_token: str | None) -> TokenizerTemplate:
        """A copy that looks for ``video_token`` in what the template writes per video part."""
        out = copy.copy(self)
        out.video_token = video_token
        return out

    def video_placeholder(self, tokenizer: Any, content_format: str) -> tuple[bool, str]:
        """``(as a video part, placeholder)``: in list content, a ``{"type": "video"}`` part located by the video
        token when the template writes it for one; otherwise a sentinel character in the text."""
        if content_format == "list" and self.video_token:
            key = (self._template(tokenizer), self.video_token, "video")
            cache = self.__dict__.setdefault("_modes", {})
            if key not in cache:
                cache[key] = image_rendering(tokenizer, key[0], self.video_token, kind="video") is not None
            if cache[key]:
                return True, self.video_token
        return False, VIDEO_SENTINEL

    # ------------------------------------------------------------------------------------------------ helpers
    def _template(self, tokenizer: Any) -> str:
        tpl = self.chat_template or getattr(tokenizer, "chat_template", None)
        if not tpl:
            raise ValueError("template 'tokenizer' needs a tokenizer with a chat_template (or chat_template=...)")
        return tpl

    def end_of_turn(self, tokenizer: Any = None) -> str | None:
        return self.eot or getattr(tokenizer, "eos_token", None)

    def resolved_method(self, tokenizer: Any) -> str:
        if self.method != "auto":
            return self.method
        return "generation" if _GENERATION_TAG.search(self._template(tokenizer)) else "prefix"

    def content_mode(self, tokenizer: Any) -> tuple[str, str]:
        """``(content_format, image placeholder)`` used with ``tokenizer``: ``content_format="auto"`` resolves to
        ``list`` with the placeholder ``image_placeholder`` (else the processor's image token) when
        :func:`image_rendering` finds it in what the template writes per image, else to ``string``. With
        ``image_start`` / ``image_end`` configured (the processor adds the markers) it stays ``string``, so the
        markers are not written twice."""
        if self.content_format != "auto":
            return self.content_format, self.image_placeholder
        token = self.image_placeholder or self.image_token
        if token and not (self.image_start or self.image_end):
            key = (self._template(tokenizer), token)
            cache = self.__dict__.setdefault("_modes", {})
            if key not in cache:
                cache[key] = image_rendering(tokenizer, key[0], token) is not None
            if cache[key]:
                return "list", token
        return "string", SENTINEL

    def places_images(self, tokenizer: Any = None) -> bool:
        """True when messages are rendered as list content (``content_mode``): the chat template then writes what
        surrounds each image itself (a template written by ``VLM.set_template`` joins images and text with the
        model's image placement), so chat passes a turn's parts unjoined."""
        return tokenizer is not None and self.content_mode(tokenizer)[0] == "list"

    def _messages(self, sample: Sample, content_format: str, video_part: bool = False) -> list[dict[str, Any]]:
        out = []
        for m in sample.messages:
            if content_format == "string":
                body: Any = "".join(SENTINEL if isinstance(p, ImageRef) else VIDEO_SENTINEL if isinstance(p, VideoRef)
                                    else p for p in m.parts)
            else:
                body = [{"type": "image"} if isinstance(p, ImageRef) else
                        ({"type": "video"} if video_part else {"type": "text", "text": VIDEO_SENTINEL})
                        if isinstance(p, VideoRef) else {"type": "text", "text": p} for p in m.parts]
            out.append({"role": m.role, "content": body})
        return out

    def _render(self, tokenizer: Any, messages: list[dict], add_generation_prompt: bool) -> str:
        return render_messages(tokenizer, self._template(tokenizer), messages, add_generation_prompt)

    # ----------------------------------------------------------------------------------------------- spans
    def _generation_spans(self, tokenizer: Any, messages: list[dict], agp: bool) -> tuple[str, list[tuple[int, int]]]:
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, spans = render_jinja_template(conversations=[messages], chat_template=self._template(tokenizer),
                                                return_assistant_tokens_mask=True, add_generation_prompt=agp,
                                                **getattr(tokenizer, "special_tokens_map", {}))
        return rendered[0], [tuple(s) for s in spans[0]]

    def _prefix_spans(self, tokenizer: Any, messages: list[dict], agp: bool) -> tuple[str, list[tuple[int, int]]]:
        full = self._render(tokenizer, messages, agp)
        eot = self.end_of_turn(tokenizer)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            a = self._render(tokenizer, messages[:i], True) if i else ""
            b = self._render(tokenizer, messages[:i + 1], False)
            if not (b.startswith(a) and full.startswith(b)):
                raise ValueError(
                    f"template 'tokenizer' (method='prefix'): rendering is not prefix-stable at message {i} (the "
                    f"chat template renders earlier turns differently as the conversation grows), so assistant "
                    f"spans cannot be found by diffing. Use a chat template with {{% generation %}} blocks.")
            reply = b[len(a):]
            if eot and eot in reply:
                end = reply.rindex(eot) + len(eot)
            else:
                end = len(reply.rstrip())
            spans.append((len(a), len(a) + end))
        return full, spans

    # ---------------------------------------------------------------------------------------------- render
    def render(self, sample: Sample, tokenizer: Any = None, add_generation_prompt: bool = False) -> list[Segment]:
        content_format, placeholder = self.content_mode(tokenizer)
        video_part, video_ph = self.video_placeholder(tokenizer, content_format) if sample.videos else (False, None)
        messages = self._messages(sample, content_format, video_part)
        method = self.resolved_method(tokenizer)
        find = self._generation_spans if method == "generation" else self._prefix_spans
        text, spans = find(tokenizer, messages, add_generation_prompt)
        return self._segments(text, spans, [p.index for p in sample.image_refs()], sample.id, placeholder,
                              content_format, [p.index for p in sample.video_refs()], video_ph)

    def _segments(self, text: str, spans: list[tuple[int, int]], image_order: list[int], sample_id: Any,
                  ph: str, content_format: str, video_order: list[int] = (),
                  video_ph: str | None = None) -> list[Segment]:
        slots: dict[int, tuple[Segment, int]] = {}  # start -> (slot, placeholder length)
        for kind, placeholder, order, slot in (("image", ph, image_order, ImageSlot),
                                               ("video", video_ph, video_order, VideoSlot)):
            if placeholder is None:
                continue
            starts = [m.start() for m in re.finditer(re.escape(placeholder), text)]
            if len(starts) != len(order):
                raise ValueError(f"sample {sample_id!r}: the chat template rendered {len(starts)} {kind} "
                                 f"placeholder(s) {placeholder!r} for {len(order)} {kind}(s) (does it support {kind}s "
                                 f"in content_format={content_format!r}?)")
            slots.update({s: (slot(order[k]), len(placeholder)) for k, s in enumerate(starts)})
        bounds = sorted({0, len(text), *(e for sp in spans for e in sp), *slots, *(s + n for s, (_, n) in slots.items())})
        out: list[Segment] = []
        for lo, hi in itertools.pairwise(bounds):
            if lo in slots:
                if hi != lo + slots[lo][1]:
                    raise ValueError(f"sample {sample_id!r}: an assistant span boundary falls inside an image / video "
                                     f"placeholder at character {lo}")
                out.append(slots[lo][0])
            else:
                out.append(Text(text[lo:hi], any(s <= lo and hi <= e for s, e in spans)))
        return merge(out)

    def special_tokens(self, tokenizer: Any = None) -> list[str]:
        placeholder = self.content_mode(tokenizer)[1] if getattr(tokenizer, "chat_template", None) or \
            self.chat_template else self.image_placeholder
        ph = [] if placeholder in (SENTINEL, None) else [placeholder]
        return ph + super().special_tokens(tokenizer)

    def as_jinja(self, tokenizer: Any = None, image_token: str = "<image>", image_placement: Any = None,
                 video_token: str | None = None) -> str | None:
        """The Jinja template this template renders with (it places images itself: ``image_placement`` is not
        applied); ``None`` with image markers (added around image slots
        outside the Jinja template, so it alone does not reproduce them)."""
        if self.image_start or self.image_end:
            return None
        return self._template(tokenizer)
