"""Chat with a ``VLM``: a turn's images and text + a history of messages -> a reply and the new history.

The history is a plain list of OpenAI/transformers-style messages, which can be stored, edited and fed back::

    [{"role": "user", "content": [{"type": "image", "image": "cat.png"}, {"type": "text", "text": "What is it?"}]},
     {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}]

An image entry holds a path, a ``PIL.Image`` or an array. A video is a ``{"type": "video", "video": path or list of
frames}`` entry (or a ``vlm.data.sample.Video``) among a turn's images (models whose encoder takes videos:
``VLM.video_geometry``). Prompts are built by the training ``Processor`` (same
template, tokenization, image preprocessing and box rewriting as training and evaluation) with
``add_generation_prompt=True``, so a model answers in chat exactly as it was evaluated. A message's image and text
parts are joined as the model's training data joined them (``model.image_placement``, ``vlm.data.image_placement``: e.g.
each image followed by ``"\n"``, before the text), as the model's exported chat template joins them too.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image

from vlm.inference.generate import Reply, check_context, generate_replies, stream_reply

Message = dict[str, Any]
Images = Any  # None | one source | a list of sources (path, PIL image, (H, W, 3) uint8 array)


def processor_for(model: Any, template: Any = None, **options: Any) -> Any:
    """The ``Processor`` chat uses for ``model``: ``template`` (default ``auto``: the directory's own chat template,
    which ``VLM.set_template`` wrote as the Jinja equivalent of the trained template; ``chatml`` when it has none),
    the model's recorded image preprocessing, prompts longer than ``max_length`` refused with an error."""
    from vlm.data.processor import Processor

    if model.tokenizer is None:
        raise ValueError("chat needs model.tokenizer (load the model from a directory that holds tokenizer files)")
    options.setdefault("truncation", "error")
    return Processor.for_model(model, model.tokenizer, template=template or "auto", **options)


#: what a turn's ``images`` entries may be (the end of the message for anything else)
ACCEPTED_IMAGES = ("expected an image file path (str or os.PathLike), an http(s):// URL (allow_urls) or data: URI, a "
                   "PIL.Image.Image, a numpy array (H, W) or (H, W, C), raw bytes, a {'bytes': ..., 'path': ...} dict, "
                   "or a video ({'type': 'video', 'video': path or frame list} or vlm.data.sample.Video); several: a "
                   "list of these")


def _image_part(src: Any) -> dict[str, Any]:
    """One entry of a turn's ``images``: an image source, or a video (a ``{"type": "video", "video": path or frame
    list, ...options}`` part as the ``messages`` reader takes it, or a ``vlm.data.sample.Video``)."""
    from vlm.data.sample import Video

    if isinstance(src, Video):
        return {"type": "video", "video": src.source, **src.options}
    if isinstance(src, dict) and src.get("type") == "video":
        return dict(src)
    if isinstance(src, np.ndarray):
        if src.ndim not in (2, 3):
            raise ValueError(f"an image array must be (H, W) or (H, W, C); got shape {src.shape}")
        src = Image.fromarray(src if src.dtype == np.uint8 else np.clip(src, 0, 255).astype(np.uint8))
    elif isinstance(src, os.PathLike):
        src = os.fspath(src)
    elif not isinstance(src, (str, bytes, bytearray, dict, Image.Image)):
        # ValueError, as chat's other bad-input errors (a SampleError is one)
        raise ValueError(f"bad image source {src!r} (a {type(src).__name__}); {ACCEPTED_IMAGES}")  # noqa: TRY004
    return {"type": "image", "image": src}


def user_turn(images: Images, text: str, placement: Any = None) -> Message:
    """A user message: the images (in order), then the text (or the text first, for a ``placement`` whose images come
    after it). Raises ``ValueError`` for an empty prompt."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty prompt: give the question as text (an image alone is not a question)")
    srcs = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
    parts, question = [_image_part(s) for s in srcs], [{"type": "text", "text": text}]
    return {"role": "user", "content": placement.order(parts, question) if placement is not None else parts + question}


def image_placement(model: Any, processor: Any = None) -> Any:
    """The model's ``vlm.data.image_placement.ImagePlacement``; ``None`` when its chat template places images (an
    imported transformers directory: ``model.image_placement = None``). Whether a turn's parts are then joined with
    it is the processor's template's call (``prompt_item``; ``processor`` is accepted for callers that pass it)."""
    from vlm.data.image_placement import ImagePlacement

    return ImagePlacement.from_dict(getattr(model, "image_placement", None))


def _is_image(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") in ("image", "image_url")


def arrange(messages: Sequence[Message], placement: Any) -> list[Message]:
    """``messages`` with each list content's images given the ``placement``'s labels and separators (string contents,
    which write their images as ``<image>`` themselves, are kept)."""
    if placement is None:
        return list(messages)
    return [{**m, "content": placement.arrange(m["content"], _is_image)} if isinstance(m.get("content"), list) else m
            for m in messages]


def assistant_turn(text: str) -> Message:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def to_sample(messages: Sequence[Message], sample_id: Any = "chat", placement: Any = None) -> Any:
    """Messages -> a validated ``Sample`` (the ``messages`` reader: image files are checked to exist), their images
    and text joined with ``placement`` (see :func:`arrange`)."""
    from vlm.data.readers.messages import MessagesReader

    return MessagesReader(check_files=True).convert({"messages": arrange(messages, placement), "id": sample_id})


def prompt_item(processor: Any, history: Sequence[Message] | None, images: Images, text: str,
                sample_id: Any = "chat", placement: Any = None) -> tuple[dict[str, Any], list[Message]]:
    """``(processed generation prompt, history + the new user turn)``; ``placement``: the model's
    :func:`image_placement` (``None``: parts joined as they are): it orders the new turn's images and text, and
    joins every turn's parts unless the processor's template writes what surrounds an image itself
    (``Template.places_images``: a chat template rendered with list content). Raises ``ValueError`` (a
    ``DataError`` names the image file for an image that cannot be opened) on bad input."""
    messages = [*(history or []), user_turn(images, text, placement)]
    template = getattr(processor, "template", None)
    joined = None if template is not None and template.places_images(processor.tokenizer) else placement
    return processor(to_sample(messages, sample_id, joined), add_generation_prompt=True), messages


def chat(model: Any, images: Images, text: str, history: Sequence[Message] | None = None, *, template: Any = None,
         stop: Sequence[str] = (), processor: Any = None, **generate_kwargs: Any) -> tuple[str, list[Message]]:
    """``(reply, history)``: answer ``text`` about ``images`` (``None`` for a text-only turn) after ``history``.

    ``generate_kwargs``: see :func:`vlm.inference.generate.generate_replies` (greedy by default; ``max_new_tokens``,
    ``temperature``, ``top_p``, ``top_k``, ``repetition_penalty``, ...). The returned history is a new list (the
    given one is not modified) ending with this turn and the reply."""
    return chat_batch(model, [images], [text], [history], template=template, stop=stop, processor=processor,
                      **generate_kwargs)[0]


def chat_batch(model: Any, images: Sequence[Images], texts: Sequence[str],
               histories: Sequence[Sequence[Message] | None] | None = None, *, template: Any = None,
               stop: Sequence[str] = (), processor: Any = None, **generate_kwargs: Any
               ) -> list[tuple[str, list[Message]]]:
    """:func:`chat` for many conversations at once (one left-padded generate call); each row stops on its own."""
    histories = list(histories) if histories is not None else [None] * len(texts)
    if not len(images) == len(texts) == len(histories):
        raise ValueError(f"chat_batch: {len(images)} image entries, {len(texts)} texts and {len(histories)} histories; "
                         f"expected one of each per conversation")
    processor = processor or processor_for(model, template)
    placement = image_placement(model, processor)
    prompts = [prompt_item(processor, h, im, t, sample_id=i, placement=placement)
               for i, (im, t, h) in enumerate(zip(images, texts, histories))]
    replies: list[Reply] = generate_replies(model, [p for p, _ in prompts], processor.tokenizer, stop=stop,
                                            **generate_kwargs)
    return [(r.text, [*msgs, assistant_turn(r.text)]) for r, (_, msgs) in zip(replies, prompts)]


class ChatStream:
    """Iterate to get the reply's text pieces as they are generated; afterwards ``reply`` and ``history`` hold the
    whole reply and the updated history (as :func:`chat` returns them). ``messages``: the conversation the reply
    answers (the history + the new user turn, as the model reads it), known before the first piece."""

    def __init__(self, pieces: Iterator[str], messages: list[Message]) -> None:
        self._pieces, self.messages = pieces, messages
        self.reply: str | None = None
        self.history: list[Message] | None = None

    def __iter__(self) -> Iterator[str]:
        parts = []
        for piece in self._pieces:
            parts.append(piece)
            yield piece
        self.reply = "".join(parts)
        self.history = [*self.messages, assistant_turn(self.reply)]


def chat_stream(model: Any, images: Images, text: str, history: Sequence[Message] | None = None, *,
                template: Any = None, stop: Sequence[str] = (), processor: Any = None,
                **generate_kwargs: Any) -> ChatStream:
    """:func:`chat`, streamed. Bad input (empty prompt, unopenable image, too long) raises here, before iterating."""
    processor = processor or processor_for(model, template)
    item, messages = prompt_item(processor, history, images, text, placement=image_placement(model, processor))
    check_context(model, [item], int(generate_kwargs.get("max_new_tokens", 128)))
    return ChatStream(stream_reply(model, item, processor.tokenizer, stop=stop, **generate_kwargs), messages)
