"""Chat templates: a ``Sample`` -> segments (text with a trainable flag, image slots). See :mod:`.base`.

Registered: ``chatml``, ``llama3``, ``qwen_vl`` (Qwen-VL-Chat), ``vicuna_v1`` (LLaVA-1.5's ``USER: .. ASSISTANT: ..</s>`` format), ``plain``
(caption pretraining), ``tokenizer`` (the tokenizer's own Jinja chat template) and ``auto`` (``tokenizer`` when the
tokenizer has a chat template, else ``chatml``). Build one with ``build_template("chatml")`` or
``build_template({"name": "chatml", "image_start": "<img>", "image_end": "</img>"})``.
"""
from vlm.data.templates.auto import AutoTemplate
from vlm.data.templates.base import TEMPLATES, ImageSlot, Segment, Template, Text, VideoSlot, build_template, merge
from vlm.data.templates.chat import ChatML, Llama3, Plain, RoleTemplate
from vlm.data.templates.jinja import TokenizerTemplate
from vlm.data.templates.qwen_vl import QwenVLChat
from vlm.data.templates.vicuna import VICUNA_SYSTEM, VicunaV1

__all__ = ["TEMPLATES", "VICUNA_SYSTEM", "AutoTemplate", "ChatML", "ImageSlot", "Llama3", "Plain", "QwenVLChat", "RoleTemplate",
           "Segment", "Template", "Text", "TokenizerTemplate", "VicunaV1", "VideoSlot", "build_template", "merge"]
