"""``qwen_vl``: the prompt Qwen-VL-Chat was trained on and answers to (its ``make_context`` with ChatML).

::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\nPicture 1: <img>IMAGE</img>\\nPicture 2: <img>IMAGE</img>\\nQuestion<|im_end|>\\n
    <|im_start|>assistant\\n<ref>the dog</ref><box>(12,40),(388,960)</box><|im_end|>\\n
    <|im_start|>user\\n...

Each image of a message is written ``Picture N: <img>...</img>\\n`` (``N`` = 1, 2, ... within the message, as
Qwen-VL's ``from_list_format`` numbers a query's images). Qwen-VL's tokenizer puts the image's path bytes then
``<imgpad>`` between the tags, 256 positions in all, and its model overwrites those 256 positions with the image
features; here the processor writes the image token 256 times there (``num_queries`` of the resampler) and the
features are injected at them, so the LLM sees the same sequence. Boxes stay text, ``<ref>..</ref><box>(x1,y1),
(x2,y2)</box>`` with coordinates in ``[0, 1000)``.

Data in Qwen-VL's own JSON (the ``qwen_vl`` reader) already writes ``Picture N: `` and the newline around each image:
its text is kept as it is. A message that gives its images apart (a chat turn ``[image, image, question]``) gets them
written that way, so both render the same prompt.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from vlm.data.sample import ImageRef, Message, Sample
from vlm.data.templates.base import TEMPLATES, Segment
from vlm.data.templates.chat import ChatML

SYSTEM = "You are a helpful assistant."
LABEL = "Picture {n}: "


def label_images(message: Message) -> Message:
    """A message that gives its images apart (they lead it, no text among them: a chat turn ``[image, image,
    question]``) with each image written ``Picture N: IMAGE\n``; any other message as it is (its text places its
    images itself, as Qwen-VL's data does)."""
    parts = list(message.parts)
    n = 0
    while n < len(parts) and isinstance(parts[n], ImageRef):
        n += 1
    if n == 0 or any(isinstance(p, ImageRef) for p in parts[n:]):
        return message
    labelled: list[Any] = []
    for k, image in enumerate(parts[:n], 1):
        labelled += [LABEL.format(n=k), image, "\n"]
    return Message(message.role, labelled + parts[n:])


class PictureLabels:
    """What ``content_macro`` needs of an image placement to write ``Picture N: IMAGE\\n`` for list content."""

    JINJA_SETUP = "{%- set placement_ns = namespace(k=0) -%}"

    @staticmethod
    def jinja_image(image_text: str) -> str:
        from vlm.data.templates.jinja import jinja_literal as q

        return ("{%- set placement_ns.k = placement_ns.k + 1 -%}"
                f"{{{{- 'Picture ' + placement_ns.k | string + ': ' + {q(image_text)} + '\\n' -}}}}")


@TEMPLATES.register("qwen_vl")
class QwenVLChat(ChatML):
    """ChatML with Qwen-VL-Chat's default system prompt and ``Picture N: <img>...</img>\\n`` images."""

    name = "qwen_vl"

    def __init__(self, image_start: str | None = "<img>", image_end: str | None = "</img>",
                 default_system: str | None = SYSTEM) -> None:
        super().__init__(image_start, image_end, default_system)

    def places_images(self, tokenizer: Any = None) -> bool:
        return True

    def render(self, sample: Sample, tokenizer: Any = None, add_generation_prompt: bool = False) -> list[Segment]:
        labelled = dataclasses.replace(sample, messages=[label_images(m) for m in sample.messages])
        return super().render(labelled, tokenizer, add_generation_prompt)

    def as_jinja(self, tokenizer: Any = None, image_token: str = "<image>", image_placement: Any = None,
                 video_token: str | None = None) -> str:
        """The same format as Jinja; list content's images get their ``Picture N: `` label and newline."""
        return super().as_jinja(tokenizer, image_token, image_placement=PictureLabels())
