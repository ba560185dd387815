"""Processor: a ``Sample`` -> model-ready tensors (template, tokenization, image tensors, placeholder expansion, labels).

Each image (all its tiles, thumbnail/base image included, contiguous) becomes the text
``image_start + image_token * sum(num_image_tokens((H, W)) over its tiles) + image_end`` (an image layout that
writes text between its views, Idefics3's ``<row_1_col_1>``, gives the middle: ``Layout.image_text``); images appear in
``pixel_values`` in the order their tokens appear. Each video (``video_processor``: decoded, sampled, resized frames
``(T, 3, H, W)``) becomes ``image_start + video_token * (t * num_image_tokens((H, W))) + image_end`` with ``t`` its
temporal patches, and its flat patches go to ``pixel_values_videos`` / ``video_grid_thw`` / ``second_per_grid_ts``. Labels are the ids on trainable template text (assistant content +
end-of-turn) and -100 everywhere else (role headers, user/system text, markers, image tokens, padding).

Tokenization: the rendered prompt (text segments joined, each image slot written out as its markers and
``image_token`` once per feature, as ``LlavaProcessor`` expands ``<image>``) is tokenized **once**
(``add_special_tokens=False``), so the ids equal what a serving engine gets for the same prompt. Character offsets
then give the labels: a token is trained when any of its characters lies in trainable text (the rule of
transformers' ``return_assistant_tokens_mask``) and none in an image block. Tokenizers without offsets (not ``is_fast``) fall back to tokenizing
piece by piece, with a warning. See docs/data.md, "Tokenization".

``Processor`` is its mixins plus the tokenization and labels: the images and videos loaded and their pixel tensors
(``vlm.data.media_inputs``), the placeholder text of each image and video and the count rule ``TokenCount``
(``vlm.data.placeholders``); here the setup (``for_model``), the prompt tokenized once, labels and truncation.
"""
from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

from vlm.data.errors import DataError
from vlm.data.media_inputs import MediaInputs, no_video_input
from vlm.data.placeholders import Piece, Placeholders, TokenCount
from vlm.data.readers.base import SampleDropped, SampleError, locate
from vlm.data.sample import Sample
from vlm.data.templates import ImageSlot, Template, VideoSlot, build_template
from vlm.labels import IGNORE_INDEX

# importable from here as before the split
__all__ = ["IGNORE_INDEX", "Piece", "Processor", "SampleDropped", "TokenCount"]


class Processor(Placeholders, MediaInputs):
    """Turn a ``Sample`` into ``{"input_ids", "labels", "pixel_values", "meta"}``.

    Args:
        tokenizer: a ``transformers`` tokenizer holding ``image_token`` (and the template's special tokens) as
            single tokens.
        template: a name, config dict or :class:`~vlm.data.templates.Template`.
        image_processor: ``pil -> (tiles (n, 3, S, S), info)``, normally ``vlm.data.images.ImageProcessor``.
        num_image_tokens: ``(H, W) -> int`` tokens per tile (``model.num_image_tokens``) or a constant ``int``.
        image_token: the placeholder token repeated for every image feature.
        max_length: cap on ``len(input_ids)``. Text past it is cut; if the cut would fall inside or before an image's
            tokens, the sample is dropped (``truncation="drop"``: raises :class:`SampleDropped`, which datasets skip
            and count) or ``truncation="error"`` raises a ``SampleError``.
        image_root: root for relative image paths still left in samples (readers usually resolve them already).
        allow_urls: let ``load_image`` fetch ``http(s)`` images (a dataset may override per call).
        max_tiles_per_sample: tile budget over all images of a sample (tiling only): each image gets the largest
            common ``max_tiles`` for which the total, thumbnails included, fits.
        image_loader: ``load_image``-compatible callable (default ``vlm.data.images.load_image``).
        require_labels: training samples (no generation prompt) without any trainable token raise ``no_labels``.
        rewrite_boxes: rewrite grounding boxes in the text to follow each image's resize/pad/crop/tiling (see
            :func:`vlm.data.boxes.rewrite_segment_boxes`).
        check_boxes: validate the boxes in the text of samples with images: a malformed box, a Qwen-VL box outside
            ``[0, 1000)`` or an absolute JSON box outside its image raises a ``SampleError`` (reason ``box``) naming
            the sample, the image file and the problem.
        video_processor: ``(video, sample_id=..., allow_urls=...) -> (frames (T, 3, H, W), VideoInfo)``
            (``vlm.data.video.VideoProcessor``, its ``options`` holding the patch geometry); ``None``: samples with
            videos raise a ``SampleError`` (reason ``config``).
        video_token: the placeholder token repeated for every video feature (needed only with a
            ``video_processor``).
        multi_image_processor: the image processor for the images of a sample with several, when the model's
            arrangement lays them out otherwise (``Arrangement.multi_image_layout``: OneVision's one padded view
            each); ``None``: every image through ``image_processor``.
    """

    def __init__(self, tokenizer: Any, template: str | dict | Template = "chatml", image_processor: Any = None,
                 num_image_tokens: Callable[[tuple[int, int]], int] | int | None = None, image_token: str = "<image>",
                 max_length: int | None = None, truncation: str = "drop", *, image_root: str | None = None,
                 allow_urls: bool = False, max_tiles_per_sample: int | None = None,
                 image_loader: Callable[..., Any] | None = None, require_labels: bool = True,
                 rewrite_boxes: bool = True, check_boxes: bool = True, video_processor: Any = None,
                 video_token: str = "<video>", multi_image_processor: Any = None) -> None:
        if max_tiles_per_sample is not None and int(max_tiles_per_sample) < 1:
            raise ValueError(f"max_tiles_per_sample={max_tiles_per_sample!r}: a tile budget must be at least 1 tile "
                             f"per sample (null: no budget)")
        if truncation not in ("drop", "error"):
            raise ValueError(f"truncation must be 'drop' or 'error'; got {truncation!r}")
        self.tokenizer = tokenizer
        self.template = build_template(template).for_image_token(image_token)
        self.image_processor, self.multi_image_processor = image_processor, multi_image_processor
        self.num_image_tokens = TokenCount(num_image_tokens) if isinstance(num_image_tokens, int) \
            else num_image_tokens
        self.image_token, self.max_length, self.truncation = image_token, max_length, truncation
        self.image_root, self.allow_urls, self.max_tiles_per_sample = image_root, allow_urls, max_tiles_per_sample
        self.require_labels, self.rewrite_boxes, self.check_boxes = require_labels, rewrite_boxes, check_boxes
        if image_loader is None:
            from vlm.data.images import load_image as image_loader
        self.image_loader = image_loader
        self.image_token_id = self._single_id(image_token, "image_token")
        self.video_processor, self.video_token = video_processor, video_token
        if video_processor is not None:
            self.template = self.template.for_video_token(video_token)
        self.video_token_id = self._single_id(video_token, "video_token") if video_processor is not None else None
        for tok in self.template.special_tokens(tokenizer):
            self._single_id(tok, f"template {self.template.name!r} token")
        # character offsets let the whole prompt be tokenized in one call (fast tokenizers have them)
        # (or ``encode_with_offsets(text) -> (ids, offsets)``: vlm's SentencePiece tokenizer, read without remote code)
        self._offsets = bool(getattr(tokenizer, "is_fast", False)) or hasattr(tokenizer, "encode_with_offsets")
        if not self._offsets:
            warnings.warn(f"{type(tokenizer).__name__} gives no character offsets (not a fast tokenizer): prompts are "
                          f"tokenized piece by piece, so ids can differ from tokenizing the whole prompt at once "
                          f"(what serving does); use a fast tokenizer", stacklevel=2)
        self.dropped: Counter[str] = Counter()
        self._ip_takes_max_tiles = image_processor is not None and _accepts(image_processor, "max_tiles")

    # ------------------------------------------------------------------------------------------------ setup
    def _encode(self, text: str | None) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _single_id(self, token: str, what: str) -> int:
        ids = self._encode(token)
        if len(ids) != 1 or ids[0] == getattr(self.tokenizer, "unk_token_id", None):
            raise ValueError(f"{what} {token!r} is not a single token of the tokenizer (it encodes to {ids}); add it "
                             f"with tokenizer.add_special_tokens(...) and resize the model's embeddings")
        return ids[0]

    @classmethod
    def for_model(cls, model: Any, tokenizer: Any, template: str | dict | Template = "chatml", *,
                  resize_mode: str | None = None, tiling: dict | None = None, pad_color: Any = None,
                  **options: Any) -> Processor:
        """A processor matching ``model`` (duck-typed: ``num_image_tokens((H, W))``, ``image_size``,
        ``image_mean``, ``image_std``, ``config.image_token`` / ``config.image_token_id``).

        ``resize_mode``/``tiling``/``pad_color`` configure the ``ImageProcessor``; they default to the model's
        record of how it was trained (``model.image_preprocessing``; else ``resize``, no tiling and the
        ``ImageProcessor`` default). A model that takes videos (``video_geometry()``) gets a ``VideoProcessor``:
        ``video={...}`` (``vlm.data.video.PER_VIDEO`` options) over the record's ``image_preprocessing["video"]``
        over ``vlm.data.video.DEFAULTS``, the encoder's mean/std and patch geometry. Other ``options`` go to :class:`Processor` (``max_length``,
        ``truncation``, ``max_tiles_per_sample``, ...).
        """
        from vlm.data.images import ImageProcessor

        record = getattr(model, "image_preprocessing", None) or {}
        resize_mode = resize_mode or record.get("resize_mode", "resize")
        pad_color = pad_color if pad_color is not None else record.get("pad_color")
        tiling = tiling if tiling is not None else record.get("tiling")
        arrangement = getattr(model, "arrangement", None)
        if tiling is None and arrangement is not None:  # the layout whose views the model's arrangement takes
            tiling = arrangement.layout()
        image_options = {"resize_mode": resize_mode, "tiling": tiling}
        if pad_color is not None:
            image_options["pad_color"] = pad_color
        image_processor = ImageProcessor.from_model(model, **image_options)
        config = getattr(model, "config", None)
        image_token = getattr(config, "image_token", None) or options.pop("image_token", "<image>")
        size = (image_processor.image_size, image_processor.image_size)
        # a picklable count (``vlm.image_tokens.ImageTokens``) when the model offers one: DataLoader workers then
        # count sizes the main process never asked (native-resolution images)
        rule = model.image_tokens() if hasattr(model, "image_tokens") else model.num_image_tokens
        count = TokenCount(rule, {size: int(model.num_image_tokens(size))})
        video_options = options.pop("video", None)
        geometry = model.video_geometry() if hasattr(model, "video_geometry") else None
        if geometry is not None:  # the model takes videos: frames sampled and sized as recorded (or given)
            from vlm.data.video import VideoProcessor

            # given options override the run's record key by key
            video_options = {**(record.get("video") or {}), **(video_options or {})}
            options["video_processor"] = VideoProcessor(model.image_mean, model.image_std,
                                                        root=options.get("image_root"),
                                                        allow_urls=options.get("allow_urls", False),
                                                        **{**video_options, **geometry})
            options["video_token"] = getattr(config, "video_token", None) or "<video>"
        elif video_options:
            raise ValueError(f"video options {video_options} were given but {no_video_input(model)}")
        multi = arrangement.multi_image_layout() if arrangement is not None else None
        if multi is not None:  # the images of a multi-image sample, as the arrangement lays them out
            options.setdefault("multi_image_processor", ImageProcessor.from_model(model, **multi))
        proc = cls(tokenizer, template, image_processor, count, image_token=image_token, **options)
        if geometry is None:
            proc.no_video_input = no_video_input(model)
        model_id = getattr(config, "image_token_id", getattr(model, "image_token_id", None))
        if model_id is not None and model_id != proc.image_token_id:
            raise ValueError(f"the model's image_token_id is {model_id} but the tokenizer maps {image_token!r} to "
                             f"{proc.image_token_id}; use the tokenizer the model was built with")
        video_id = getattr(config, "video_token_id", None)
        if video_id is not None and proc.video_token_id is not None and video_id != proc.video_token_id:
            raise ValueError(f"the model's video_token_id is {video_id} but the tokenizer maps {proc.video_token!r} "
                             f"to {proc.video_token_id}; use the tokenizer the model was built with")
        return proc

    # ------------------------------------------------------------------------------------------- tokenize
    def _tokenize(self, text: str, pieces: list[Piece]) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """``(ids, starts, ends)``: the ids of ``text`` and each token's character range ``[start, end)`` (L,).

        One call on the whole text when the tokenizer gives offsets; otherwise piece by piece, each token spanning
        its whole piece."""
        if self._offsets and hasattr(self.tokenizer, "encode_with_offsets"):
            ids, offsets = self.tokenizer.encode_with_offsets(text)
        elif self._offsets:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        else:
            ids, offsets = [], []
            for p in pieces:
                piece = self._encode(text[p.start:p.end])
                ids += piece
                offsets += [(p.start, p.end)] * len(piece)
        starts = torch.tensor([o[0] for o in offsets], dtype=torch.long)
        ends = torch.tensor([o[1] for o in offsets], dtype=torch.long)
        return ids, starts, ends

    # ----------------------------------------------------------------------------------------------- call
    def __call__(self, sample: Sample, add_generation_prompt: bool = False, *,
                 allow_urls: bool | None = None) -> dict[str, Any]:
        """Process one sample.

        Returns ``input_ids`` (L,) long, ``labels`` (L,) long (-100 = ignored; all -100 with
        ``add_generation_prompt``), ``pixel_values`` (n_tiles_total, 3, S, S) float or ``None`` (native
        resolution: flat patches ``(P, D)`` and ``image_grid_thw (N, 3)``, see ``_pixels``), and ``meta``
        (``id``, ``num_tokens``, ``num_images``, ``tiles`` per image, ``image_sizes`` (w, h), ``image_info``,
        ``truncated``; ``target`` = the dropped final assistant text under ``add_generation_prompt``).
        Raises ``SampleError`` (a ``DataError``) naming the sample for any bad input.
        """
        where = {"index": sample.meta.get("index"), "sample_id": sample.id, "source": sample.meta.get("source")}
        try:
            return self._process(sample, add_generation_prompt, self.allow_urls if allow_urls is None else allow_urls)
        except SampleDropped as e:
            self.dropped[e.reason] += 1
            raise locate(e, **where) from None
        except DataError as e:
            raise locate(e, **where) from None

    def _process(self, sample: Sample, add_generation_prompt: bool, allow_urls: bool) -> dict[str, Any]:
        sample.validate()
        meta: dict[str, Any] = {"id": sample.id, "index": sample.meta.get("index")}
        if add_generation_prompt and sample.messages[-1].role == "assistant":
            meta["target"] = sample.messages[-1].text()
            sample = dataclasses.replace(sample, messages=sample.messages[:-1])
        segments = self.template.render(sample, self.tokenizer, add_generation_prompt)
        order = [s.index for s in segments if isinstance(s, ImageSlot)]
        if sorted(order) != list(range(len(sample.images))):
            raise SampleError(f"template rendered images {order} for {len(sample.images)} image(s)",
                              reason="image_count", sample_id=sample.id)
        video_order = [s.index for s in segments if isinstance(s, VideoSlot)]
        if sorted(video_order) != list(range(len(sample.videos))):
            raise SampleError(f"template rendered videos {video_order} for {len(sample.videos)} video(s)",
                              reason="video_count", sample_id=sample.id)
        tiles, infos = self._images(sample, order, allow_urls)
        videos, video_infos = self._videos(sample, video_order, allow_urls)
        if (self.rewrite_boxes or self.check_boxes) and infos:
            files = {i: src if isinstance(src, str) and not src.startswith("data:") else None
                     for i, src in enumerate(sample.images)}
            from vlm.data.boxes import rewrite_segment_boxes

            segments = rewrite_segment_boxes(segments, dict(zip(order, infos)), rewrite=self.rewrite_boxes,
                                             check=self.check_boxes, files=files)
        text, pieces = self._layout(segments, tiles, add_generation_prompt, videos, infos, sample.id)
        ids, starts, ends = self._tokenize(text, pieces)
        input_ids = torch.tensor(ids, dtype=torch.long)
        blocks = [p for p in pieces if p.image_tokens is not None]
        n_video = sum(p.image_tokens for p, seg in zip(pieces, segments) if isinstance(seg, VideoSlot))
        n_media = sum(p.image_tokens for p in blocks)
        for token, token_id, kind, n_expected in ((self.image_token, self.image_token_id, "image", n_media - n_video),
                                                  (self.video_token, self.video_token_id, "video", n_video)):
            n_found = int((input_ids == token_id).sum()) if token_id is not None else 0
            if n_found != n_expected:
                raise SampleError(f"the text contains the {kind} token {token!r} itself ({n_found - n_expected} "
                                  f"extra); it would be fed {kind} features", reason=f"{kind}_token_in_text",
                                  sample_id=sample.id)
        # image blocks are never trained, even when a special token that strips whitespace (``rstrip=True``) took in
        # a trained character next to it
        trained = _overlaps(starts, ends, [p for p in pieces if p.trainable]) & ~_overlaps(starts, ends, blocks)
        labels = torch.where(trained, input_ids, IGNORE_INDEX)
        # position just after the last image block: truncation must not cut before it
        last = _overlaps(starts, ends, blocks[-1:]).nonzero()
        image_end = int(last[-1]) + 1 if len(last) else 0
        truncated = False
        if self.max_length is not None and len(ids) > self.max_length:
            cls = SampleDropped if self.truncation == "drop" else SampleError
            if add_generation_prompt:
                raise cls(f"the generation prompt has {len(ids)} tokens, more than max_length={self.max_length}; a "
                          f"generation prompt is never cut (the model would continue the cut text instead of "
                          f"answering)", reason="too_long", sample_id=sample.id)
            if image_end > self.max_length:
                raise cls(f"{len(ids)} tokens exceed max_length={self.max_length} and truncating would cut an image "
                          f"(image tokens end at {image_end})", reason="too_long", sample_id=sample.id)
            input_ids, labels, truncated = input_ids[:self.max_length], labels[:self.max_length], True
        if self.require_labels and not add_generation_prompt and not bool((labels != IGNORE_INDEX).any()):
            cls = SampleDropped if truncated and self.truncation == "drop" else SampleError
            raise cls("no trainable (assistant) tokens" + (" left after truncation" if truncated else ""),
                      reason="no_labels", sample_id=sample.id)
        meta.update(num_tokens=int(input_ids.numel()), num_images=len(order), tiles=[t.shape[0] for t in tiles],
                    image_sizes=[tuple(i.original_size) if hasattr(i, "original_size") else None for i in infos],
                    image_info=infos, truncated=truncated)
        if videos:
            meta.update(num_videos=len(videos), video_info=video_infos)
        return {"input_ids": input_ids, "labels": labels, **self._pixels(tiles, infos),
                **self._video_pixels(videos, video_infos, sample.id),
                "meta": meta}


def _overlaps(starts: torch.Tensor, ends: torch.Tensor, pieces: list[Piece]) -> torch.Tensor:
    """(L,) bool: which tokens (character ranges ``[starts, ends)``, (L,)) share a character with any piece.

    The rule of transformers' ``return_assistant_tokens_mask``: ``start < piece.end and end > piece.start``, so a
    token straddling a piece boundary counts as inside (an empty-range token only strictly inside)."""
    mask = torch.zeros(starts.shape, dtype=torch.bool)
    for p in pieces:
        mask |= (starts < p.end) & (ends > p.start)
    return mask


def _accepts(fn: Any, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
