"""Activation checkpointing modes: ``full`` (recompute each block in the backward pass) and ``selective``.

``selective`` is PyTorch's selective activation checkpointing (``torch.utils.checkpoint.
create_selective_checkpoint_contexts``, PyTorch 2.4+) with the policy "keep what is expensive to recompute": the
outputs of matrix multiplications and of the attention kernels are kept; everything else inside a block (norms,
activation functions, rotary embeddings, residual adds, dtype casts) is recomputed from them in the backward pass.
On a Llama block that drops about 40 % of the saved activations (the MLP's activation output and gated product, the
norms' outputs and statistics) for the cost of re-running elementwise kernels, not matmuls; results and gradients are
bit-identical to no checkpointing (the same kernels run on the same inputs). ``vlm.bench train_step`` measures it.

Modes are spelled as in ``trainer.gradient_checkpointing``: ``False`` / ``"none"``, ``True`` / ``"full"``,
``"selective"``.
"""
from __future__ import annotations

import types
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

MODES = ("none", "full", "selective")

_aten = torch.ops.aten
#: ops whose outputs ``selective`` keeps (matmuls and fused attention kernels; the others may not exist on a build)
SAVED_OPS: frozenset[Any] = frozenset(
    getattr(getattr(_aten, name), "default")
    for name in ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                 "_scaled_dot_product_flash_attention_for_cpu", "_flash_attention_forward",
                 "_efficient_attention_forward", "convolution")
    if hasattr(_aten, name))


def mode(value: Any) -> str:
    """The canonical mode of a config value: ``False``/``None``/``"none"``/``"false"`` -> ``"none"``, ``True``/
    ``"true"``/``"full"`` -> ``"full"``, ``"selective"``. Raises ``ValueError`` naming the value otherwise."""
    if value is None or value is False:
        return "none"
    if value is True:
        return "full"
    text = str(value).strip().lower()
    canonical = {"false": "none", "none": "none", "true": "full", "full": "full", "selective": "selective"}
    if text not in canonical:
        raise ValueError(f"gradient_checkpointing={value!r}; expected one of false, true (= full), full, selective")
    return canonical[text]


def _policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def selective_context() -> tuple[Any, Any]:
    """The ``context_fn`` result of ``selective`` (a fresh pair of contexts per checkpointed call)."""
    return create_selective_checkpoint_contexts(_policy)


def checkpoint_kwargs(value: Any) -> dict[str, Any]:
    """Keyword arguments for ``torch.utils.checkpoint.checkpoint`` (non-reentrant) in mode ``value``
    (``"full"`` or ``"selective"``)."""
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if mode(value) == "selective":
        kwargs["context_fn"] = selective_context
    return kwargs


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    forward: Callable[..., Any] = type(self).forward
    if self.training and torch.is_grad_enabled():
        return checkpoint(forward, self, *args, **self._vlm_checkpoint_kwargs, **kwargs)
    return forward(self, *args, **kwargs)


def checkpoint_blocks(blocks: nn.ModuleList, value: Any = "full") -> bool:
    """Make every block of ``blocks`` recompute its activations in the backward pass (in training mode with grad
    enabled; eval and ``no_grad`` run the plain forward). Parameter names and state dicts are unchanged (the block's
    ``forward`` is rebound on the instance, so ``copy.deepcopy`` rebinds it to the copy). Returns ``False`` for mode
    ``"none"``."""
    if mode(value) == "none":
        return False
    for block in blocks:
        block._vlm_checkpoint_kwargs = checkpoint_kwargs(value)
        block.forward = types.MethodType(_checkpointed_forward, block)
    return True


def enable_for_transformers(model: Any, value: Any = "full") -> bool:
    """Turn on a transformers ``PreTrainedModel``'s own gradient checkpointing (its layers skip the KV cache while
    recomputing) in mode ``value``. Returns ``False`` (nothing changed) for ``"none"`` or a model that does not
    support it.

    transformers' switch also hooks the input embeddings so that their output requires grad
    (``enable_input_require_grads``). Only *reentrant* checkpointing needs that (a reentrant block whose inputs
    require no grad gives its parameters none); ours is non-reentrant, which differentiates a block's parameters
    whatever its inputs. With frozen embeddings (LLM policies ``frozen``, ``partial``, ``lora``, ``qlora``) the hook
    turns the lookup's output into a leaf that requires grad, so the in-place image injection
    (``HFCausalLM.inject``) failed ("a leaf Variable that requires grad is being used in an in-place operation")
    and a ``(B, L, D)`` gradient nobody reads was accumulated into it. The hook is removed again here (the public
    ``disable_input_require_grads``)."""
    if mode(value) == "none" or not getattr(model, "supports_gradient_checkpointing", False):
        return False
    kwargs = checkpoint_kwargs(value)
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5 name
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    disable_input_grads = getattr(model, "disable_input_require_grads", None)
    if disable_input_grads is not None:
        disable_input_grads()
    return True


__all__ = ["MODES", "SAVED_OPS", "mode", "checkpoint_kwargs", "checkpoint_blocks", "enable_for_transformers",
           "selective_context"]
