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

Images: with ``content_format="string"`` (default) each image is passed inside the content string as a private
sentinel character, located in the rendered text and turned into an image slot (the processor adds image markers if
configured). With ``content_format="list"`` messages are ``[{"type": "image"}, {"type": "text", "text": ...}]`` and the
template writes its own placeholder, ``image_placeholder`` (e.g. ``<|image_pad|>`` for Qwen2-VL), which is located
instead; whatever the template writes around it (``<|vision_start|>``) stays as text.
"""
from __future__ import annotations

import itertools
import json
import re
from typing import Any

from vlm.data.sample import ImageRef, Sample
from vlm.data.templates.base import TEMPLATES, ImageSlot, Segment, Template, Text, merge

def jinja_literal(text: str) -> str:
    """``text`` as a Jinja string literal (escapes decoded by Jinja's lexer give back exactly ``text``)."""
    return json.dumps(text, ensure_ascii=False)


def content_macro(image_text: str, keep_text: bool = True, name: str = "content", image_placement: Any = None) -> str:
    """A Jinja macro ``name(c)`` (default ``content(c)``): a string content as is, a list content as its parts in order (``image`` parts
    as ``image_text``, ``text`` parts as their text; only the images when ``keep_text`` is false). With an
    ``image_placement`` (``vlm.data.image_placement.ImagePlacement``) each image part also gets its label and separator
    (text, so not with ``keep_text`` false), as ``model.chat`` joins a turn's images and text."""
    text = "{{- p['text'] -}}" if keep_text else ""
    plain = "{{- c -}}" if keep_text else ""
    image = "{{- " + jinja_literal(image_text) + " -}}"
    setup = ""
    if image_placement is not None and keep_text:
        image = image_placement.jinja_image(image_text)
        setup = image_placement.JINJA_SETUP
    return ("{%- macro " + name + "(c) -%}{%- if c is string -%}" + plain + "{%- else -%}" + setup +
            "{%- for p in c -%}{%- if p['type'] == 'image' -%}" + image +
            "{%- elif p['type'] == 'text' -%}" + text + "{%- endif -%}{%- endfor -%}{%- endif -%}{%- endmacro -%}")


SENTINEL = "\ue000"  # a private-use character: never in real text, survives Jinja filters like trim
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


@TEMPLATES.register("tokenizer")
class TokenizerTemplate(Template):
    """Use ``tokenizer.chat_template`` (see the module docstring for the span-finding methods)."""

    name = "tokenizer"

    def __init__(self, method: str = "auto", content_format: str = "string", image_placeholder: str | None = None,
                 end_of_turn: str | None = None, image_start: str | None = None, image_end: str | None = None,
                 chat_template: str | None = None) -> None:
        if method not in ("auto", "generation", "prefix"):
            raise ValueError(f"method must be 'auto', 'generation' or 'prefix'; got {method!r}")
        if content_format not in ("string", "list"):
            raise ValueError(f"content_format must be 'string' or 'list'; got {content_format!r}")
        super().__init__(image_start, image_end)
        self.method, self.content_format = method, content_format
        self.image_placeholder = image_placeholder or ("<image>" if content_format == "list" else SENTINEL)
        self.eot, self.chat_template = end_of_turn, chat_template

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

    def _messages(self, sample: Sample) -> list[dict[str, Any]]:
        out = []
        for m in sample.messages:
            if self.content_format == "string":
                body: Any = "".join(SENTINEL if isinstance(p, ImageRef) else p for p in m.parts)
            else:
                body = [{"type": "image"} if isinstance(p, ImageRef) else {"type": "text", "text": p}
                        for p in m.parts]
            out.append({"role": m.role, "content": body})
        return out

    def _render(self, tokenizer: Any, messages: list[dict], add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             chat_template=self._template(tokenizer))

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
        messages = self._messages(sample)
        method = self.resolved_method(tokenizer)
        find = self._generation_spans if method == "generation" else self._prefix_spans
        text, spans = find(tokenizer, messages, add_generation_prompt)
        return self._segments(text, spans, [p.index for p in sample.image_refs()], sample.id)

    def _segments(self, text: str, spans: list[tuple[int, int]], image_order: list[int], sample_id: Any
                  ) -> list[Segment]:
        ph = self.image_placeholder
        starts = [m.start() for m in re.finditer(re.escape(ph), text)]
        if len(starts) != len(image_order):
            raise ValueError(f"sample {sample_id!r}: the chat template rendered {len(starts)} image placeholder(s) "
                             f"{ph!r} for {len(image_order)} image(s) (does it support images in "
                             f"content_format={self.content_format!r}?)")
        image_at = {s: image_order[k] for k, s in enumerate(starts)}
        bounds = sorted({0, len(text), *(e for sp in spans for e in sp), *starts, *(s + len(ph) for s in starts)})
        out: list[Segment] = []
        for lo, hi in itertools.pairwise(bounds):
            if lo in image_at:
                if hi != lo + len(ph):
                    raise ValueError(f"sample {sample_id!r}: an assistant span boundary falls inside an image "
                                     f"placeholder at character {lo}")
                out.append(ImageSlot(image_at[lo]))
            else:
                out.append(Text(text[lo:hi], any(s <= lo and hi <= e for s, e in spans)))
        return merge(out)

    def special_tokens(self, tokenizer: Any = None) -> list[str]:
        ph = [] if self.image_placeholder == SENTINEL else [self.image_placeholder]
        return ph + super().special_tokens(tokenizer)

    def as_jinja(self, tokenizer: Any = None, image_token: str = "<image>", image_placement: Any = None) -> str | None:
        """The Jinja template this template renders with (it places images itself: ``image_placement`` is not
        applied); ``None`` with image markers (added around image slots
        outside the Jinja template, so it alone does not reproduce them)."""
        if self.image_start or self.image_end:
            return None
        return self._template(tokenizer)
