"""Hand-written templates: ``chatml``, ``llama3`` (role-header formats) and ``plain`` (caption pretraining)."""
from __future__ import annotations

from typing import Any

from vlm.data.sample import Message, Sample
from vlm.data.templates.base import TEMPLATES, ImageSlot, Segment, Template, Text, content, merge
from vlm.data.templates.jinja import content_macro, jinja_literal as q


class RoleTemplate(Template):
    """``[bos] (header(role) content end_of_turn separator)* [header("assistant")]``.

    Trainable: each assistant message's content and its ``end_of_turn``; the ``separator`` after it is not.
    ``default_system`` is inserted when the sample has no system message.
    """

    bos: str | None = None
    header: str = "{role}\n"
    eot: str = "\n"
    separator: str = ""

    def __init__(self, image_start: str | None = None, image_end: str | None = None,
                 default_system: str | None = None) -> None:
        super().__init__(image_start, image_end)
        self.default_system = default_system

    def render(self, sample: Sample, tokenizer: Any = None, add_generation_prompt: bool = False) -> list[Segment]:
        messages = list(sample.messages)
        if self.default_system is not None and (not messages or messages[0].role != "system"):
            messages.insert(0, Message("system", [self.default_system]))
        out: list[Segment] = [Text(self.bos)] if self.bos else []
        for m in messages:
            train = m.role == "assistant"
            out.append(Text(self.header.format(role=m.role)))
            out += content(m, train)
            out += [Text(self.eot, train), Text(self.separator)]
        if add_generation_prompt:
            out.append(Text(self.header.format(role="assistant")))
        return merge(out)

    def end_of_turn(self, tokenizer: Any = None) -> str:
        return self.eot

    def special_tokens(self, tokenizer: Any = None) -> list[str]:
        return [self.eot, *(t for t in (self.bos,) if t), *super().special_tokens(tokenizer)]

    def as_jinja(self, tokenizer: Any = None, image_token: str = "<image>", image_placement: Any = None,
                 video_token: str | None = None) -> str:
        """The same format as Jinja (assistant content + end of turn inside ``{% generation %}``; list content
        joined with ``image_placement``; video parts written with ``video_token``)."""
        pre, _, post = self.header.partition("{role}")

        def header(role: str) -> str:
            return f"{q(pre)} + {role} + {q(post)}"

        turn_end = f"{q(self.eot)}"
        video = self.image_text(video_token) if video_token else None
        out = [content_macro(self.image_text(image_token), image_placement=image_placement, video_text=video)]
        if self.bos:
            out.append(f"{{{{- {q(self.bos)} -}}}}")
        if self.default_system is not None:
            out.append("{%- if messages | length == 0 or messages[0]['role'] != 'system' -%}"
                       f"{{{{- {header(q('system'))} + {q(self.default_system)} + {turn_end} + {q(self.separator)} -}}}}"
                       "{%- endif -%}")
        out.append("{%- for m in messages -%}"
                   f"{{{{- {header('m.role')} -}}}}"
                   "{%- if m.role == 'assistant' -%}"
                   f"{{% generation %}}{{{{- content(m.content) + {turn_end} -}}}}{{% endgeneration %}}"
                   f"{{%- else -%}}{{{{- content(m.content) + {turn_end} -}}}}{{%- endif -%}}"
                   f"{{{{- {q(self.separator)} -}}}}"
                   "{%- endfor -%}"
                   f"{{%- if add_generation_prompt -%}}{{{{- {header(q('assistant'))} -}}}}{{%- endif -%}}")
        return "".join(out)


@TEMPLATES.register("chatml")
class ChatML(RoleTemplate):
    """``<|im_start|>{role}\\n{content}<|im_end|>\\n`` (Qwen, InternVL); no image markers unless configured."""

    name = "chatml"
    header = "<|im_start|>{role}\n"
    eot = "<|im_end|>"
    separator = "\n"

    def special_tokens(self, tokenizer: Any = None) -> list[str]:
        return ["<|im_start|>", *super().special_tokens(tokenizer)]


@TEMPLATES.register("llama3")
class Llama3(RoleTemplate):
    """``<|begin_of_text|>`` then ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>``."""

    name = "llama3"
    bos = "<|begin_of_text|>"
    header = "<|start_header_id|>{role}<|end_header_id|>\n\n"
    eot = "<|eot_id|>"

    def special_tokens(self, tokenizer: Any = None) -> list[str]:
        return ["<|start_header_id|>", "<|end_header_id|>", *super().special_tokens(tokenizer)]


@TEMPLATES.register("plain")
class Plain(Template):
    """Caption pretraining (LLaVA's ``plain``): images, then the caption; no roles, no system.

    User messages contribute only their images (their text is dropped unless ``keep_user_text``); assistant text
    (the caption) plus ``eos`` (default: the tokenizer's ``eos_token``) is the label, followed by ``separator``.
    """

    name = "plain"

    def __init__(self, image_start: str | None = None, image_end: str | None = None, eos: str | None = None,
                 keep_user_text: bool = False, separator: str = "", add_bos: bool = False) -> None:
        super().__init__(image_start, image_end)
        self.eos, self.keep_user_text, self.separator, self.add_bos = eos, keep_user_text, separator, add_bos

    def end_of_turn(self, tokenizer: Any = None) -> str:
        eos = self.eos or getattr(tokenizer, "eos_token", None)
        if not eos:
            raise ValueError("template 'plain' needs an end token: the tokenizer has no eos_token; pass eos=...")
        return eos

    def render(self, sample: Sample, tokenizer: Any = None, add_generation_prompt: bool = False) -> list[Segment]:
        out: list[Segment] = [Text(tokenizer.bos_token)] if self.add_bos and tokenizer.bos_token else []
        for m in sample.messages:
            if m.role == "assistant":
                out += content(m, True) + [Text(self.end_of_turn(tokenizer), True), Text(self.separator)]
            elif m.role == "user":
                out += content(m, False, keep_text=self.keep_user_text)
        return merge(out)

    def special_tokens(self, tokenizer: Any = None) -> list[str]:
        return [self.end_of_turn(tokenizer), *super().special_tokens(tokenizer)]

    def as_jinja(self, tokenizer: Any = None, image_token: str = "<image>", image_placement: Any = None,
                 video_token: str | None = None) -> str:
        """The same format as Jinja: images (+ user text with ``keep_user_text``, joined with ``image_placement``),
        caption + end token."""
        bos = f"{{{{- {q(tokenizer.bos_token)} -}}}}" if self.add_bos and tokenizer.bos_token else ""
        image = self.image_text(image_token)
        user = "content" if self.keep_user_text else "images"
        return (content_macro(image, image_placement=image_placement) + content_macro(image, keep_text=False, name="images") + bos +
                "{%- for m in messages -%}{%- if m.role == 'assistant' -%}{% generation %}"
                f"{{{{- content(m.content) + {q(self.end_of_turn(tokenizer))} -}}}}{{% endgeneration %}}"
                f"{{{{- {q(self.separator)} -}}}}"
                f"{{%- elif m.role == 'user' -%}}{{{{- {user}(m.content) -}}}}{{%- endif -%}}{{%- endfor -%}}")


__all__ = ["ChatML", "ImageSlot", "Llama3", "Plain", "RoleTemplate"]
