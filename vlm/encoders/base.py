"""The vision-encoder contract: ``forward(pixel_values (N, 3, H, W)) -> (N, T, C)``."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

SELECT_STRATEGIES = ("patch", "all", "llava_default")


def as_pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


class VisionEncoder(nn.Module):
    """Base class of every vision tower.

    Subclasses set ``hidden_size`` (channels ``C`` of the output, after concatenating feature layers),
    ``patch_size``, ``image_size`` (default square input side), ``has_cls``, ``image_mean`` / ``image_std``,
    ``select`` and implement ``encode(pixel_values) -> (N, T_all, C)`` returning tokens *before* selection.
    ``grid(image_size)`` floors ``H / patch_size`` and ``W / patch_size`` as a patch convolution does; the sizes a
    tower accepts are its ``check_image_size`` rule (default: multiples of the patch size).

    ``select``: ``patch`` drops the prefix tokens (CLS, registers) only when the backbone has them; ``all`` keeps
    every token; ``llava_default`` always drops token 0 (LLaVA's "default" strategy; on a tower without CLS such as SigLIP this
    drops a real patch — it exists only to import such LLaVA checkpoints exactly).
    """

    hidden_size: int
    patch_size: int
    image_size: int
    has_cls: bool = False
    #: prefix tokens after the CLS token (registers, a distillation token); ``select='patch'`` drops them too
    num_register_tokens: int = 0
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    select: str = "patch"
    #: the LoRA policies inject adapters into the tower's inner model (``self.model``)
    supports_lora: bool = True

    @property
    def component_name(self) -> str:
        """The registry name (``clip``, ``siglip``, ...) for error messages."""
        return getattr(self, "registry_name", type(self).__name__)

    def grid(self, image_size: int | tuple[int, int] | None = None) -> tuple[int, int]:
        """Patch grid ``(h, w)`` the backbone produces for an input of ``image_size`` (``(H, W)`` or a square side;
        default: the encoder's ``image_size``).

        ``h = H // patch_size`` and ``w = W // patch_size``: a patch embedding is a convolution with
        ``stride = kernel = patch_size``, which floors (e.g. SigLIP So400m/14 at 384 px -> 27 x 27). Which sizes a
        tower accepts is its ``check_image_size`` rule; a size it cannot take raises ``ValueError`` naming the size
        and what was expected. Every size must hold at least one patch.
        """
        h, w = as_pair(self.image_size if image_size is None else image_size)
        p = self.patch_size
        if h < p or w < p:
            raise ValueError(f"{self.component_name} encoder: image size {(h, w)} is smaller than one {p}x{p} patch; "
                             f"expected H and W >= {p} (the encoder's image_size is {self.image_size})")
        grid = (h // p, w // p)
        self.check_image_size((h, w), grid)
        return grid

    def set_common_options(self, *, norm: tuple[Any, Any] | None = None, image_mean: Any = None, image_std: Any = None,
                           dtype: str | None = None, freeze: bool = False) -> None:
        """The options every tower takes, applied in one order at the end of its ``__init__``: normalization
        constants (``norm = (mean, std)`` read from a checkpoint, then explicit ``image_mean`` / ``image_std`` over
        them), the parameter ``dtype`` of ``self.model`` (``"bfloat16"``, ...), and ``freeze`` (no parameter trains)."""
        if norm is not None:
            self.image_mean, self.image_std = tuple(norm[0]), tuple(norm[1])
        if image_mean is not None:
            self.image_mean = tuple(image_mean)
        if image_std is not None:
            self.image_std = tuple(image_std)
        if dtype is not None:
            from vlm.dtypes import resolve_dtype

            self.model.to(resolve_dtype(dtype))
        if freeze:
            self.requires_grad_(False)

    def check_image_size(self, size: tuple[int, int], grid: tuple[int, int]) -> None:
        """Raise ``ValueError`` if the backbone cannot take an input of ``size = (H, W)`` (floored patch ``grid``).

        Default rule: ``H`` and ``W`` must be multiples of ``patch_size`` (towers that patchify by reshaping, or whose
        strides vary by architecture). Towers whose patch convolution floors override this (see ``HFVisionEncoder``).
        """
        p = self.patch_size
        if size[0] % p or size[1] % p:
            down = (grid[0] * p, grid[1] * p)
            up = (-(-size[0] // p) * p, -(-size[1] // p) * p)
            raise ValueError(f"{self.component_name} encoder: image size {size} is not divisible by the patch size "
                             f"{p}; expected H and W multiples of {p}: resize the image to e.g. {down[0]}x{down[1]} "
                             f"or {up[0]}x{up[1]}")

    def num_tokens(self, image_size: int | tuple[int, int] | None = None) -> int:
        """Number of output tokens ``T`` for one image of ``image_size``."""
        h, w = self.grid(image_size)
        return h * w + self.num_prefix_tokens - self.num_dropped

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens in ``encode``'s output: the CLS token (``has_cls``) + ``num_register_tokens``
        (registers, a distillation token)."""
        return int(self.has_cls) + self.num_register_tokens

    @property
    def num_dropped(self) -> int:
        """How many leading tokens ``select`` removes: every prefix token for ``patch``, token 0 for
        ``llava_default``, none for ``all``."""
        return {"patch": self.num_prefix_tokens, "llava_default": 1}.get(self.select, 0)

    @property
    def drops_first(self) -> bool:
        """Whether ``select`` removes token 0."""
        return self.num_dropped > 0

    def check_pixels(self, pixel_values: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``pixel_values`` is ``(N, 3, H, W)`` with a size the backbone takes."""
        name = self.component_name
        if pixel_values.ndim != 4:
            raise ValueError(f"{name} encoder: pixel_values must have shape (N, 3, H, W); got rank "
                             f"{pixel_values.ndim} shape {tuple(pixel_values.shape)}")
        if pixel_values.shape[1] != 3:
            raise ValueError(f"{name} encoder: pixel_values must have 3 channels at dim 1, shape (N, 3, H, W); got "
                             f"{pixel_values.shape[1]} channels, shape {tuple(pixel_values.shape)}")
        self.grid(tuple(pixel_values.shape[-2:]))

    def apply_select(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(N, T_all, C) -> (N, T, C)`` according to ``select``."""
        return tokens[:, self.num_dropped:]

    def blocks(self) -> nn.ModuleList | None:
        """The tower's stack of transformer blocks in order (the output of block ``k`` is hidden state ``k + 1``, the
        index ``feature_layer`` counts in), or ``None`` when the tower has no such stack (a CNN)."""
        return None

    def enable_gradient_checkpointing(self, mode: bool | str = "full") -> bool:
        """Recompute the tower's activations in the backward pass, each block of :meth:`blocks` as one region
        (``mode``: ``"full"`` or ``"selective"``, see ``vlm.recompute``); ``False`` (nothing changed) when the tower
        has no blocks (a CNN)."""
        from vlm.recompute import checkpoint_blocks

        blocks = self.blocks()
        return False if blocks is None else checkpoint_blocks(blocks, mode)

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W) -> (N, T, C)``."""
        self.check_pixels(pixel_values)
        return self.apply_select(self.encode(pixel_values))

    def export_config(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError
