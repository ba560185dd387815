"""Feature arrangements (``vlm.arrangements.base``): how one image's view tokens become its token sequence, one file
per arrangement, registered in ``ARRANGEMENTS`` (``anyres_grid``: LLaVA-NeXT's spatial grid, unpadding and
``image_newline``; ``onevision``: LLaVA-OneVision's single-image / multi-image / video layouts).
``build(cfg, dim=...)``; a model without one (``arrangement: null``) joins its views' tokens."""
from typing import Any

from vlm.arrangements import anyres_grid, onevision  # noqa: F401  (registration)
from vlm.arrangements.base import Arrangement
from vlm.arrangements.registry import ARRANGEMENTS
from vlm.registry import to_dict


def build(cfg: Any, *, dim: int | None = None) -> Arrangement:
    """Build ``cfg`` (``name`` + the arrangement's arguments); ``dim`` (the LLM's hidden size) fills ``dim`` when
    ``cfg`` has none."""
    cfg = to_dict(cfg)
    if dim is not None:
        cfg.setdefault("dim", dim)
    return ARRANGEMENTS.build(cfg)


__all__ = ["ARRANGEMENTS", "Arrangement", "build"]
