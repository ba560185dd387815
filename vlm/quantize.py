"""Weight-only quantization for inference: ``vlm.load(DIR, quantize="int8" | "int4" | "nf4")``.

One entry per scheme in ``SCHEMES`` (a registry, looked up by exact name), each delegating to a maintained library:

========  =====================  ==============  ===========================================================
scheme    library                devices         storage of one weight
========  =====================  ==============  ===========================================================
``int8``  torchao                cpu, cuda       int8 + one fp scale and int8 zero point per output channel
``int4``  optimum-quanto         cpu, cuda       4 bits, two per byte (uint8), + fp scale and shift per group
``nf4``   bitsandbytes           cuda            NF4, two per byte, + one absmax per block of 64 (QLoRA's)
========  =====================  ==============  ===========================================================

What is quantized: every ``nn.Linear`` of the language model except its output head (``quantize_head=True``
includes it; a head tied to the input embeddings cannot be); the vision tower's with ``quantize_vision=True``.
Embeddings, norms, biases and the connector stay in the model's dtype. Activations are not quantized (weight-only);
``int4`` on CPU unpacks and dequantizes its packed weights on every call: it saves memory, not time.

A quantized model is for inference: ``save_pretrained`` refuses it (saving the dequantized weights would silently
write lossy fp32 weights; saving the packed ones would write a directory ``vlm.load`` cannot read). Save the
unquantized model and pass ``quantize=`` again when loading.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from vlm.registry import Registry


@dataclass(frozen=True)
class Scheme:
    """One quantization scheme: ``apply(model, names, device)`` replaces or quantizes the ``nn.Linear`` modules of
    ``model`` named ``names`` (fully qualified) in place, on ``device``; ``devices`` are the device types it runs on;
    ``library`` the package it needs (its import name)."""

    name: str
    library: str
    devices: tuple[str, ...]
    storage: str
    apply: Callable[[nn.Module, list[str], torch.device], None]


SCHEMES: Registry[Scheme] = Registry("quantization scheme")


def _register(scheme: Scheme) -> Scheme:
    SCHEMES.register(scheme.name)(lambda: scheme)
    return scheme


def _torchao_int8(model: nn.Module, names: list[str], device: torch.device) -> None:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    wanted = set(names)
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda module, fqn: fqn in wanted, device=device)


def _quanto_int4(model: nn.Module, names: list[str], device: torch.device) -> None:
    from optimum.quanto import freeze, qint4, quantize

    quantize(model, weights=qint4, include=names)  # exact module names (fnmatch patterns without wildcards)
    freeze(model)  # quantize and pack the weights now: the fp weights are dropped
    for name in names:
        _outside_inference_mode(model.get_submodule(name))


def _outside_inference_mode(module: nn.Module) -> None:
    """optimum-quanto 0.2.7's packed weights fail under ``torch.inference_mode`` ("Cannot set version_counter for
    inference tensor"): run the layer's own forward with inference mode off and gradients off instead, so callers
    may use either."""
    inner = module.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(False), torch.no_grad():
            return inner(x)

    module.forward = forward


def _bnb_nf4(model: nn.Module, names: list[str], device: torch.device) -> None:
    import bitsandbytes as bnb

    for name in names:
        child = model.get_submodule(name)
        dtype = child.weight.dtype
        q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                              compute_dtype=dtype, quant_type="nf4", device="cpu")
        q.weight = bnb.nn.Params4bit(child.weight.data.to("cpu"), requires_grad=False, quant_type="nf4")
        if child.bias is not None:
            q.bias = nn.Parameter(child.bias.data.to("cpu"), requires_grad=False)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, q.to(device))  # quantized on .to(cuda)


INT8 = _register(Scheme("int8", "torchao", ("cpu", "cuda"),
                        "int8 per output channel (scale + zero point each)", _torchao_int8))
INT4 = _register(Scheme("int4", "optimum.quanto", ("cpu", "cuda"),
                        "4-bit packed two per byte, scale + shift per group of up to 128 inputs", _quanto_int4))
NF4 = _register(Scheme("nf4", "bitsandbytes", ("cuda",), "NF4 packed two per byte, absmax per 64", _bnb_nf4))


def accepted(device: torch.device | str | None = None) -> list[str]:
    """The scheme names that run on ``device`` (every registered one when ``None``)."""
    kind = None if device is None else torch.device(device).type
    return [n for n in SCHEMES.names() if kind is None or kind in SCHEMES.get(n)().devices]


def scheme_for(name: Any, device: torch.device | str | None = None) -> Scheme:
    """The ``Scheme`` named ``name``, checked to run on ``device`` with its library installed. ``ValueError`` naming
    the accepted values (for this device) otherwise; ``ImportError`` naming the package to install."""
    if not isinstance(name, str) or name not in SCHEMES:
        raise ValueError(f"quantize={name!r} is not a quantization scheme; accepted: None (no quantization), "
                         f"{', '.join(repr(n) for n in SCHEMES.names())}")
    scheme = SCHEMES.get(name)()
    kind = torch.device(device if device is not None else "cpu").type
    if kind not in scheme.devices:
        raise ValueError(f"quantize={name!r} ({scheme.library}) runs on {' / '.join(scheme.devices)} only; this model "
                         f"is on {kind}, where the accepted schemes are: {', '.join(map(repr, accepted(kind)))}")
    if importlib.util.find_spec(scheme.library.split(".")[0]) is None:
        raise ImportError(f"quantize={name!r} needs the {scheme.library} package (pip install "
                          f"{scheme.library.replace('.', '-')}); not installed here")
    return scheme


def target_names(model: nn.Module, *, vision: bool = False, head: bool = False) -> list[str]:
    """Fully qualified names of the ``nn.Linear`` modules a scheme quantizes in a ``VLM``: the LLM's except its
    output head (unless ``head``), plus the vision encoder's when ``vision``. ``ValueError`` when there is none or
    a tied head is asked for."""
    head_module = model.llm.output_head
    if head and head_module.weight is model.llm.model.get_input_embeddings().weight:
        raise ValueError("quantize_head=True: this LLM ties its output head to the input embeddings; quantizing the "
                         "head would quantize the embeddings too (not supported). Leave quantize_head=False.")
    parts = [("llm", model.llm)] + ([("encoder", model.encoder)] if vision else [])
    names = [f"{prefix}.{name}" for prefix, part in parts for name, m in part.named_modules()
             if isinstance(m, nn.Linear) and (head or m is not head_module)]
    if not names:
        raise ValueError(f"quantize: the model has no nn.Linear layers to quantize in "
                         f"{' and '.join(p for p, _ in parts)} (its LLM {type(model.llm.model).__name__} may use "
                         f"another layer type)")
    return names


def quantize_model(model: nn.Module, scheme: str, *, vision: bool = False, head: bool = False,
                   device: torch.device | str | None = None) -> nn.Module:
    """Quantize ``model`` (a ``VLM``, already on ``device``) in place with ``scheme`` and return it, in eval mode.
    Records ``model.quantization`` (scheme, library, the quantized module names)."""
    if getattr(model, "quantization", None):
        raise ValueError(f"quantize: the model is already quantized ({model.quantization['scheme']})")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    chosen = scheme_for(scheme, device)
    names = target_names(model, vision=vision, head=head)
    with torch.no_grad():
        chosen.apply(model, names, device)
    model.quantization = {"scheme": chosen.name, "library": chosen.library, "modules": names, "vision": vision,
                          "head": head}
    return model.eval()


def storage_bytes(t: Any) -> int:
    """Bytes a (possibly quantized) tensor holds in memory: a plain tensor's ``numel * element_size``; a tensor
    subclass (torchao, quanto) the sum over its inner tensors (packed data, scales, zero points), recursively;
    a bitsandbytes ``Params4bit`` its packed data plus its quantization state's tensors."""
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, nn.Parameter):
        inner, _ = t.__tensor_flatten__()
        return sum(storage_bytes(getattr(t, name)) for name in inner)
    total = t.numel() * t.element_size()
    state = getattr(t, "quant_state", None)
    if state is not None:
        todo = [state]
        while todo:
            s = todo.pop()
            for v in vars(s).values():
                if isinstance(v, torch.Tensor):
                    total += v.numel() * v.element_size()
                elif hasattr(v, "absmax"):  # a nested state (double quantization)
                    todo.append(v)
    return total


def linear_weight_bytes(model: nn.Module, names: list[str]) -> dict[str, int]:
    """``{"bytes": stored, "fp32_bytes": numel * 4}`` of the weights (not biases) of the modules ``names``."""
    stored = fp32 = 0
    for name in names:
        module = model.get_submodule(name)
        stored += storage_bytes(module.weight)
        fp32 += module.in_features * module.out_features * 4  # the weight's shape (bitsandbytes stores it flat)
    return {"bytes": stored, "fp32_bytes": fp32}
