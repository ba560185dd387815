"""Stage outputs: LoRA merged into the base weights, as a weights delta (to start the next stage) and as a full
``vlm.load``-able directory (``final/``).

``<stage dir>/weights.safetensors`` holds every tensor trained in this stage or an earlier one of the run (plain
names, adapters merged); a stage starts from a freshly built (seeded) model plus these tensors. Everything works
from a full (unsharded) state dict gathered on rank 0, so single-process, DDP and FSDP runs export the same way.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from vlm.train.checkpoint import STAGE_WEIGHTS, check_keys, save_tensors, unwrap  # noqa: F401 (STAGE_WEIGHTS: re-exported)

LORA_A, LORA_B, BASE = ".lora_A.", ".lora_B.", ".base_layer."


def plain_name(name: str) -> str:
    """The name a (possibly LoRA-wrapped) parameter has once adapters are merged."""
    if LORA_A in name or LORA_B in name:
        return name.split(LORA_A if LORA_A in name else LORA_B)[0] + ".weight"
    return name.replace(BASE, ".")


def merge_lora_state(state: dict[str, torch.Tensor], live: nn.Module) -> dict[str, torch.Tensor]:
    """Fold every LoRA pair of ``state`` into its base weight (``W + scaling * B @ A``) and drop adapter keys.

    ``scaling`` and ``fan_in_fan_out`` are read from the live adapter module, so the result matches peft's merge.
    """
    model = unwrap(live)
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if LORA_A in name or LORA_B in name:
            continue
        out[plain_name(name)] = value
    for name in state:
        if LORA_A not in name:
            continue
        prefix, rest = name.split(LORA_A)
        adapter = rest.split(".")[0]
        layer = model.get_submodule(prefix)
        a, b = state[name].float(), state[f"{prefix}{LORA_B}{adapter}.weight"].float()
        delta = (b @ a) * float(layer.scaling[adapter])
        if getattr(layer, "fan_in_fan_out", False):
            delta = delta.T
        key = f"{prefix}.weight"
        base = out[key]
        out[key] = (base.float() + delta).to(base.dtype)
    return out


def trained_names(live: nn.Module) -> set[str]:
    """Plain names of the tensors this stage changes: trainable parameters (a LoRA pair changes its base weight) and
    the persistent buffers of every module that trains a parameter of its own (BatchNorm running statistics: without
    them a later stage that freezes the module would see features normalized by fresh statistics)."""
    model = unwrap(live)
    names = {plain_name(n) for n, p in model.named_parameters() if p.requires_grad}
    for prefix, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            for b, _ in module.named_buffers(recurse=False):
                if b not in module._non_persistent_buffers_set:
                    names.add(plain_name(f"{prefix}.{b}" if prefix else b))
    return names


def write_stage_weights(path: Path, merged: dict[str, torch.Tensor], names: set[str]) -> None:
    save_tensors({k: merged[k] for k in sorted(names) if k in merged}, path)


def load_weights(model: nn.Module, source: str | Path) -> list[str]:
    """Load ``source`` into ``model`` (before policies): a ``.safetensors`` file, a stage dir (its weights delta), a
    ``vlm.load`` dir (``model.safetensors``) or a run dir (each finished stage's delta in order). Returns the files."""
    files = resolve_weights(Path(source))
    for f in files:
        state = load_file(str(f))
        check_keys(state, model, str(f))
        own = model.state_dict()
        bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape]
        if bad:
            why = vocab_mismatch(model, state) or "a different model or tokenizer?"
            raise ValueError(f"{f}: shapes differ from this model ({why}): {bad[:5]}")
        model.load_state_dict(state, strict=False)
    return [str(f) for f in files]


def vocab_mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """A sentence when ``state``'s token embedding or output head (the LLM's ``get_input_embeddings`` /
    ``get_output_embeddings``; tied ones are saved once, under either name) has another number of rows than
    ``model``'s: the checkpoint was trained with another tokenizer. ``None`` otherwise."""
    lm = getattr(getattr(model, "llm", None), "model", None)
    tables = [m.weight for m in (getattr(lm, "get_input_embeddings", lambda: None)(),
                                 getattr(lm, "get_output_embeddings", lambda: None)()) if m is not None]
    own = model.state_dict(keep_vars=True)
    name = next((n for n, t in own.items() if n in state and any(t is w for w in tables)), None)
    if name is None or state[name].shape[0] == own[name].shape[0]:
        return None
    return (f"its vocabulary has {state[name].shape[0]} tokens, this run's tokenizer {own[name].shape[0]}: the weights "
            f"were trained with another tokenizer; start from a directory that holds its tokenizer (a run's final/, "
            f"or the run itself), or configure the tokenizer it was trained with")


def is_original(source: Path) -> bool:
    """Whether ``source`` is a directory in a format ``vlm.interop.from_hf`` imports (``config.json`` with such a
    ``model_type``, not a vlm directory): a transformers or an original checkpoint (InternVL, Qwen-VL, ...)."""
    import json

    cfg_file = source / "config.json"
    if not (source.is_dir() and cfg_file.is_file()):
        return False
    try:
        cfg = json.loads(cfg_file.read_text())
    except ValueError:
        return False
    if not isinstance(cfg, dict) or cfg.get("format") == "vlm":
        return False
    from vlm.interop import supported_model_types

    return cfg.get("model_type") in supported_model_types()


def imported_weights(source: Path, import_dir: Path) -> Path:
    """``import_dir/model.safetensors``: the weights of the checkpoint directory ``source`` imported with
    ``vlm.interop.from_hf`` (its own dtype kept for safetensors), written once (atomically)."""
    import os

    out = import_dir / "model.safetensors"
    if out.is_file():
        return out
    from vlm.interop import from_hf
    from vlm.pretrained import check_weights

    dtype = None
    weights = check_weights(source, "init_from")
    if weights.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            first = next(iter(f.keys()), None)
            dtype = f.get_slice(first).get_dtype() if first is not None else None
    model = from_hf(source, dtype={"BF16": "bfloat16", "F16": "float16"}.get(dtype), tokenizer=False)
    import_dir.mkdir(parents=True, exist_ok=True)
    tmp = import_dir / f".model.{os.getpid()}.safetensors"
    save_tensors({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, out)
    return out


def resolve_weights(source: Path, import_dir: Path | None = None) -> list[Path]:
    """The weights files ``init_from=source`` names. A checkpoint directory vlm imports (``is_original``) is
    converted into ``import_dir`` (the run's ``init_from/``); without ``import_dir`` only its weights file is
    checked to exist."""
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise FileNotFoundError(f"init_from={str(source)!r} does not exist")
    if is_original(source):
        if import_dir is None:
            from vlm.pretrained import check_weights

            return [check_weights(source, "init_from")]
        return [imported_weights(source, import_dir)]
    for name in (STAGE_WEIGHTS, "model.safetensors"):
        if (source / name).is_file():
            return [source / name]
    if (source / "final" / "model.safetensors").is_file():
        return [source / "final" / "model.safetensors"]
    stages = sorted((d for d in source.iterdir() if (d / STAGE_WEIGHTS).is_file()),
                    key=lambda d: (d / STAGE_WEIGHTS).stat().st_mtime)
    if stages:
        return [stages[-1] / STAGE_WEIGHTS]  # deltas are cumulative: the last finished stage has everything
    raise FileNotFoundError(f"init_from={str(source)!r}: no weights found (expected a .safetensors file, a vlm.load "
                            f"directory, a stage directory with {STAGE_WEIGHTS}, or a run directory)")


def plain_model(live: nn.Module, merged: dict[str, torch.Tensor], tokenizer: Any = None) -> nn.Module:
    """A plain ``VLM`` (no adapters, no wrappers) holding ``merged``, built on the meta device (no extra init)."""
    from vlm.compose import from_config

    model = unwrap(live)
    with torch.device("meta"):
        plain = from_config(model.config.to_dict())
    # assign=True keeps the given tensors: a view into a larger buffer (FSDP's gathered state dict hands small
    # parameters back that way) gets its own copy, or safetensors refuses to save it
    plain.load_state_dict({k: v if v.untyped_storage().nbytes() == v.numel() * v.element_size() else v.clone()
                           for k, v in merged.items()}, strict=True, assign=True)
    if hasattr(plain.llm.model, "tie_weights"):
        plain.llm.model.tie_weights()
    live_buffers = dict(model.named_buffers())
    for name, buf in list(plain.named_buffers()):
        if buf.is_meta:  # non-persistent buffers (rotary frequencies, position ids) are not in state dicts
            parent, _, attr = name.rpartition(".")
            owner = plain.get_submodule(parent) if parent else plain
            owner._buffers[attr] = live_buffers[name].detach().to("cpu").clone()
    plain.tokenizer = tokenizer
    return plain


def image_preprocessing(image_processor: Any) -> dict[str, Any] | None:
    """The ``VLM.image_preprocessing`` record of an ``ImageProcessor``'s geometry (``resize_mode``, plus
    ``pad_color`` under ``pad``, plus ``tiling`` when it tiles); ``None`` for a processor that does not state a
    ``resize_mode``."""
    mode = getattr(image_processor, "resize_mode", None)
    if mode is None:
        return None
    record: dict[str, Any] = {"resize_mode": mode}
    if mode == "pad":
        record["pad_color"] = [int(c) for c in image_processor.pad_color]
    if getattr(image_processor, "tiling", None) is not None:
        record["tiling"] = {k: list(v) if isinstance(v, tuple) else v for k, v in image_processor.tiling.items()}
    return record


def export_final(directory: Path, live: nn.Module, merged: dict[str, torch.Tensor], tokenizer: Any,
                 template: Any = None, image_processor: Any = None, image_placement: Any = None,
                 video_processor: Any = None) -> Path:
    """Write a ``vlm.load``-able directory from the merged full state dict. With the stage's chat ``template``, the
    directory's tokenizer carries it as its Jinja chat template and its end of turn is a saved stop id
    (``VLM.set_template``); with the stage's ``image_processor``, its geometry is recorded
    (``VLM.image_preprocessing``); with the data's ``image_placement`` (``vlm.data.image_placement``), chat and the Jinja
    template join a turn's images and text as the data did (``VLM.image_placement``). So ``vlm.load`` and an export of
    the directory answer as the run's evaluation did. With the stage's ``video_processor``, its sampling and budget
    options are recorded too (``image_preprocessing["video"]``, what ``Processor.for_model`` reads back)."""
    plain = plain_model(live, merged, copy.deepcopy(tokenizer) if tokenizer is not None else None)
    if image_placement is not None:
        plain.image_placement = image_placement  # before set_template: its Jinja writes the placement
    if template is not None and tokenizer is not None:
        plain.set_template(template)
    record = image_preprocessing(image_processor)
    if record is not None:
        plain.image_preprocessing = record
    if video_processor is not None:
        from vlm.data.video import PER_VIDEO

        plain.image_preprocessing = {**plain.image_preprocessing,
                                     "video": {k: video_processor.options[k] for k in PER_VIDEO}}
    return plain.save_pretrained(directory)
