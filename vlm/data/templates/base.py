"""Template base: a conversation -> a flat list of segments (text with a *trainable* flag, image and video slots).

The processor tokenizes each text segment, expands each image slot to ``[image_start] + image tokens +
[image_end]`` (a video slot: ``[image_start] + video tokens + [image_end]``, the same markers, as Qwen2-VL's
``<|vision_start|>`` / ``<|vision_end|>`` wrap both), and sets labels = ids on trainable text, -100 everywhere else. Templates mark as trainable exactly the
assistant content plus the end-of-turn token that closes it; role headers, system/user text, separators after the
end-of-turn token, image markers and image tokens are never trained.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlm.data.sample import ImageRef, Message, Sample, VideoRef
from vlm.registry import Registry

TEMPLATES: Registry = Registry("template")


@dataclass(frozen=True)
class Text:
    """A piece of text; ``trainable`` pieces get labels (assistant content and its end-of-turn token)."""

    text: str
    trainable: bool = False


@dataclass(frozen=True)
class ImageSlot:
    """Where image ``index`` (into ``sample.images``) goes; the processor wraps it in the template's markers."""

    index: int


@dataclass(frozen=True)
class VideoSlot:
    """Where video ``index`` (into ``sample.videos``) goes; the processor writes its video tokens between the
    template's image markers."""

    index: int


Segment = Text | ImageSlot | VideoSlot


def merge(segments: list[Segment]) -> list[Segment]:
    """Join adjacent ``Text`` with the same flag and drop empty text (fewer pieces to tokenize)."""
    out: list[Segment] = []
    for s in segments:
        if isinstance(s, Text):
            if not s.text:
                continue
            if out and isinstance(out[-1], Text) and out[-1].trainable == s.trainable:
                out[-1] = Text(out[-1].text + s.text, s.trainable)
                continue
        out.append(s)
    return out


def content(message: Message, trainable: bool, keep_text: bool = True) -> list[Segment]:
    """A message's parts as segments: text carries ``trainable``; images and videos become slots (never trained)."""
    return [ImageSlot(p.index) if isinstance(p, ImageRef) else VideoSlot(p.index) if isinstance(p, VideoRef)
            else Text(p, trainable) for p in message.parts if keep_text or isinstance(p, (ImageRef, VideoRef))]


class Template:
    """Base class. Subclasses implement :meth:`render`.

    Attributes:
        image_start / image_end: marker strings around each image's tokens (e.g. ``<img>``/``</img>`` for
            InternVL/Qwen-VL), or ``None``.
    """

    name = "base"

    def __init__(self, image_start: str | None = None, image_end: str | None = None) -> None:
        self.image_start, self.image_end = image_start, image_end

    def render(self, sample: Sample, tokenizer: Any = None, add_generation_prompt: bool = False) -> list[Segment]:
        """``sample`` -> segments. With ``add_generation_prompt`` the output ends with the assistant turn start
        (the caller removes a trailing assistant message first)."""
        raise NotImplementedError

    def end_of_turn(self, tokenizer: Any = None) -> str | None:
        """The token trained at the end of each assistant reply (also a natural generation stop)."""
        return None

    def special_tokens(self, tokenizer: Any = None) -> list[str]:
        """Strings this template emits that must each be a single token of the tokenizer."""
        return [t for t in (self.image_start, self.image_end) if t]

    def as_jinja(self, tokenizer: Any = None, image_token: str = "<image>",
                 image_placement: Any = None, video_token: str | None = None) -> str | None:
        """This template as a Jinja chat template (what ``tokenizer.chat_template`` and transformers' processors
        render): the text of :meth:`render` with each image slot written ``image_start + image_token + image_end``.
        Messages' ``content`` may be a string or a list of ``{"type": "text" | "image"}`` parts; list parts are
        joined with ``image_placement`` (``vlm.data.image_placement.ImagePlacement``: each image's label and
        separator, as ``model.chat`` joins them; ``None``: nothing added). ``video_token``: a ``{"type": "video"}``
        part is written ``image_start + video_token + image_end`` (``None``: the model takes no videos; templates
        whose Jinja has no video parts ignore it). ``None`` when the template has no Jinja equivalent."""
        return None

    def for_image_token(self, image_token: str) -> Template:
        """This template for a processor whose image placeholder token is ``image_token`` (the ``tokenizer``
        template looks for it in what its Jinja template writes per image); others return themselves."""
        return self

    def for_video_token(self, video_token: str | None) -> Template:
        """This template for a processor whose video placeholder token is ``video_token`` (the ``tokenizer``
        template looks for it in what its Jinja template writes per video); others return themselves."""
        return self

    def places_images(self, tokenizer: Any = None) -> bool:
        """Whether this template moves a message's images itself (and writes their separators), so that chat must
        not join them with the model's image placement (``vlm.data.image_placement``) first. Default ``False``:
        images go where the message puts them."""
        return False

    def image_text(self, image_token: str) -> str:
        """What one image slot is in rendered text: ``image_start + image_token + image_end``."""
        return f"{self.image_start or ''}{image_token}{self.image_end or ''}"

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def build_template(spec: str | dict | Template) -> Template:
    """A template from a name (``"chatml"``), a config ``{"name": "chatml", "image_start": "<img>", ...}``, or an
    instance (returned as is)."""
    if isinstance(spec, Template):
        return spec
    if isinstance(spec, str):
        spec = {"name": spec}
    return TEMPLATES.build(spec)
