"""Which keyword arguments a transformers model's ``forward`` accepts, asked of its signature.

A transformers forward declares its named parameters and then ``**kwargs: Unpack[TransformersKwargs]`` (a
``TypedDict`` of the documented pass-throughs: ``num_items_in_batch``, ``output_attentions``,
``output_hidden_states``, the flash-attention ``cu_seq_lens_*`` ...). Anything else it takes into ``**kwargs`` and
ignores, so a misspelt or retired keyword changes nothing without a word. :func:`accepted_keywords` gives the names
that do reach the model, so the caller can refuse the others.
"""
from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from typing import Any

# Keywords transformers' forward decorators take before the signature sees them: ``return_dict``
# (``can_return_tuple``) and the old names of the cache argument (``past_key_values`` / ``cache_params``, renamed
# ``cache`` with a deprecation shim).
DECORATOR_KEYWORDS = frozenset({"return_dict", "past_key_values", "cache_params"})


def _typed_dict_keys(annotation: Any) -> frozenset[str] | None:
    """The keys of ``Unpack[SomeTypedDict]`` (or of a bare ``TypedDict``); ``None`` for anything else."""
    for candidate in (annotation, *typing.get_args(annotation)):
        keys = getattr(candidate, "__required_keys__", None)
        if keys is not None:
            return frozenset(keys) | frozenset(getattr(candidate, "__optional_keys__", ()))
    return None


def transformers_kwargs() -> frozenset[str] | None:
    """The keys of transformers' ``TransformersKwargs`` (the pass-throughs every model documents), or ``None``
    when this transformers has none."""
    try:
        from transformers.utils import TransformersKwargs
    except ImportError:  # pragma: no cover - an older transformers
        return None
    return _typed_dict_keys(TransformersKwargs)


def accepted_keywords(fn: Callable[..., Any]) -> frozenset[str] | None:
    """The keyword names ``fn`` accepts: its named parameters, the keys of its ``**kwargs: Unpack[TypedDict]``
    (transformers' ``TransformersKwargs`` when ``**kwargs`` carries no such annotation) and
    :data:`DECORATOR_KEYWORDS`. ``None`` when that cannot be told (``**kwargs`` unannotated and no
    ``TransformersKwargs``): every keyword may then be used. Asked once per function (cached)."""
    return _accepted(getattr(fn, "__func__", fn))


@functools.lru_cache(maxsize=256)
def _accepted(fn: Callable[..., Any]) -> frozenset[str] | None:
    params = [p for p in inspect.signature(fn).parameters.values() if p.name != "self"]
    named = frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    var_kw = next((p for p in params if p.kind is p.VAR_KEYWORD), None)
    if var_kw is None:
        return named
    extra = _typed_dict_keys(var_kw.annotation)
    if extra is None:
        extra = transformers_kwargs()
    return None if extra is None else named | extra | DECORATOR_KEYWORDS
