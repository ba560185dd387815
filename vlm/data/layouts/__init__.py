"""Image layouts: how one image becomes the encoder's views (``vlm.data.layouts.base``), one file per layout,
registered in ``LAYOUTS`` (``dynamic``: InternVL tiles + thumbnail; ``anyres``: LLaVA-NeXT base + tiles; ``native``:
Qwen2-VL's one view at its own size; ``idefics3``: Idefics3 / SmolVLM crops + global image)."""
from vlm.data.layouts import anyres, dynamic, idefics3, native  # noqa: F401  (registration)
from vlm.data.layouts.base import Layout, Views
from vlm.data.layouts.registry import LAYOUTS

__all__ = ["LAYOUTS", "Layout", "Views"]
