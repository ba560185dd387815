"""Per-module training policies: which parameters of the encoder / connector / LLM a stage trains.

``frozen``  nothing trained.
``full``    every parameter trained.
``lora``    base weights frozen, peft LoRA adapters injected into the module's inner transformers model
            (``model.llm.model``, ``model.encoder.model``) with ``peft.inject_adapter_in_model``.
``qlora``   ``lora`` on top of bitsandbytes 4-bit (NF4) base weights; CUDA only (checked before anything is built).
``partial`` the module's main layer stack from layer ``partial_from.<module>`` on (negative: counted from the end),
            plus what comes after the stack (the final norm); the embeddings and earlier layers stay frozen.

Policies are looked up in ``POLICIES`` (exact names). A stage applies them to a freshly built model; adapters left by
an earlier stage never reach this point (stage outputs are saved with LoRA merged into the base weights).
"""
from __future__ import annotations

import importlib.util
from typing import Any

import torch
from torch import nn

from vlm.registry import Registry
from vlm.train.schema import MODULES, StageConfig


class Policy:
    """A training policy for one module. ``check`` runs before the model is built; ``apply`` after."""

    def check(self, module_name: str, stage: StageConfig, device: torch.device | None = None) -> None:
        """Raise a clear error (``ValueError`` / ``RuntimeError``) if this policy cannot run for ``module_name``.
        ``device=None`` (when a config is composed): the config alone; with the run's ``device``: what it needs
        there too."""

    def apply(self, module: nn.Module, module_name: str, stage: StageConfig) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


POLICIES: Registry[Policy] = Registry("policy")


@POLICIES.register("frozen")
class Frozen(Policy):
    def apply(self, module: nn.Module, module_name: str, stage: StageConfig) -> None:
        module.requires_grad_(False)


@POLICIES.register("full")
class Full(Policy):
    def apply(self, module: nn.Module, module_name: str, stage: StageConfig) -> None:
        module.requires_grad_(True)


def layer_stack(module: nn.Module) -> tuple[str, nn.ModuleList | nn.Sequential]:
    """The module's main stack of blocks: what the component states (an encoder's ``blocks()``, an LLM's
    ``decoder_layers()``), else the longest ``ModuleList``/``Sequential`` (ties: the first found)."""
    for stated in ("blocks", "decoder_layers"):
        layers = getattr(module, stated, None)
        layers = layers() if callable(layers) else None
        if layers is not None and len(layers) > 0:
            name = next((n for n, m in module.named_modules() if m is layers), stated)
            return name, layers
    best: tuple[str, Any] | None = None
    for name, child in module.named_modules():
        if isinstance(child, (nn.ModuleList, nn.Sequential)) and len(child) > 0:
            if best is None or len(child) > len(best[1]):
                best = (name, child)
    if best is None:
        raise ValueError(f"policy 'partial': {type(module).__name__} has no ModuleList/Sequential of layers")
    return best


@POLICIES.register("partial")
class Partial(Policy):
    def apply(self, module: nn.Module, module_name: str, stage: StageConfig) -> None:
        start = int(getattr(stage.partial_from, module_name))
        name, layers = layer_stack(module)
        n = len(layers)
        first = start + n if start < 0 else start
        if not 0 <= first < n:
            raise ValueError(f"partial_from.{module_name}={start} is out of range for {n} layers in "
                             f"{module_name}.{name}")
        module.requires_grad_(False)
        for layer in list(layers)[first:]:
            layer.requires_grad_(True)
        # what comes after the stack (final norm, ...): named_parameters lists a tied weight once, at its first use
        last = {id(p) for p in layers[-1].parameters()}
        seen_last = False
        for _, p in module.named_parameters():
            if id(p) in last:
                seen_last = True
            elif seen_last:
                p.requires_grad_(True)


def lora_host(module: nn.Module) -> nn.Module:
    """The transformers model inside a component (``.model``), where adapters are injected."""
    return getattr(module, "model", module)


def lora_config(stage: StageConfig) -> Any:
    from peft import LoraConfig

    lora = stage.lora
    targets = lora.target_modules
    if not isinstance(targets, str):
        targets = list(targets)
    return LoraConfig(r=int(lora.r), lora_alpha=int(lora.alpha), lora_dropout=float(lora.dropout),
                      target_modules=targets, use_rslora=bool(lora.use_rslora), bias="none")


def component_family(module_name: str) -> type[nn.Module]:
    """The base class every component at ``model.<module_name>`` derives from (what the family can do)."""
    from vlm.connectors.base import Connector
    from vlm.encoders.base import VisionEncoder
    from vlm.llm.hf_causal_lm import HFCausalLM

    return {"encoder": VisionEncoder, "connector": Connector, "llm": HFCausalLM}[module_name]


def _no_lora(module_name: str) -> ValueError:
    return ValueError(f"policy 'lora' needs a component that holds a transformers model (the encoder or the LLM); "
                      f"the {module_name} does not support LoRA: train the {module_name} with 'full'")


@POLICIES.register("lora")
class Lora(Policy):
    def check(self, module_name: str, stage: StageConfig, device: torch.device | None = None) -> None:
        if not component_family(module_name).supports_lora:
            raise _no_lora(module_name)

    def apply(self, module: nn.Module, module_name: str, stage: StageConfig) -> None:
        from peft import inject_adapter_in_model

        if not getattr(module, "supports_lora", False):
            raise _no_lora(module_name)
        module.requires_grad_(False)
        host = lora_host(module)
        try:
            inject_adapter_in_model(lora_config(stage), host)
        except ValueError as e:
            raise ValueError(f"LoRA on {module_name}: {e} (stage.*.lora.target_modules="
                             f"{stage.lora.target_modules!r})") from e
        for name, p in host.named_parameters():
            p.requires_grad_("lora_" in name)


@POLICIES.register("qlora")
class QLora(Lora):
    def check(self, module_name: str, stage: StageConfig, device: torch.device | None = None) -> None:
        super().check(module_name, stage, device)
        if device is None:
            return
        if device.type != "cuda":
            raise RuntimeError(f"policy 'qlora' ({module_name}) needs a CUDA device (bitsandbytes 4-bit); this run "
                               f"is on {device.type}. Use policy 'lora' here, or run on a GPU.")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise RuntimeError("policy 'qlora' needs bitsandbytes: pip install -e '.[qlora]'")

    def apply(self, module: nn.Module, module_name: str, stage: StageConfig) -> None:
        quantize_4bit(lora_host(module))
        super().apply(module, module_name, stage)


def quantize_4bit(model: nn.Module, compute_dtype: torch.dtype = torch.bfloat16) -> None:
    """Replace the ``nn.Linear`` layers of a transformers model (except the output head) by NF4 ``Linear4bit``.

    Weights are quantized when moved to CUDA (bitsandbytes quantizes ``Params4bit`` on ``.cuda()``).
    """
    import bitsandbytes as bnb

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, child in list(model.named_modules()):
        if not isinstance(child, nn.Linear) or child is head:
            continue
        q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                              compute_dtype=compute_dtype, quant_type="nf4", device="cpu")
        q.weight = bnb.nn.Params4bit(child.weight.data.to("cpu"), requires_grad=False, quant_type="nf4")
        if child.bias is not None:
            q.bias = nn.Parameter(child.bias.data, requires_grad=False)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, q.cuda())


def check_policies(stage: StageConfig, device: torch.device | None = None) -> None:
    """Validate a stage's policies before anything is built: unknown names and the config (``device=None``, at
    compose time), or what they need on the run's ``device`` (qlora: CUDA). Raises ``ValueError`` /
    ``RuntimeError`` starting with ``policy.<module>=<name>``."""
    for module_name in MODULES:
        name = getattr(stage.policy, module_name)
        try:
            policy = POLICIES.get(name)
        except KeyError as e:
            raise ValueError(f"policy.{module_name}={name!r}: {e.args[0]}") from None
        try:
            policy().check(module_name, stage, device)
        except (ValueError, RuntimeError) as e:
            raise type(e)(f"policy.{module_name}={name!r}: {e}") from e


def apply_policies(model: nn.Module, stage: StageConfig) -> dict[str, str]:
    """Set ``requires_grad`` (and inject adapters) on ``model.encoder/connector/llm`` per ``stage.policy``. A
    model's arrangement (``vlm.arrangements``: e.g. LLaVA-NeXT's ``image_newline``) trains with the connector:
    frozen when the connector is, else whole."""
    applied = {}
    for module_name in MODULES:
        name = getattr(stage.policy, module_name)
        POLICIES.get(name)().apply(getattr(model, module_name), module_name, stage)
        applied[module_name] = name
    arrangement = getattr(model, "arrangement", None)
    if arrangement is not None:
        arrangement.requires_grad_(stage.policy.connector != "frozen")
    freeze_unused_encoder_layers(model)
    return applied


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every LoRA adapter into its base layer and put the plain base layer back (in place)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, child in list(model.named_modules()):
        if not isinstance(child, BaseTunerLayer):
            continue
        child.merge()
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, child.get_base_layer())
    return model


def trainable_summary(model: nn.Module) -> dict[str, dict[str, int]]:
    """``{module: {"trainable": n, "total": n}}`` for the encoder, connector and LLM."""
    out = {}
    for module_name in MODULES:
        params = list(getattr(model, module_name).parameters())
        out[module_name] = {"trainable": sum(p.numel() for p in params if p.requires_grad),
                            "total": sum(p.numel() for p in params)}
    return out


def freeze_unused_encoder_layers(model: nn.Module) -> list[str]:
    """Freeze the tower's blocks after the deepest ``feature_layer`` used, and what follows them (post-norm, head).

    Their outputs never reach the connector, so training them only wastes memory (and DDP rejects parameters that
    receive no gradient). Returns the names frozen.
    """
    encoder = model.encoder
    layers_used = getattr(encoder, "layers", None)
    stack = encoder.blocks()
    if layers_used is None or stack is None:
        return []
    n = len(stack)
    depth = max(i if i >= 0 else n + 1 + i for i in layers_used)  # hidden_states[k] = output of block k-1
    unused = {id(p) for layer in list(stack)[depth:] for p in layer.parameters()}
    last = {id(p) for p in stack[-1].parameters()}
    frozen, after = [], False
    for name, p in encoder.named_parameters():
        if id(p) in last:
            after = True
        elif after:
            unused.add(id(p))
        if id(p) in unused and p.requires_grad:
            p.requires_grad_(False)
            frozen.append(f"encoder.{name}")
    return frozen
