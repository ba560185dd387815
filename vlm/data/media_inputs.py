"""The processor's images and videos: a sample's media loaded and made views / frames (within the tile budget), and
the item's pixel tensors (``pixel_values`` or flat patches + ``image_grid_thw``, ``image_sizes``, videos as
``pixel_values_videos``). ``MediaInputs`` is a mixin of ``vlm.data.processor.Processor``; below it.
"""
from __future__ import annotations

from typing import Any

import torch

from vlm.data.readers.base import SampleDropped, SampleError
from vlm.data.sample import Sample


class MediaInputs:
    """A ``Processor``'s image and video inputs: a mixin reading what ``Processor.__init__`` sets
    (``image_processor``, ``multi_image_processor``, ``num_image_tokens``, ``image_loader``, ``image_root``,
    ``max_tiles_per_sample``, ``video_processor``)."""

    image_processor: Any
    multi_image_processor: Any
    num_image_tokens: Any
    image_loader: Any
    image_root: str | None
    max_tiles_per_sample: int | None
    video_processor: Any
    _ip_takes_max_tiles: bool
    #: why there is no ``video_processor`` (``Processor.for_model`` names the model's parts)
    no_video_input: str = ("the processor has no video_processor (Processor(video_processor=...), or "
                           "Processor.for_model of a model that takes videos)")

    def _tile_cap(self, sizes: list[tuple[int, int]], sid: Any) -> int | None:
        """The per-image ``max_tiles`` keeping the sample within ``max_tiles_per_sample`` (None: no cap)."""
        budget, ip = self.max_tiles_per_sample, self.image_processor
        if not budget or not sizes or getattr(ip, "tiling", None) is None or not self._ip_takes_max_tiles:
            return None
        count = getattr(ip, "num_images", None)
        for cap in range(max(1, budget // len(sizes)), 0, -1):
            if count is None or sum(count(w, h, max_tiles=cap) for w, h in sizes) <= budget:
                return cap
        raise SampleDropped(f"{len(sizes)} images need more than the tile budget of {budget}", reason="tile_budget",
                            sample_id=sid)

    def _images(self, sample: Sample, order: list[int], allow_urls: bool) -> tuple[list[torch.Tensor], list[Any]]:
        if order and (self.image_processor is None or self.num_image_tokens is None):
            missing = "image_processor" if self.image_processor is None else "num_image_tokens"
            raise SampleError(f"sample has images but the processor has no {missing}", reason="config",
                              sample_id=sample.id)
        pils = [self.image_loader(sample.images[i], root=self.image_root, allow_urls=allow_urls, sample_id=sample.id)
                for i in order]
        several = len(pils) > 1 and self.multi_image_processor is not None
        cap = None if several else self._tile_cap([p.size for p in pils], sample.id)
        kwargs = {"max_tiles": cap} if cap is not None else {}
        processor = self.multi_image_processor if several else self.image_processor
        tiles, infos = [], []
        for pil in pils:
            t, info = processor(pil, **kwargs)
            tiles.append(t)
            infos.append(info)
        total = sum(t.shape[0] for t in tiles)
        if self.max_tiles_per_sample and total > self.max_tiles_per_sample:
            raise SampleDropped(f"{total} tiles exceed the tile budget of {self.max_tiles_per_sample}",
                                reason="tile_budget", sample_id=sample.id)
        return tiles, infos

    def _videos(self, sample: Sample, order: list[int], allow_urls: bool) -> tuple[list[torch.Tensor], list[Any]]:
        """Each video of ``order`` as normalized frames ``(T, 3, H, W)`` and its ``VideoInfo``."""
        if order and self.video_processor is None:
            raise SampleError(f"sample has {len(order)} video(s) but {self.no_video_input}; give the video's frames "
                              f"as images instead (a list of images, one per frame)", reason="config",
                              sample_id=sample.id)
        out = [self.video_processor(sample.videos[i], sample_id=sample.id, allow_urls=allow_urls) for i in order]
        return [f for f, _ in out], [info for _, info in out]

    def _video_pixels(self, videos: list[torch.Tensor], infos: list[Any], sample_id: Any = None
                      ) -> dict[str, torch.Tensor]:
        """The item's videos as flat patches: ``pixel_values_videos (P, D)``, ``video_grid_thw (M, 3)`` (patch units)
        and ``second_per_grid_ts (M,)`` (seconds one temporal patch spans); nothing without videos. Fixed-size frames
        (the video processor's ``size``: OneVision): ``pixel_values_videos (M, F, 3, S, S)`` stacked (``SampleError``
        for videos of different frame counts)."""
        if not videos:
            return {}
        if self.video_processor.options.get("size") is not None:  # fixed-size frames: (M, F, 3, S, S)
            counts = sorted({v.shape[0] for v in videos})
            if len(counts) > 1:
                raise SampleError(f"the sample's videos have {counts} frames; fixed-size frames are stacked "
                                  f"(videos, frames, 3, S, S): give its videos one frame count (num_frames)",
                                  reason="video_frames", sample_id=sample_id)
            return {"pixel_values_videos": torch.stack(videos)}
        from vlm.data.patches import concat_patches

        o = self.video_processor.options
        pixels, grid_thw = concat_patches(videos, patch_size=int(o["patch_size"]),
                                          temporal_patch_size=int(o["temporal_patch_size"]),
                                          merge_size=int(o["merge_size"]))
        seconds = torch.tensor([float(i.second_per_grid_t) for i in infos], dtype=torch.float32)
        return {"pixel_values_videos": pixels, "video_grid_thw": grid_thw, "second_per_grid_ts": seconds}

    def _pixels(self, tiles: list[torch.Tensor], infos: list[Any] = ()) -> dict[str, torch.Tensor | None]:
        """The item's pixels: every view ``(n, 3, H, W)`` concatenated, or, when the layout hands its views to the
        encoder as flat patches (``Layout.patch_options``: native resolution, each view its own size), ``pixel_values
        (P, D)`` + ``image_grid_thw (N, 3)`` (``vlm.data.patches.concat_patches``). A model that arranges its views
        (``TokenCount.arranges``) also gets ``image_sizes (N, 2)``: each image's original ``(height, width)``."""
        if not tiles:
            return {"pixel_values": None}
        options = getattr(getattr(self.image_processor, "layout", None), "patch_options", None)
        if options is None and getattr(self.num_image_tokens, "arranges", False):
            # the model arranges each image's views by its original size: image_sizes (N, 2) (height, width)
            out = {"pixel_values": torch.cat(tiles),
                   "image_sizes": torch.tensor([(i.original_size[1], i.original_size[0]) for i in infos],
                                               dtype=torch.long).reshape(-1, 2)}
            if self.num_image_tokens.lays_out_multi_image:  # which images share their sample (OneVision)
                out["batch_num_images"] = torch.tensor([len(tiles)], dtype=torch.long)
            return out
        if options is None:
            return {"pixel_values": torch.cat(tiles)}
        from vlm.data.patches import concat_patches

        pixel_values, grid_thw = concat_patches([view for t in tiles for view in t], **options)
        return {"pixel_values": pixel_values, "image_grid_thw": grid_thw}


def no_video_input(model: Any) -> str:
    """Says that ``model`` takes no video input (``model.video_geometry()`` is ``None``), naming its encoder and
    arrangement (registry names) so the message says which model it is, for the processor's errors."""
    parts = [f"{what} {getattr(part, 'registry_name', type(part).__name__)!r}"
             for what, part in (("encoder", getattr(model, "encoder", None)),
                                ("arrangement", getattr(model, "arrangement", None))) if part is not None]
    which = f" ({', '.join(parts)})" if parts else ""
    return f"this model{which} takes no video input, only images (model.video_geometry() is None)"
