"""Chat templates: a ``Sample`` -> segments (text with a trainable flag, image slots). See :mod:`.base`.

Registered: ``chatml``, ``llama3``, ``plain`` (caption pretraining), ``tokenizer`` (the tokenizer's own Jinja
chat template) and ``auto`` (``tokenizer`` when the tokenizer has a chat template, else ``chatml``). Build one
with ``build_template("chatml")`` or ``build_template({"name": "chatml", "image_start": "<img>",
"image_end": "</img>"})``.
"""
from vlm.data.templates.auto import AutoTemplate
from vlm.data.templates.base import TEMPLATES, ImageSlot, Segment, Template, Text, build_template, merge
from vlm.data.templates.chat import ChatML, Llama3, Plain, RoleTemplate
from vlm.data.templates.jinja import TokenizerTemplate

__all__ = ["TEMPLATES", "AutoTemplate", "ChatML", "ImageSlot", "Llama3", "Plain", "RoleTemplate", "Segment",
           "Template", "Text", "TokenizerTemplate", "build_template", "merge"]
