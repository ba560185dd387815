"""Where ``VLM``'s media tokens sit, for a position scheme that places them on their grids (mRoPE).

``MediaPositions`` is a mixin of ``VLM`` (``vlm.model``): ``media_tokens`` gives the position scheme
(``vlm.llm.positions``) the image and video placeholders of ``input_ids`` and the LLM-token grid each one fills, in
order of appearance (``interleave``), each video with its temporal step (``time_steps``). Below ``vlm.model``.
"""
from __future__ import annotations

from typing import Any

import torch

from vlm.llm.positions import MediaTokens


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


class MediaPositions:
    """The media tokens of a ``VLM``'s inputs: a mixin reading the parts ``VLM.__init__`` sets (``encoder``,
    ``connector``, ``positions``, ``image_token_id``, ``video_token_id``)."""

    encoder: Any
    connector: Any
    positions: Any
    image_token_id: int
    video_token_id: int | None

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
