"""The ``auto`` template: the tokenizer's own Jinja chat template when it has one, else a built-in fallback."""
from __future__ import annotations

import copy
from typing import Any

from vlm.data.sample import Sample
from vlm.data.templates.base import TEMPLATES, Segment, Template, build_template
from vlm.data.templates.jinja import TokenizerTemplate


@TEMPLATES.register("auto")
class AutoTemplate(Template):
    """Render with ``tokenizer.chat_template`` (the ``tokenizer`` template) when the tokenizer has one, otherwise
    with ``fallback`` (a built-in name or config, default ``chatml``).

    Args:
        fallback: template used for tokenizers without a chat template.
        tokenizer_options: extra arguments of the ``tokenizer`` template (``method``, ``content_format``, ...).
        image_start / image_end: image markers, applied to whichever template is used.
    """

    name = "auto"

    def __init__(self, fallback: str | dict = "chatml", tokenizer_options: dict | None = None,
                 image_start: str | None = None, image_end: str | None = None) -> None:
        super().__init__(image_start, image_end)
        markers = {"image_start": image_start, "image_end": image_end}
        self.own = TokenizerTemplate(**{**(tokenizer_options or {}), **markers})
        spec = {"name": fallback} if isinstance(fallback, str) else dict(fallback)
        if spec.get("name") == "auto":
            raise ValueError("template 'auto' cannot fall back to itself")
        self.fallback = build_template({**spec, **markers})

    def for_image_token(self, image_token: str) -> AutoTemplate:
        out = copy.copy(self)
        out.own, out.fallback = self.own.for_image_token(image_token), self.fallback.for_image_token(image_token)
        return out

    def for_video_token(self, video_token: str | None) -> AutoTemplate:
        out = copy.copy(self)
        out.own, out.fallback = self.own.for_video_token(video_token), self.fallback.for_video_token(video_token)
        return out

    def pick(self, tokenizer: Any) -> Template:
        """The template actually used with ``tokenizer``."""
        return self.own if getattr(tokenizer, "chat_template", None) else self.fallback

    def render(self, sample: Sample, tokenizer: Any = None, add_generation_prompt: bool = False) -> list[Segment]:
        return self.pick(tokenizer).render(sample, tokenizer, add_generation_prompt)

    def end_of_turn(self, tokenizer: Any = None) -> str | None:
        return self.pick(tokenizer).end_of_turn(tokenizer)

    def special_tokens(self, tokenizer: Any = None) -> list[str]:
        return self.pick(tokenizer).special_tokens(tokenizer)

    def places_images(self, tokenizer: Any = None) -> bool:
        return self.pick(tokenizer).places_images(tokenizer)

    def as_jinja(self, tokenizer: Any = None, image_token: str = "<image>", image_placement: Any = None,
                 video_token: str | None = None) -> str | None:
        extra = {"video_token": video_token} if video_token else {}
        return self.pick(tokenizer).as_jinja(tokenizer, image_token, image_placement=image_placement, **extra)
