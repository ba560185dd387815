"""``VLM``: vision encoder -> connector -> feature injection into a causal LM.

``vlm.build(cfg, tokenizer=None)`` (``vlm.compose``) composes one from component configs;
``model.save_pretrained(dir)`` (``vlm.persistence``) / ``vlm.load(dir)`` (``vlm.loading``) round-trip it through
``config.json`` + ``model.safetensors`` (+ tokenizer files). Nothing pickled.

``VLM`` is its mixins plus the model around them: the image path (``vlm.media_features``), where media tokens sit
for the position scheme (``vlm.media_positions``), the input checks (``vlm.input_checks``); here the parts, what the
processor asks, ``embed_inputs`` / ``forward`` / ``hidden_states`` / ``generate``, saving and chat.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from vlm.connectors.base import Connector
from vlm.data.image_placement import DEFAULT as DEFAULT_IMAGE_LAYOUT, ImagePlacement
from vlm.dtypes import param_dtype
from vlm.encoders.base import VisionEncoder, as_pair
from vlm.generation import generation_settings
from vlm.image_tokens import ImageTokens
from vlm.input_checks import MOVED_KEYWORDS, InputChecks
from vlm.llm.hf_causal_lm import HFCausalLM
from vlm.llm.masks import segment_mask
from vlm.llm.positions import POSITION_SCHEMES
from vlm.injection import INJECTION_SITES
from vlm.loss import mask_segment_starts
from vlm.media_features import MediaFeatures, eval_mode
from vlm.media_positions import MediaPositions, interleave
from vlm.persistence import DEFAULT_IMAGE_PREPROCESSING, VLMConfig, placement_record, save_directory

# importable from here as before the split
__all__ = ["MOVED_KEYWORDS", "VLM", "eval_mode", "interleave", "param_dtype"]


class VLM(MediaFeatures, MediaPositions, InputChecks, nn.Module):
    """A vision-language model made of swappable parts.

    ``forward`` takes ``input_ids`` whose image placeholders are already expanded: each image contributes exactly
    ``num_image_tokens((H, W))`` ids equal to ``config.image_token_id``, images in batch order. A video (native
    resolution encoders only, ``video_geometry``) contributes ``t * num_image_tokens((H, W))`` ids equal to
    ``video_token_id`` (``t`` temporal patches of frames ``H x W``).
    """

    def __init__(self, encoder: VisionEncoder, connector: Connector, llm: HFCausalLM, image_token_id: int,
                 image_token: str = "<image>", video_token_id: int | None = None,
                 video_token: str = "<video>", arrangement: nn.Module | None = None) -> None:
        super().__init__()
        for name, value in (("image_token_id", image_token_id), ("video_token_id", video_token_id)):
            if value is not None and not 0 <= value < llm.vocab_size:
                raise ValueError(f"{name} {value} is outside the LLM's embedding table "
                                 f"(vocab size {llm.vocab_size}); add the token and resize the embeddings first")
        self.encoder, self.connector, self.llm = encoder, connector, llm
        # capabilities the parts state: where features enter the LLM, how the LLM numbers its positions
        self.injection = INJECTION_SITES.get(connector.injection_site)()
        self.positions = POSITION_SCHEMES.get(llm.position_scheme)()
        if connector.fuses_by_cross_attention:  # its blocks go into the LLM's decoder layers
            connector.install(llm)
        # how each image's view tokens become its sequence (``vlm.arrangements``; ``None``: views one after another)
        self.arrangement = arrangement
        if arrangement is not None:
            if self.positions.reads_media:
                raise ValueError(f"the {arrangement.registry_name} arrangement gives an image a token sequence of its "
                                 f"own length, but the LLM's position scheme {llm.position_scheme!r} places image "
                                 f"tokens on their grids; use an LLM with 1-D positions")
            arrangement.attach(encoder, connector)  # refuses parts that do not fit, naming them
        self.image_token_id, self.image_token = image_token_id, image_token
        # the video placeholder (``None``: the model takes no videos)
        self.video_token_id, self.video_token = video_token_id, video_token
        self.tokenizer: Any = None
        # the vlm.interop format (FORMATS name) the model was imported from, e.g. "smolvlm"; to_hf prefers it
        self.source_format: str | None = None
        # eos (tokenizer eos + the chat template's end of turn), pad, bos ids: generate's defaults, saved and exported
        self.generation: dict[str, Any] = {}
        # how its images are preprocessed (``resize_mode``, ``pad_color``): Processor.for_model's default, exported
        self.image_preprocessing: dict[str, Any] = dict(DEFAULT_IMAGE_PREPROCESSING)
        # how chat joins a turn's images and text (``vlm.data.image_placement``): the training data's placement, recorded
        # by the run; ``None``: the chat template places images itself (imported transformers directories)
        self.image_placement: ImagePlacement | None = DEFAULT_IMAGE_LAYOUT
        # a vlm.encoders.cache.FeatureCache: the frozen encoder's outputs read from disk (stage.cache_features)
        self.feature_cache: Any = None
        # every forward runs the image path, on a stand-in image when the batch has none (``stand_in_zero``): set by
        # a stage whose strategy's forward passes are collectives (FSDP gathers each sharded tower layer's weights
        # in its forward), so that every process enters the same layers whether or not its batch has images
        self.image_path_in_lockstep = False

    def train(self, mode: bool = True) -> "VLM":
        """``nn.Module.train``, except that a part (encoder, connector, LLM) with no trainable parameter stays in
        eval mode: a frozen tower is *fixed*, its BatchNorm statistics and dropout included."""
        super().train(mode)
        if mode:
            for part in (self.encoder, self.connector, self.llm):
                params = list(part.parameters())
                if params and not any(p.requires_grad for p in params):
                    part.eval()
        return self

    # -- what the processor asks ------------------------------------------------------------------------------
    @property
    def config(self) -> VLMConfig:
        return VLMConfig(encoder=self.encoder.export_config(), connector=self.connector.export_config(),
                         llm=self.llm.export_config(), image_token_id=self.image_token_id,
                         image_token=self.image_token, generation=dict(self.generation),
                         image_preprocessing=dict(self.image_preprocessing),
                         image_placement=placement_record(self.image_placement),
                         video_token_id=self.video_token_id, video_token=self.video_token,
                         arrangement=self.arrangement.export_config() if self.arrangement is not None else None,
                         source_format=self.source_format)

    def set_template(self, template: Any) -> None:
        """Serve with chat ``template`` (a name, config or ``Template``): its end-of-turn token joins the stop ids
        in ``self.generation``, and ``self.tokenizer.chat_template`` becomes its Jinja equivalent, so a saved or
        exported directory builds the same prompts and stops at the same token as vlm. Changes ``self.tokenizer``
        in place (give the model its own copy first when the tokenizer is shared). The Jinja writes each image part
        with ``self.image_placement`` (its label and separator), as chat joins a turn's images and text: set the placement
        first."""
        from vlm.data.templates import build_template

        if self.tokenizer is None:
            raise ValueError("set_template needs model.tokenizer (the template's tokens are looked up in it)")
        template = build_template(template)
        self.generation = generation_settings(self.tokenizer, template)
        videos = {"video_token": self.video_token} if self.video_token_id is not None else {}
        jinja = template.as_jinja(self.tokenizer, self.image_token,
                                  image_placement=ImagePlacement.from_dict(self.image_placement), **videos)
        if jinja is None:
            warnings.warn(f"template {template!r} has no Jinja equivalent; the tokenizer keeps its own chat "
                          f"template", stacklevel=2)
        else:
            self.tokenizer.chat_template = jinja

    @property
    def image_size(self) -> int:
        return self.encoder.image_size

    @property
    def image_mean(self) -> tuple[float, float, float]:
        return tuple(self.encoder.image_mean)

    @property
    def image_std(self) -> tuple[float, float, float]:
        return tuple(self.encoder.image_std)

    def num_image_tokens(self, image_size: int | tuple[int, int] | None = None) -> int:
        """How many placeholder ids one image (or tile) of ``image_size`` ``(H, W)`` becomes (1 with a fusion
        connector: the image reaches the LLM by cross-attention)."""
        size = as_pair(self.encoder.image_size if image_size is None else image_size)
        return self.connector.num_tokens(self.encoder.num_tokens(size), self.encoder.grid(size))

    def image_token_count(self, height: int, width: int, num_views: int = 1,
                          view_size: int | tuple[int, int] | None = None) -> int:
        """How many placeholder ids one whole image becomes: with an arrangement, its count for the image's
        original ``height x width`` pixels (``Arrangement.num_tokens``); else ``num_views`` views of ``view_size``
        ``(H, W)`` each (``num_image_tokens``)."""
        if self.arrangement is not None:
            return int(self.arrangement.num_tokens(int(height), int(width)))
        return int(num_views) * self.num_image_tokens(view_size)

    def video_geometry(self) -> dict[str, int] | None:
        """How the encoder takes video frames, ``{"patch_size", "temporal_patch_size", "merge_size"}`` (what
        ``vlm.data.video.VideoProcessor`` and ``vlm.data.patches.to_patches`` need), when the model takes videos: an
        encoder stating ``native_resolution`` (flat patches of ``temporal_patch_size`` frames) and a
        ``video_token_id``; or an arrangement that ``takes_videos`` (OneVision): then also ``size``, every frame
        resized to the tower's ``S x S`` and given whole (``(M, F, 3, S, S)``); ``None`` otherwise."""
        if self.video_token_id is None:
            return None
        if getattr(self.arrangement, "takes_videos", False):  # fixed-size frames (M, F, 3, S, S), one per step
            return {"size": int(self.arrangement.tile_size), "patch_size": int(self.encoder.patch_size),
                    "temporal_patch_size": 1, "merge_size": 1}
        if not getattr(self.encoder, "native_resolution", False):
            return None
        return {"patch_size": int(self.encoder.patch_size),
                "temporal_patch_size": int(self.encoder.temporal_patch_size),
                "merge_size": int(getattr(self.encoder, "spatial_merge_size", 1))}

    def image_tokens(self) -> ImageTokens:
        """``num_image_tokens`` as a picklable callable (``vlm.image_tokens``): what the data pipeline carries into
        DataLoader workers."""
        return ImageTokens(self.encoder, self.connector, self.arrangement)

    # -- forward ---------------------------------------------------------------------------------------------
    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                     image_grid_thw: torch.Tensor | None = None, pixel_values_videos: torch.Tensor | None = None,
                     video_grid_thw: torch.Tensor | None = None, image_sizes: torch.Tensor | None = None,
                     batch_num_images: torch.Tensor | None = None) -> torch.Tensor:
        """``input_ids (B, L)`` (+ images: ``pixel_values`` and, for native-resolution images, ``image_grid_thw``;
        see ``image_features``; + videos: ``pixel_values_videos (P, D_in)`` and ``video_grid_thw (M, 3)``, see
        ``video_features``) -> ``inputs_embeds (B, L, D)`` with image and video features injected. Without
        images, ``stand_in_zero`` is added when the image path trains or runs in lockstep (values unchanged)."""
        embeds = self.llm.embed(input_ids)
        n_video = int((input_ids == self.video_token_id).sum()) if self.video_token_id is not None else 0
        # fixed-size frames (M, F, 3, S, S), for an arrangement that takes videos (arranged_video_features checks them)
        fixed_frames = pixel_values_videos is not None and (
            pixel_values_videos.ndim == 5 or bool(getattr(self.arrangement, "takes_videos", False)))
        if (pixel_values_videos is None) != (video_grid_thw is None) and not fixed_frames:
            raise ValueError("videos need both pixel_values_videos (flat patches) and video_grid_thw (M, 3); got "
                             + ("only pixel_values_videos" if video_grid_thw is None else "only video_grid_thw"))
        if pixel_values_videos is None and n_video:
            raise ValueError(f"input_ids hold {n_video} video tokens (id {self.video_token_id}) but no "
                             f"pixel_values_videos were given")
        if pixel_values_videos is not None:
            embeds = self.injection.embed_videos(self, embeds, input_ids, pixel_values_videos, video_grid_thw)
        if pixel_values is None:
            n = int((input_ids == self.image_token_id).sum())
            if n:
                raise ValueError(f"input_ids hold {n} image tokens (id {self.image_token_id}) but no pixel_values "
                                 f"were given")
            if pixel_values_videos is not None:  # the image path ran on the videos: nothing to stand in for
                return embeds
            zero = self.stand_in_zero(input_ids.device)
            return embeds if zero is None else embeds + zero.to(embeds.dtype)
        # where the connector's features enter
        return self.injection.embed(self, embeds, input_ids, pixel_values, image_grid_thw, image_sizes,
                                    batch_num_images)

    @contextlib.contextmanager
    def fusion(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
               segment_ids: torch.Tensor | None = None) -> Iterator[None]:
        """The context to call the LLM in, from the connector's injection site (``vlm.injection``): with a fusion
        connector, its cross-attention blocks read these images' features (one ``<image>`` token per image in
        ``input_ids``); with a token connector, nothing."""
        with self.injection.context(self, input_ids, pixel_values, segment_ids):
            yield

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None,
                image_grid_thw: torch.Tensor | None = None, mm_token_type_ids: torch.Tensor | None = None,
                pixel_values_videos: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
                second_per_grid_ts: torch.Tensor | None = None, image_sizes: torch.Tensor | None = None,
                batch_num_images: torch.Tensor | None = None, pixel_attention_mask: torch.Tensor | None = None,
                **lm_kwargs: Any) -> CausalLMOutputWithPast:
        """Returns ``.logits (B, L, V)`` and, when labels are given, ``.loss``: the mean next-token loss over the
        target tokens (labels != -100), the LM's own (transformers') loss, which honours ``num_items_in_batch``.
        Other weightings and the stage's losses are training objectives (``vlm.objectives``).

        ``segment_ids (B, L)`` marks packed samples (0 = padding): attention stays within each segment, positions
        restart per segment, and a segment's first token is never a target of the previous segment.

        ``image_grid_thw (N, 3)``: with native-resolution images, each image's patch grid (``pixel_values`` then holds
        flat patches, see ``image_features``). Videos: ``pixel_values_videos (P, D_in)``, ``video_grid_thw (M, 3)``
        and ``second_per_grid_ts (M,)`` (seconds per temporal patch; Qwen2.5-VL's temporal positions), as
        transformers' Qwen2-VL processors return them.

        ``image_sizes (N, 2)``: each image's original ``(height, width)`` in pixels, for a model with an arrangement
        (``vlm.arrangements``: LLaVA-NeXT's processor returns it beside ``pixel_values``). ``batch_num_images (B,)``:
        images per sample (LLaVA-OneVision's processor: the images of a multi-image sample are one view each).
        Fixed-size video frames ``pixel_values_videos (M, F, 3, S, S)`` (no ``video_grid_thw``) go through an
        arrangement that takes videos (``arranged_video_features``).

        ``pixel_values (B, N, 3, H, W)`` without an arrangement (Idefics3 / SmolVLM's processors: each sample's
        views padded with all-zero views to ``N``) + ``pixel_attention_mask (B, N, H, W)``: the real views are
        taken in order (``real_views``).

        ``mm_token_type_ids (B, L)``: what Qwen2-VL's processor returns beside ``input_ids`` (1 at image tokens);
        it is derivable from ``input_ids`` (the image tokens are ``image_token_id``), so it is only checked
        (``check_mm_token_types``) and the model takes the processor's output whole.

        ``lm_kwargs``: keywords of the LM's forward (``use_cache``, ``num_items_in_batch``, ``output_hidden_states``,
        ...); any other raises ``TypeError`` naming it (``check_keywords``).
        """
        self.check_mm_token_types(input_ids, mm_token_type_ids)
        self.check_keywords(lm_kwargs, "forward")
        pixel_values = self.real_views(pixel_values, pixel_attention_mask)
        lm_inputs = self.lm_inputs(input_ids, pixel_values, attention_mask, position_ids, segment_ids, image_grid_thw,
                                   pixel_values_videos, video_grid_thw, second_per_grid_ts, image_sizes,
                                   batch_num_images)
        if labels is not None and segment_ids is not None:
            labels = mask_segment_starts(labels, segment_ids)
        with self.fusion(input_ids, pixel_values, segment_ids):
            return self.llm(**lm_inputs, labels=labels, **lm_kwargs)

    def lm_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                  attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                  segment_ids: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                  pixel_values_videos: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
                  second_per_grid_ts: torch.Tensor | None = None,
                  image_sizes: torch.Tensor | None = None,
                  batch_num_images: torch.Tensor | None = None) -> dict[str, torch.Tensor | None]:
        """What the LM is called with: ``inputs_embeds (B, L, D)`` (images injected), the attention mask (the
        packed 4D mask with ``segment_ids``) and ``position_ids`` from the LLM's position scheme (restarting per
        segment when packed; ``(3, B, L)`` for mRoPE, which places the image tokens on their grids: ``media_tokens``)."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (B, L); got shape {tuple(input_ids.shape)}")
        embeds = self.embed_inputs(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
                                   image_sizes, batch_num_images)
        media = self.media_tokens(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
                                  second_per_grid_ts)
        position_ids = self.positions.position_ids(input_ids, attention_mask=attention_mask, segment_ids=segment_ids,
                                                   position_ids=position_ids, media=media)
        if segment_ids is not None:
            attention_mask = segment_mask(segment_ids, self.llm.attn_implementation, embeds.dtype)
        return {"inputs_embeds": embeds, "attention_mask": attention_mask, "position_ids": position_ids}

    @property
    def supports_label_only_head(self) -> bool:
        """Whether ``hidden_states`` + ``output_head`` give exactly ``forward``'s logits (the LM says so)."""
        return bool(getattr(self.llm, "supports_label_only_head", False))

    @property
    def output_head(self) -> nn.Module:
        """The LM's output embeddings: ``(N, D) -> (N, V)``."""
        return self.llm.output_head

    def hidden_states(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                      segment_ids: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                      pixel_values_videos: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
                      second_per_grid_ts: torch.Tensor | None = None, mm_token_type_ids: torch.Tensor | None = None,
                      image_sizes: torch.Tensor | None = None, batch_num_images: torch.Tensor | None = None,
                      pixel_attention_mask: torch.Tensor | None = None,
                      **lm_kwargs: Any) -> torch.Tensor:
        """``forward`` without the vocabulary projection: the LM's last hidden states ``(B, L, D)``, so a loss
        can project only the positions it needs (``vlm.loss.label_only_lm_loss``). Needs
        ``supports_label_only_head``. Takes what ``forward`` takes (``mm_token_type_ids`` checked the same way), so
        a batch the family's processor returns trains through either."""
        self.check_mm_token_types(input_ids, mm_token_type_ids)
        self.check_keywords(lm_kwargs, "hidden_states", decoder=True)
        pixel_values = self.real_views(pixel_values, pixel_attention_mask)
        lm_inputs = self.lm_inputs(input_ids, pixel_values, attention_mask, position_ids, segment_ids, image_grid_thw,
                                   pixel_values_videos, video_grid_thw, second_per_grid_ts, image_sizes,
                                   batch_num_images)
        with self.fusion(input_ids, pixel_values, segment_ids):
            return self.llm.hidden_states(**lm_inputs, **lm_kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                 mm_token_type_ids: torch.Tensor | None = None, pixel_values_videos: torch.Tensor | None = None,
                 video_grid_thw: torch.Tensor | None = None, second_per_grid_ts: torch.Tensor | None = None,
                 image_sizes: torch.Tensor | None = None, batch_num_images: torch.Tensor | None = None,
                 pixel_attention_mask: torch.Tensor | None = None,
                 **generate_kwargs: Any) -> torch.Tensor:
        """Greedy by default, with the KV cache. ``input_ids`` left-padded ``(B, L)``; returns new tokens ``(B, T)``.

        Stops at any id of ``self.generation["eos_token_id"]`` (the tokenizer's eos and the chat template's end of
        turn; ``set_template``) and pads with its ``pad_token_id``, unless given here. The prompt's positions are
        the LLM's position scheme's (``generation_inputs``: mRoPE's ``(3, B, L)`` from ``media_tokens``, continued by the
        rope delta while decoding)."""
        self.check_mm_token_types(input_ids, mm_token_type_ids)  # derivable from input_ids: checked, not used
        self.check_keywords(generate_kwargs, "generate", moved_only=True)  # transformers checks the others
        pixel_values = self.real_views(pixel_values, pixel_attention_mask)
        embeds = self.embed_inputs(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
                                   image_sizes, batch_num_images)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        generate_kwargs.setdefault("do_sample", False)
        settings = self.generation or generation_settings(self.tokenizer)
        for key in ("eos_token_id", "pad_token_id"):
            if key in settings:
                generate_kwargs.setdefault(key, settings[key])
        for key, value in self.positions.generation_inputs(input_ids, attention_mask=attention_mask,
                                                           media=self.media_tokens(
                                                               input_ids, pixel_values, image_grid_thw,
                                                               pixel_values_videos, video_grid_thw,
                                                               second_per_grid_ts)).items():
            generate_kwargs.setdefault(key, value)
        with self.fusion(input_ids, pixel_values):
            return self.llm.model.generate(inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs)

    # -- persistence -----------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json``, ``model.safetensors`` and the tokenizer (if set). Files are replaced atomically
        (``vlm.persistence.save_directory``); returns the directory. A quantized model (``vlm.load(...,
        quantize=...)``) is refused: see ``vlm.quantize``."""
        if getattr(self, "quantization", None):
            raise ValueError(f"save_pretrained: this model is quantized ({self.quantization['scheme']}, for inference "
                             f"only); saving would write lossy weights in a format vlm.load cannot read. Save the "
                             f"unquantized model and load it with vlm.load(DIR, quantize="
                             f"{self.quantization['scheme']!r}).")
        return save_directory(self, self.config, self.tokenizer, directory)

    # -- chat (vlm.inference.chat) ----------------------------------------------------------------------------
    def chat(self, images: Any, text: str, history: list | None = None, **kwargs: Any) -> tuple[str, list]:
        """``(reply, history)``; see :func:`vlm.inference.chat.chat`."""
        from vlm.inference.chat import chat

        return chat(self, images, text, history, **kwargs)

    def chat_batch(self, images: list, texts: list[str], histories: list | None = None,
                   **kwargs: Any) -> list[tuple[str, list]]:
        """``[(reply, history), ...]`` for many conversations at once; see :func:`vlm.inference.chat.chat_batch`."""
        from vlm.inference.chat import chat_batch

        return chat_batch(self, images, texts, histories, **kwargs)

    def chat_stream(self, images: Any, text: str, history: list | None = None, **kwargs: Any) -> Any:
        """An iterator of reply pieces (then ``.reply``, ``.history``); see :func:`vlm.inference.chat.chat_stream`."""
        from vlm.inference.chat import chat_stream

        return chat_stream(self, images, text, history, **kwargs)
