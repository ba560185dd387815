"""Key checks for free-form transformers config dicts (``hf_causal_lm``'s ``config:``, an encoder's ``config:``).

transformers config classes accept any keyword and keep unknown ones as plain attributes, so a typo such as
``num_hiden_layers`` is silently ignored and the default used. :func:`check_config_keys` refuses keys the config
class does not know, naming them, the ``model_type`` and the closest accepted keys.

The accepted set is derived from the config class itself, never from a hand-written per-family list:

- the ``__init__`` signatures (and dataclass fields) of the class and of every parent class;
- ``attribute_map`` (both the alias and the attribute it maps to, e.g. GPT-2's ``hidden_size`` -> ``n_embd``);
- public properties with a setter (``num_labels``, ``torch_dtype``, ``rope_scaling``, ...);
- the keys of a default instance's ``to_dict()`` (what ``save_pretrained`` writes);
- the generation parameters transformers still reads (and drops) from old config files;
- :data:`GENERIC_CONFIG_KEYS`: kwargs ``PretrainedConfig`` itself consumes for every model (legacy RoPE keys, token
  ids, ``torch_dtype``, ...).

Loading a local ``pretrained:`` directory does not go through this check: the directory's own ``config.json`` is
trusted. ``strict_config: false`` on the component skips it for exotic keys.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Iterable, Mapping
from typing import Any

from vlm.pretrained import FILE_KEYS
from vlm.registry import close_matches, did_you_mean

# kwargs ``PretrainedConfig`` handles for every model type (popped in its ``__init__``/``__post_init__`` or set as
# generic attributes), plus the bookkeeping keys ``save_pretrained`` writes
GENERIC_CONFIG_KEYS = frozenset({
    # bookkeeping written by save_pretrained / to_dict
    *FILE_KEYS, "model_type", "name_or_path", "_commit_hash",
    # generic model kwargs
    "tie_word_embeddings", "initializer_range", "max_position_embeddings", "layer_types", "use_cache",
    "bos_token_id", "pad_token_id", "eos_token_id", "sep_token_id", "decoder_start_token_id",
    # RoPE: the v5 dict and the legacy keys transformers converts into it
    "rope_parameters", "rope_theta", "rope_scaling", "partial_rotary_factor",
    # runtime switches PretrainedConfig pops from kwargs
    "output_attentions", "output_hidden_states", "return_dict", "attn_implementation", "experts_implementation",
    "per_layer_config", "tie_last_hidden_states", "num_labels", "id2label", "label2id", "problem_type",
})


def _signature_keys(cls: type) -> set[str]:
    keys: set[str] = set()
    for klass in cls.__mro__:
        if klass is object:
            continue
        init = klass.__dict__.get("__init__")
        if init is not None:
            try:
                params = inspect.signature(init).parameters.values()
            except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
                params = ()
            keys.update(p.name for p in params if p.name != "self"
                        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD))
        if dataclasses.is_dataclass(klass):
            keys.update(f.name for f in dataclasses.fields(klass))
        for name, value in vars(klass).items():
            if isinstance(value, property) and value.fset is not None and not name.startswith("_"):
                keys.add(name)
        attribute_map = vars(klass).get("attribute_map")
        if isinstance(attribute_map, Mapping):
            keys.update(attribute_map)
            keys.update(v for v in attribute_map.values() if isinstance(v, str))
    return keys


def _generation_keys() -> set[str]:
    """Generation parameters old config files carry; transformers reads and drops them."""
    from transformers import GenerationConfig

    defaults = getattr(GenerationConfig, "_get_default_generation_params", None)  # private: may change in transformers
    return set(defaults()) if callable(defaults) else set()


@functools.cache
def accepted_config_keys(config_class: type) -> frozenset[str]:
    """Every top-level key ``config_class(**kwargs)`` takes (see the module docstring for where they come from)."""
    keys = _signature_keys(config_class) | _generation_keys() | GENERIC_CONFIG_KEYS
    try:
        default = config_class().to_dict()
    except Exception:  # noqa: BLE001 - a config class whose defaults do not validate: the signature keys still apply
        default = {}
    return frozenset(keys | set(default))


def own_config_keys(config_class: type) -> list[str]:
    """The keys ``config_class`` adds over ``PretrainedConfig`` (its architecture knobs), in signature order."""
    from transformers import PretrainedConfig

    base = _signature_keys(PretrainedConfig)
    try:
        params = list(inspect.signature(config_class.__init__).parameters)
    except (TypeError, ValueError):  # pragma: no cover
        params = []
    own = [k for k in params if k != "self" and k not in base and k not in ("args", "kwargs")]
    extra = sorted(_signature_keys(config_class) - base - set(own) - {"args", "kwargs"})
    return own + extra


def unknown_config_keys(config_class: type, keys: Iterable[str]) -> list[str]:
    accepted = accepted_config_keys(config_class)
    return sorted(k for k in keys if k not in accepted)


def check_config_keys(config_class: type, config: Mapping[str, Any], what: str, model_type: str | None = None) -> None:
    """Raise ``TypeError`` (as ``vlm.registry`` does for an unknown argument) naming each key of ``config`` that
    ``config_class`` does not accept, the ``model_type``, close matches, and the escape hatch."""
    unknown = unknown_config_keys(config_class, config)
    if not unknown:
        return
    accepted = accepted_config_keys(config_class)
    model_type = model_type or getattr(config_class, "model_type", "") or config_class.__name__
    hints = [f"{key!r} ({did_you_mean(key, sorted(accepted))})" for key in unknown]
    raise TypeError(
        f"{what}: unknown config key(s) for model_type={model_type!r}: {', '.join(hints)}. transformers would ignore "
        f"them silently. Expected keys of transformers.{config_class.__name__}: {own_config_keys(config_class)}, or a "
        f"generic PretrainedConfig key (e.g. tie_word_embeddings, rope_theta, bos_token_id). If the key is meant "
        f"(an exotic/remote-code attribute), pass strict_config: false")


def config_class_for(model_type: str, what: str) -> type:
    """The transformers config class registered for ``model_type``; a ``ValueError`` with close matches if none."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        known = sorted(CONFIG_MAPPING.keys())
        close = close_matches(model_type, known)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"{what}: unknown model_type={model_type!r}{hint} (expected a transformers model type, "
                         f"e.g. llama, qwen2, qwen3, gemma, gpt2)")
    return CONFIG_MAPPING[model_type]
