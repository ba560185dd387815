"""The ``vicuna_v1`` template: LLaVA-1.5's conversation format (Vicuna v1.1, LLaVA's ``SeparatorStyle.TWO``).

Layout (``{bos}`` is the tokenizer's ``bos_token``; the **bold** part of each assistant turn is trained)::

    {bos}{system} USER: {user} ASSISTANT:** {reply}</s>**USER: {user} ASSISTANT:** {reply}</s>**

- the system prompt is followed by one space, each user turn by one space, each assistant reply by ``</s>``
  (nothing after it: the next ``USER:`` follows directly);
- the generation prompt ends with ``ASSISTANT:`` (no space): the model writes the space itself, so the space after
  ``ASSISTANT:`` belongs to the trained reply. With Llama's tokenizer that space is the ``▁`` of the reply's first
  token, which LLaVA trains; the role headers, system and user text (and ``bos``) are masked, as in LLaVA's
  ``preprocess_v1``;
- ``images_first`` (LLaVA's data preprocessing): in a message with images, the images come first, each followed by
  ``\\n``, then the message's text with surrounding whitespace stripped (``"What is <image>?"`` becomes
  ``"<image>\\nWhat is ?"``). Messages without images are kept as they are.

Tokenization: the processor tokenizes without adding special tokens, so ``bos`` is emitted here (``add_bos``, on
by default, as LLaVA's Llama tokenizer adds it; tokenizers without a ``bos_token`` get none). ``</s>`` is written
literally, as LLaVA does; for Llama/Vicuna it is the tokenizer's ``eos_token``, the generation stop.

The same format as a Jinja chat template (for exported tokenizers): :meth:`VicunaV1.as_jinja`.
"""
from __future__ import annotations

from typing import Any

from vlm.data.sample import ImageRef, Message, Sample, VideoRef
from vlm.data.templates.base import TEMPLATES, ImageSlot, Segment, Template, Text, VideoSlot, content, merge
from vlm.data.templates.jinja import jinja_literal as q

#: LLaVA's ``conv_vicuna_v1`` system prompt (what LLaVA-1.5 trains and evaluates with: ``--version v1``,
#: ``--conv-mode vicuna_v1``). LLaVA's ``conv_llava_v1`` says "human" instead of "user"; pass it as ``default_system``.
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")


@TEMPLATES.register("vicuna_v1")
class VicunaV1(Template):
    """LLaVA-1.5 / Vicuna v1.1 chat format (see the module docstring for the exact layout and label mask).

    Args:
        default_system: system prompt used when the sample has no system message (``None`` or ``""``: no system
            prompt and no separator after it).
        eos: end of each assistant turn, trained (LLaVA's ``sep2``).
        add_bos: start with the tokenizer's ``bos_token`` (if it has one).
        images_first: move each message's images to its start, each followed by ``\\n`` (LLaVA's preprocessing);
            ``False`` keeps images where the data put them.
        image_start / image_end: optional markers around each image's tokens (LLaVA-1.5: none).
    """

    name = "vicuna_v1"
    user, assistant = "USER", "ASSISTANT"
    separator = " "

    def __init__(self, image_start: str | None = None, image_end: str | None = None,
                 default_system: str | None = VICUNA_SYSTEM, eos: str = "</s>", add_bos: bool = True,
                 images_first: bool = True) -> None:
        super().__init__(image_start, image_end)
        self.default_system, self.eos, self.add_bos, self.images_first = default_system, eos, add_bos, images_first

    def places_images(self, tokenizer: Any = None) -> bool:
        return self.images_first

    def _bos(self, tokenizer: Any) -> str | None:
        return getattr(tokenizer, "bos_token", None) if self.add_bos else None

    def _content(self, message: Message, trainable: bool) -> list[Segment]:
        images = [p for p in message.parts if isinstance(p, (ImageRef, VideoRef))]
        if not (self.images_first and images):
            return content(message, trainable)
        text = "".join(p for p in message.parts if isinstance(p, str)).strip()
        out: list[Segment] = []
        for p in images:  # videos first too, each followed by "\n"
            out += [ImageSlot(p.index) if isinstance(p, ImageRef) else VideoSlot(p.index), Text("\n", trainable)]
        return out + [Text(text, trainable)]

    def render(self, sample: Sample, tokenizer: Any = None, add_generation_prompt: bool = False) -> list[Segment]:
        messages = list(sample.messages)
        bos = self._bos(tokenizer)
        out: list[Segment] = [Text(bos)] if bos else []
        if messages and messages[0].role == "system":
            system = self._content(messages.pop(0), False)
        else:
            system = [Text(self.default_system)] if self.default_system else []
        if merge(system):
            out += system + [Text(self.separator)]
        for m in messages:
            if m.role == "assistant":
                # the header stops at ":"; the space after it opens the trained reply (the model writes it)
                out += [Text(f"{self.assistant}:"), Text(" ", True), *self._content(m, True), Text(self.eos, True)]
            else:
                out += [Text(f"{self.user}: "), *self._content(m, False), Text(self.separator)]
        if add_generation_prompt:
            out.append(Text(f"{self.assistant}:"))
        return merge(out)

    def end_of_turn(self, tokenizer: Any = None) -> str:
        return self.eos

    def as_jinja(self, tokenizer: Any = None, image_token: str = "<image>", image_placement: Any = None,
                 video_token: str | None = None) -> str:
        """The same layout as Jinja (the trained reply inside ``{% generation %}``; with ``images_first`` the
        template places images itself, each followed by ``\\n``; otherwise list content is joined with
        ``image_placement``, as chat joins it); string content may hold
        ``image_token`` placeholders, list content ``{"type": "image"}`` parts. ``bos_token`` comes from the
        tokenizer rendering it (transformers passes its special tokens), as :meth:`render` takes it from the tokenizer.
        ``video_token`` is not used: video parts are left out of this Jinja (chat still renders them with vlm's
        template)."""
        img, tok = q(self.image_text(image_token) + "\n"), q(image_token)
        parts = ("{%- if n -%}{{- " + img + " * n + text | trim -}}{%- else -%}{{- text -}}{%- endif -%}"
                 if self.images_first else "{{- raw -}}")
        system = q(self.default_system or "")
        setup, count, raw_image = "", "", q(self.image_text(image_token))
        if image_placement is not None and not self.images_first:  # images where the message puts them, with the placement
            setup, count = image_placement.JINJA_SETUP, "{%- set placement_ns.k = placement_ns.k + 1 -%}"
            raw_image = image_placement.jinja_expression(self.image_text(image_token))
        return (
            "{%- macro vicuna_content(c) -%}{%- if c is string -%}"
            "{%- set n = c.count(" + tok + ") -%}{%- set text = c.replace(" + tok + ", '') -%}"
            "{%- set raw = c.replace(" + tok + ", " + q(self.image_text(image_token)) + ") -%}" + parts +
            "{%- else -%}{%- set ns = namespace(text='', raw='', n=0) -%}" + setup + "{%- for p in c -%}"
            "{%- if p['type'] == 'image' -%}{%- set ns.n = ns.n + 1 -%}" + count +
            "{%- set ns.raw = ns.raw + " + raw_image + " -%}"
            "{%- elif p['type'] == 'text' -%}{%- set ns.text = ns.text + p['text'] -%}"
            "{%- set ns.raw = ns.raw + p['text'] -%}{%- endif -%}{%- endfor -%}"
            "{%- set n = ns.n -%}{%- set text = ns.text -%}{%- set raw = ns.raw -%}" + parts +
            "{%- endif -%}{%- endmacro -%}"
            + ("{%- if bos_token is defined and bos_token -%}{{- bos_token -}}{%- endif -%}" if self.add_bos else "")
            + "{%- if messages and messages[0]['role'] == 'system' -%}"
            "{%- set system = vicuna_content(messages[0]['content']) -%}{%- set turns = messages[1:] -%}"
            "{%- else -%}{%- set system = " + system + " -%}{%- set turns = messages -%}{%- endif -%}"
            "{%- if system -%}{{- system + ' ' -}}{%- endif -%}"
            "{%- for m in turns -%}"
            "{%- if m['role'] == 'assistant' -%}"
            "{{- 'ASSISTANT:' -}}{% generation %}{{- ' ' + vicuna_content(m['content']) + " + q(self.eos) + " -}}"
            "{% endgeneration %}"
            "{%- else -%}{{- 'USER: ' + vicuna_content(m['content']) + ' ' -}}{%- endif -%}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}")

    def special_tokens(self, tokenizer: Any = None) -> list[str]:
        bos = self._bos(tokenizer)
        return [self.eos, *((bos,) if bos else ()), *super().special_tokens(tokenizer)]


__all__ = ["VICUNA_SYSTEM", "VicunaV1"]
