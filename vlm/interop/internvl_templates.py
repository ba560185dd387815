"""The conversation formats of original InternVL checkpoints (``config.json``'s ``template`` key) as chat templates.

Original InternVL's ``chat()`` (read in OpenGVLab/InternVL's public ``conversation.py`` and
``modeling_internvl_chat.py``, not run here) builds its prompt with a "MPT"-style conversation::

    system_prefix + system_message + sep  (user_role + message + sep | assistant_role + message + sep)* assistant_role

and writes an image as ``<image>\\n`` before the question, each ``<image>`` then replaced by ``<img>`` +
``<IMG_CONTEXT>`` x (tokens per tile x tiles) + ``</img>``; the tokenizer adds its BOS in front. ``chat_template``
writes the same as a Jinja chat template in vlm's convention (an image part as ``<img><IMG_CONTEXT></img>`` + newline:
vlm's processor expands the context token in place), so ``model.chat`` on an imported original builds that prompt.
A template name not listed keeps the directory's tokenizer template.
"""
from __future__ import annotations

from dataclasses import dataclass

from vlm.data.templates.jinja import jinja_literal as q

#: InternVL2's system message (``internlm2-chat``, ``Hermes-2``, ``phi3-chat``)
INTERNVL2_SYSTEM = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
#: InternVL2.5's (``internvl2_5``)
INTERNVL2_5_SYSTEM = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"


@dataclass(frozen=True)
class Conversation:
    """One original conversation format (MPT separator style)."""

    system_prefix: str
    system_message: str
    user: str
    assistant: str
    sep: str

    @property
    def end_of_turn(self) -> str:
        """The token that ends a reply (original ``chat()`` stops at ``sep.strip()``)."""
        return self.sep.strip()


_IM = ("<|im_start|>system\n", "<|im_start|>user\n", "<|im_start|>assistant\n")
#: ``template`` key -> format
ORIGINAL_TEMPLATES: dict[str, Conversation] = {
    "internlm2-chat": Conversation(_IM[0], INTERNVL2_SYSTEM, _IM[1], _IM[2], "<|im_end|>"),
    "Hermes-2": Conversation(_IM[0], INTERNVL2_SYSTEM, _IM[1], _IM[2], "<|im_end|>"),
    "internvl2_5": Conversation(_IM[0], INTERNVL2_5_SYSTEM, _IM[1], _IM[2], "<|im_end|>\n"),
    "phi3-chat": Conversation("<|system|>\n", INTERNVL2_SYSTEM, "<|user|>\n", "<|assistant|>\n", "<|end|>"),
}


def chat_template(conv: Conversation, image_token: str) -> str:
    """The Jinja chat template of ``conv``: BOS, the system turn (the messages' own system message, else the
    format's), user and assistant turns (assistant content and its separator inside ``{% generation %}``), an image
    part as ``<img>`` + ``image_token`` + ``</img>`` + newline, text parts as they are."""
    image = q("<img>" + image_token + "</img>\n")
    content = ("{%- macro content(c) -%}{%- if c is string -%}{{- c -}}{%- else -%}{%- for p in c -%}"
               "{%- if p['type'] == 'image' -%}{{- " + image + " -}}"
               "{%- elif p['type'] == 'text' -%}{{- p['text'] -}}{%- endif -%}{%- endfor -%}{%- endif -%}"
               "{%- endmacro -%}")
    return (content + "{{- bos_token -}}"
            "{%- if messages and messages[0]['role'] == 'system' -%}"
            "{{- " + q(conv.system_prefix) + " + content(messages[0]['content']) + " + q(conv.sep) + " -}}"
            "{%- set turns = messages[1:] -%}"
            "{%- else -%}{{- " + q(conv.system_prefix + conv.system_message + conv.sep) + " -}}"
            "{%- set turns = messages -%}{%- endif -%}"
            "{%- for m in turns -%}"
            "{%- if m['role'] == 'assistant' -%}{{- " + q(conv.assistant) + " -}}"
            "{% generation %}{{- content(m['content']) + " + q(conv.sep) + " -}}{% endgeneration %}"
            "{%- else -%}{{- " + q(conv.user) + " + content(m['content']) + " + q(conv.sep) + " -}}{%- endif -%}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- " + q(conv.assistant) + " -}}{%- endif -%}")
