"""``VLM``: vision encoder -> connector -> feature injection into a causal LM.

``vlm.build(cfg, tokenizer=None)`` (``vlm.compose``) composes one from component configs;
``model.save_pretrained(dir)`` (``vlm.persistence``) / ``vlm.load(dir)`` (``vlm.loading``) round-trip it through
``config.json`` + ``model.safetensors`` (+ tokenizer files). Nothing pickled.
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
from vlm.encoders.base import VisionEncoder, as_pair
from vlm.generation import generation_settings
from vlm.image_tokens import ImageTokens
from vlm.llm.hf_causal_lm import HFCausalLM
from vlm.llm.masks import segment_mask
from vlm.llm.positions import POSITION_SCHEMES, MediaTokens
from vlm.injection import INJECTION_SITES
from vlm.loss import mask_segment_starts
from vlm.persistence import DEFAULT_IMAGE_PREPROCESSING, VLMConfig, placement_record, save_directory

# Keywords ``VLM.forward`` once took, and where they are now: passing one is an error that says so
MOVED_KEYWORDS = {
    "loss_weighting": "loss_weighting moved to the lm objective: "
                      "vlm.objectives.build({'name': 'lm'}, loss_weighting='sample')(model, batch).loss in code, "
                      "stage.<name>.loss_weighting in a config (VLM.forward's loss is the token mean)",
    "objective": "objective moved out of the model: a stage trains vlm.objectives.base.TrainModule(model, "
                 "objective), built by vlm.objectives.build(...) (stage.<name>.objective in a config)",
}


def param_dtype(module: nn.Module, default: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype of ``module``'s first floating-point parameter (``default`` when it has none)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), default)


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Every submodule of ``modules`` in eval mode inside; each one's own ``training`` flag restored after."""
    flags = [(m, m.training) for module in modules for m in module.modules()]
    for m, _ in flags:
        m.training = False
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def interleave(kinds: list[bool], image_grids: list, video_grids: list, video_steps: list[float]
               ) -> tuple[list[tuple[int, int, int]], list[float]]:
    """Image and video entries in order of appearance: ``kinds`` is, for every image / video placeholder token in
    row-major order, whether it is a video token; each entry consumes ``t * h * w`` tokens of its kind (counted,
    never grouped). Returns ``(grids, time_steps)`` (images step 1). ``ValueError`` when the placeholders do not
    fill the grids exactly."""
    grids, steps, k = [], [], 0
    images, videos = iter(image_grids), iter(zip(video_grids, video_steps))
    while k < len(kinds):
        video = kinds[k]
        grid, step = next(videos, (None, None)) if video else (next(images, None), 1.0)
        if grid is None:
            kind = "video" if video else "image"
            raise ValueError(f"input_ids hold more {kind} placeholder tokens than the {kind}s given fill "
                             f"(grids: images {image_grids}, videos {video_grids})")
        n = grid[0] * grid[1] * grid[2]
        if len(kinds) < k + n or any(v != video for v in kinds[k:k + n]):
            raise ValueError(f"a {'video' if video else 'image'} of LLM-token grid {grid} needs {n} consecutive "
                             f"placeholder tokens of its kind at placeholder {k}; input_ids disagree with the grids")
        grids.append(grid)
        steps.append(step)
        k += n
    return grids, steps


class VLM(nn.Module):
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
                         arrangement=self.arrangement.export_config() if self.arrangement is not None else None)

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
    def image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None = None,
                       image_sizes: torch.Tensor | None = None, batch_num_images: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """``(N, 3, H, W) -> (N, K, D)`` LLM-space image tokens; for native-resolution images (an encoder stating
        ``native_resolution``), flat patches ``(P, 3 * t * p * p)`` + ``image_grid_thw (N, 3)`` (patch units, the
        Qwen2-VL processor's convention) -> ``(K_1 + ... + K_N, D)``, image by image (``Connector.forward_flat``).
        With an arrangement (``vlm.arrangements``): ``arranged_image_features`` -> ``(K_1 + ... + K_N, D)``
        (``image_sizes (N, 2)`` needed; ``batch_num_images (B,)``: images per sample, for an arrangement that lays
        out the images of a multi-image sample otherwise). Raises ``ValueError`` for ``image_grid_thw`` with an
        encoder that takes fixed-size images."""
        if self.arrangement is not None:
            return self.arranged_image_features(pixel_values, image_sizes, batch_num_images)
        if image_grid_thw is not None:
            return self.native_image_features(pixel_values, image_grid_thw)
        return self.view_features(pixel_values)

    def view_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Views of one size ``(N, 3, H, W)`` -> their LLM-space tokens ``(N, K, D)``: the encoder (or the feature
        cache), then the connector."""
        grid = self.encoder.grid(tuple(pixel_values.shape[-2:])) if pixel_values.ndim == 4 else (0, 0)
        trainable = any(p.requires_grad for p in self.encoder.parameters())
        pixels = pixel_values.to(param_dtype(self.encoder, pixel_values.dtype))
        if self.feature_cache is not None and not trainable:
            feats = self.feature_cache(self.encoder, pixels)
        else:
            with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):
                feats = self.encoder(pixels)
        # each part may have its own dtype: features enter the connector in its dtype (the LLM side is cast by
        # ``inject``); under autocast the matmuls still run in the autocast dtype
        return self.connector(feats.to(param_dtype(self.connector, feats.dtype)), grid)

    def arranged_image_features(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None,
                                batch_num_images: torch.Tensor | None = None) -> torch.Tensor:
        """Images through the arrangement (``vlm.arrangements``): ``pixel_values`` every image's views
        ``(V, 3, S, S)`` one image after another (vlm's processor), or ``(N, max_views, 3, S, S)`` padded per image
        (LLaVA-NeXT's processor: image ``i``'s first ``num_views`` rows are used); ``image_sizes (N, 2)``: each
        image's original ``(height, width)`` -> ``(K_1 + ... + K_N, D)``; ``batch_num_images (B,)``: images per
        sample (LLaVA-OneVision's processor; an arrangement that ``lays_out_multi_image`` lays out the images of a
        multi-image sample otherwise; ignored by the others). ``ValueError`` naming the counts when the
        pixels do not hold the views the sizes need."""
        from vlm.arrangements.base import views_per_image

        if image_sizes is None:
            raise ValueError(f"the {self.arrangement.registry_name} arrangement needs image_sizes (N, 2): each image's "
                             f"original (height, width), which the processor returns beside pixel_values")
        image_sizes = image_sizes.reshape(-1, 2)
        multi = batch_num_images if self.arrangement.lays_out_multi_image else None
        counts = views_per_image(self.arrangement, image_sizes, multi)
        if pixel_values.ndim == 5:
            if pixel_values.shape[0] != len(counts) or pixel_values.shape[1] < max(counts, default=0):
                raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)} (images, views, 3, H, W) for "
                                 f"image_sizes {image_sizes.tolist()}, which need {counts} views")
            pixel_values = torch.cat([p[:n] for p, n in zip(pixel_values, counts)])
        elif pixel_values.ndim != 4 or pixel_values.shape[0] != sum(counts):
            raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)} for image_sizes "
                             f"{image_sizes.tolist()} (height, width), which need {counts} views ({sum(counts)} in "
                             f"all) of (3, {self.arrangement.tile_size}, {self.arrangement.tile_size})")
        s = self.arrangement.tile_size
        if tuple(pixel_values.shape[-2:]) != (s, s):
            raise ValueError(f"pixel_values views are {tuple(pixel_values.shape[-2:])} pixels; the arrangement's "
                             f"tiles are the encoder's {s} x {s}")
        feats = self.view_features(pixel_values)
        feats = feats.to(param_dtype(self.arrangement, feats.dtype))
        if multi is not None:
            return self.arrangement(feats, image_sizes, multi)
        return self.arrangement(feats, image_sizes)

    def real_views(self, pixel_values: torch.Tensor | None,
                   pixel_attention_mask: torch.Tensor | None = None) -> torch.Tensor | None:
        """Idefics3 / SmolVLM's batch layout -> vlm's: ``pixel_values (B, N, 3, H, W)`` (each sample's views, padded
        to ``N`` with all-zero views) -> the real views ``(V, 3, H, W)`` in order. A view is real when its
        ``pixel_attention_mask (B, N, H, W)`` has any 1, or, without a mask, when any of its values is non-zero
        (transformers' own rule). Anything else (4-D views, flat patches, a model with an arrangement, which reads
        5-D pixels itself) passes unchanged. ``ValueError`` for a mask of another shape, or one that covers part of
        a real view (the towers take whole views; Idefics3's processors pad only with whole padding views)."""
        if pixel_values is None or pixel_values.ndim != 5 or self.arrangement is not None:
            if pixel_attention_mask is not None and not bool(pixel_attention_mask.bool().all()):
                raise ValueError("pixel_attention_mask marks padded pixels, but pixel_values are not (B, N, 3, H, W) "
                                 "views padded per sample (Idefics3's processor): vlm's towers take whole views")
            return pixel_values
        views = pixel_values.flatten(0, 1)
        if pixel_attention_mask is None:
            return views[views.flatten(1).ne(0).any(dim=1)]
        b, n, _, h, w = pixel_values.shape
        if tuple(pixel_attention_mask.shape) != (b, n, h, w):
            raise ValueError(f"pixel_attention_mask has shape {tuple(pixel_attention_mask.shape)}; expected (B, N, H, W) "
                             f"= {(b, n, h, w)} for pixel_values of shape {tuple(pixel_values.shape)}")
        mask = pixel_attention_mask.flatten(0, 1).flatten(1).bool()
        real = mask.any(dim=1)
        partial = (real & ~mask.all(dim=1)).nonzero()
        if len(partial):
            k = int(partial[0, 0])
            raise ValueError(f"pixel_attention_mask covers only part of view {k % n} of sample {k // n} "
                             f"({int(mask[k].sum())} of {h * w} pixels): vlm's towers take whole views (Idefics3's "
                             f"processors pad a batch only with whole, all-zero views)")
        return views[real]

    def native_image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """Flat patches ``(P, D_in)`` of images of their own sizes -> ``(K_total, D)``: the encoder's row-major tokens
        ``(P, C)`` per image, then the connector image by image on each one's grid ``(t, h, w)``."""
        if not getattr(self.encoder, "native_resolution", False):
            raise ValueError(f"image_grid_thw was given (native-resolution images as flat patches) but the "
                             f"{self.encoder.component_name} encoder takes fixed-size images (N, 3, H, W); use an "
                             f"encoder that states native_resolution (qwen2_vl_vit) or a fixed-size image layout")
        trainable = any(p.requires_grad for p in self.encoder.parameters())
        pixels = pixel_values.to(param_dtype(self.encoder, pixel_values.dtype))
        with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):
            tokens = self.encoder(pixels, image_grid_thw)
        grids = [tuple(int(v) for v in g) for g in image_grid_thw.tolist()]
        return self.connector.forward_flat(tokens.to(param_dtype(self.connector, tokens.dtype)), grids)

    def video_features(self, pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor | None) -> torch.Tensor:
        """Flat patches ``(P, D_in)`` of videos + ``video_grid_thw (M, 3)`` (patch units, ``t`` temporal patches) ->
        ``(K_total, D)``: the native-resolution path of ``native_image_features`` (each temporal patch attends
        within itself in the tower; the connector merges each frame group). ``ValueError`` naming the keys for a
        model that takes no videos or patches that disagree with their grids. Without ``video_grid_thw``: fixed-size
        frames ``(M, F, 3, S, S)`` through the arrangement (``arranged_video_features``)."""
        if video_grid_thw is None:
            return self.arranged_video_features(pixel_values_videos)
        geometry = self.video_geometry()
        if geometry is None:
            raise ValueError(f"pixel_values_videos were given but this model takes no videos: the "
                             f"{self.encoder.component_name} encoder states no native_resolution or the model has no "
                             f"video_token_id; give the frames as images, or use a native-resolution encoder "
                             f"(qwen2_vl_vit)")
        from vlm.data.patches import check_patches

        check_patches(pixel_values_videos, video_grid_thw, patch_size=geometry["patch_size"],
                      temporal_patch_size=geometry["temporal_patch_size"], merge_size=geometry["merge_size"],
                      names=("pixel_values_videos", "video_grid_thw"))
        return self.native_image_features(pixel_values_videos, video_grid_thw)

    def arranged_video_features(self, pixel_values_videos: torch.Tensor) -> torch.Tensor:
        """Fixed-size video frames ``(M, F, 3, S, S)`` (LLaVA-OneVision's video processor) -> ``(K_1 + ... + K_M,
        D)``: every frame through the encoder and the connector as a view, then the arrangement's
        ``video_forward`` (OneVision: each frame's grid pooled, a newline after each video). ``ValueError`` for a
        model whose arrangement takes no videos, or frames of another shape."""
        arr = self.arrangement
        if arr is None or not getattr(arr, "takes_videos", False):
            raise ValueError(f"pixel_values_videos of shape {tuple(pixel_values_videos.shape)} (videos, frames, 3, H, "
                             f"W) without video_grid_thw: fixed-size video frames need an arrangement that takes "
                             f"videos (onevision); this model's arrangement is "
                             f"{getattr(arr, 'registry_name', None)!r}")
        if self.video_token_id is None:
            raise ValueError("pixel_values_videos were given but the model has no video_token_id (it takes no videos)")
        s = arr.tile_size
        if pixel_values_videos.ndim != 5 or tuple(pixel_values_videos.shape[2:]) != (3, s, s):
            raise ValueError(f"pixel_values_videos of shape {tuple(pixel_values_videos.shape)}; expected (videos, "
                             f"frames, 3, {s}, {s}): every frame resized to the encoder's {s} x {s}")
        m, f = pixel_values_videos.shape[:2]
        feats = self.view_features(pixel_values_videos.reshape(m * f, 3, s, s))
        return arr.video_forward(feats.to(param_dtype(arr, feats.dtype)), [int(f)] * int(m))

    def time_steps(self, video_grid_thw: torch.Tensor, second_per_grid_ts: torch.Tensor | None) -> list[float]:
        """Each video's temporal position step: ``tokens_per_second * second_per_grid_t`` when the encoder states
        ``tokens_per_second`` (Qwen2.5-VL's tower, from its vision config; 1 second per temporal patch when
        ``second_per_grid_ts`` is not given, as transformers), else 1 per temporal patch (Qwen2-VL)."""
        rate = getattr(self.encoder, "tokens_per_second", None)
        n = int(video_grid_thw.shape[0])
        if rate is None:
            return [1.0] * n
        if second_per_grid_ts is None:
            return [float(rate)] * n
        seconds = second_per_grid_ts.reshape(-1).tolist()
        if len(seconds) != n:
            raise ValueError(f"second_per_grid_ts has {len(seconds)} entries for {n} video(s) in video_grid_thw")
        return [float(rate) * float(s) for s in seconds]

    def media_tokens(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                     image_grid_thw: torch.Tensor | None = None, pixel_values_videos: torch.Tensor | None = None,
                     video_grid_thw: torch.Tensor | None = None,
                     second_per_grid_ts: torch.Tensor | None = None) -> MediaTokens | None:
        """Where the image tokens of ``input_ids (B, L)`` are and the LLM-token grid ``(t, h', w')`` each image
        (tile) fills, for a position scheme that places them (``reads_media``: mRoPE); ``None`` otherwise, without
        images, or with a fusion connector (its ``<image>`` is a text token). The grid is the connector's
        ``output_grid`` of the encoder's patch grid (``patch_merger``: ``(h/2, w/2)``); a connector without one
        (resamplers: ``K`` queries) gives a ``(1, 1, K)`` run.

        Videos (``video_grid_thw``) are entries too, images and videos in their order of appearance in
        ``input_ids`` (row-major), each video with its temporal step (``time_steps``; images 1)."""
        has_videos = pixel_values_videos is not None and video_grid_thw is not None
        if not self.positions.reads_media or (pixel_values is None and not has_videos) \
                or self.connector.fuses_by_cross_attention:
            return None
        images: list = []
        if pixel_values is not None and image_grid_thw is not None:  # native resolution: patch units, no prefix
            images = [((h, w), t, h * w) for t, h, w in image_grid_thw.tolist()]
        elif pixel_values is not None:  # tiles of one size
            size = tuple(pixel_values.shape[-2:])
            images = [(self.encoder.grid(size), 1, self.encoder.num_tokens(size))] * pixel_values.shape[0]
        videos = [((h, w), t, h * w) for t, h, w in video_grid_thw.tolist()] if has_videos else []

        def llm_grid(entry: tuple) -> tuple[int, int, int]:
            (h, w), t, n = entry
            out = self.connector.output_grid((h, w))
            return (t, *out) if out is not None else (t, 1, self.connector.num_tokens(n, (h, w)))

        image_grids, video_grids = [llm_grid(e) for e in images], [llm_grid(e) for e in videos]
        is_image = input_ids == self.image_token_id
        if not video_grids:
            return MediaTokens(is_image, image_grids)
        is_video = input_ids == self.video_token_id
        steps = self.time_steps(video_grid_thw, second_per_grid_ts)
        return MediaTokens(is_image | is_video, *interleave(is_video[is_image | is_video].tolist(), image_grids,
                                                            video_grids, steps))

    def trains_image_path(self) -> bool:
        """Whether this forward computes gradients for the encoder or the connector (grad enabled and one of their
        parameters trainable)."""
        parts = (self.encoder, self.connector) + ((self.arrangement,) if self.arrangement is not None else ())
        return torch.is_grad_enabled() and any(p.requires_grad for part in parts for p in part.parameters())

    def stand_in_zero(self, device: torch.device) -> torch.Tensor | None:
        """For a forward without images: a scalar that is exactly 0 yet depends on every trainable encoder and
        connector parameter, or ``None`` when none is needed.

        Distributed training needs every process to use the same parameters in each backward: DDP's reducer
        (``find_unused_parameters=false``) expects a gradient for every trainable parameter, FSDP reduce-scatters
        the gradients of each sharded group and gathers each sharded tower layer in its forward. A batch without
        images would leave the tower and connector out, so: when they train (``trains_image_path``) or the
        strategy runs forwards in lockstep (``image_path_in_lockstep``), one stand-in image (zeros,
        ``(1, 3, S, S)`` at the encoder's own ``image_size``) goes through the encoder (when it trains or runs in
        lockstep; otherwise its tokens are zeros) and the connector, in eval mode (no dropout drawn, no BatchNorm
        statistics updated), and the result is ``0 * (features.sum() + sum of every trainable connector
        parameter)`` (the latter reaches parameters outside the connector's ``forward``, such as a fusion
        connector's cross-attention blocks). Adding it changes no value and every such parameter gets a zero
        gradient, the same in one process as in many."""
        trains = self.trains_image_path()
        if not (trains or self.image_path_in_lockstep):
            return None
        size = as_pair(self.encoder.image_size)
        with eval_mode(self.encoder, self.connector):
            if self.image_path_in_lockstep or any(p.requires_grad for p in self.encoder.parameters()):
                pixels = torch.zeros(1, 3, *size, device=device, dtype=param_dtype(self.encoder))
                with torch.set_grad_enabled(trains and any(p.requires_grad for p in self.encoder.parameters())):
                    tokens = self.encoder(pixels)
            else:
                tokens = torch.zeros(1, self.encoder.num_tokens(size), self.encoder.hidden_size, device=device)
            feats = self.connector(tokens.to(param_dtype(self.connector, tokens.dtype)), self.encoder.grid(size))
        total = feats.float().sum()
        arranged = self.arrangement.parameters() if self.arrangement is not None else ()
        for p in [*self.connector.parameters(), *arranged]:
            if p.requires_grad:
                total = total + p.float().sum()
        return total * 0.0

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

    def check_mm_token_types(self, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor | None) -> None:
        """``ValueError`` when ``mm_token_type_ids (B, L)`` (Qwen2-VL's processor: 0 text, 1 image, 2 video) marks
        other positions as image tokens (1) than ``input_ids == image_token_id``, or as video tokens (2) than
        ``input_ids == video_token_id``, naming the first row that differs; ``None`` passes."""
        if mm_token_type_ids is None:
            return
        if tuple(mm_token_type_ids.shape) != tuple(input_ids.shape):
            raise ValueError(f"mm_token_type_ids has shape {tuple(mm_token_type_ids.shape)}; expected input_ids' "
                             f"{tuple(input_ids.shape)}")
        for value, kind, token_id in ((1, "image", self.image_token_id), (2, "video", self.video_token_id)):
            is_token = input_ids == token_id if token_id is not None else torch.zeros_like(input_ids, dtype=torch.bool)
            differs = ((mm_token_type_ids == value) != is_token).any(dim=-1)
            if differs.any():
                row = int(differs.nonzero()[0, 0])
                raise ValueError(f"mm_token_type_ids row {row} marks {int((mm_token_type_ids[row] == value).sum())} "
                                 f"{kind} tokens (value {value}), but input_ids row {row} holds "
                                 f"{int(is_token[row].sum())} {kind} tokens (id {token_id}) at other positions; "
                                 f"they must agree")

    def check_keywords(self, kwargs: dict[str, Any], where: str, *, decoder: bool = False,
                       moved_only: bool = False) -> None:
        """Refuse keywords that nothing would consume: the transformers LM takes unknown keywords into its
        ``**kwargs`` and ignores them. Raises ``TypeError`` naming each one: for a keyword that moved
        (``MOVED_KEYWORDS``), where it went; otherwise what the LM's forward (``decoder``: its decoder's) accepts.
        ``moved_only``: check only the moved ones (``generate``, whose transformers checks the rest)."""
        moved = [MOVED_KEYWORDS[k] for k in kwargs if k in MOVED_KEYWORDS]
        if moved:
            raise TypeError(f"VLM.{where}() got a keyword that moved: " + "; ".join(moved))
        ask = getattr(self.llm, "accepted_keywords", None)
        accepted = ask(decoder=decoder) if ask is not None and not moved_only else None
        unknown = sorted(k for k in kwargs if accepted is not None and k not in accepted)
        if unknown:
            raise TypeError(f"VLM.{where}() got unexpected keyword argument(s) {unknown}: nothing consumes them "
                            f"(the LM would ignore them). Besides VLM.{where}'s own arguments, the LM's forward "
                            f"accepts {sorted(accepted)}")

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
