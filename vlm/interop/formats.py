"""The transformers formats ``vlm`` imports and exports: one ``HFFormat`` per transformers model family.

A format module (``vlm/interop/llava.py``, ...) registers itself with ``@FORMATS.register(name)`` on a class that
states its ``model_type`` (what ``config.json`` says) and implements ``from_hf`` / ``to_hf`` / ``problems``.
``vlm.interop.from_hf(path)`` reads ``config.json`` and dispatches on its ``model_type``; ``vlm.interop.to_hf(model,
path)`` asks every format whether it can hold the model (``problems(model) == []``) and uses the first that can,
or the one named with ``format=``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import torch

from vlm.registry import Registry, did_you_mean


class HFFormat:
    """One transformers model family ``vlm`` converts to and from (exact: identical logits both ways)."""

    #: ``config.json``'s ``model_type`` of this family's directories (e.g. ``"llava"``)
    model_type: ClassVar[str]
    #: the transformers class a directory of this format loads with (for messages and docs)
    hf_class: ClassVar[str]
    #: the feature arrangement (``vlm.arrangements`` name) the family's models have; ``None``: none (each image's
    #: view tokens one after another). A model whose arrangement differs is refused (``all_problems``)
    arrangement: ClassVar[str | None] = None
    #: whether plain transformers loads this format's directories (``False``: an original remote-code checkpoint
    #: layout, read and written as data); a model's ``source_format`` is preferred on export only when ``True``
    loads_in_transformers: ClassVar[bool] = True

    @staticmethod
    def from_hf(path: str | os.PathLike, *, dtype: str | torch.dtype | None = None, tokenizer: bool = True,
                **kwargs: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    @staticmethod
    def to_hf(model: Any, path: str | os.PathLike, *, dtype: str | torch.dtype | None = None,
              processor: bool = True) -> Path:  # pragma: no cover - abstract
        raise NotImplementedError

    @staticmethod
    def problems(model: Any) -> list[str]:  # pragma: no cover - abstract
        """Why ``model`` cannot be written in this format (empty when it can)."""
        raise NotImplementedError


FORMATS: Registry[HFFormat] = Registry("interop format")


def all_problems(fmt: type[HFFormat], model: Any) -> list[str]:
    """``fmt.problems(model)``, after the one every format shares: the model's arrangement must be the format's."""
    arrangement = getattr(model, "arrangement", None)
    name = getattr(arrangement, "registry_name", None) if arrangement is not None else None
    problems = []
    if name != fmt.arrangement:
        problems.append(f"the model's feature arrangement is {name!r}; {fmt.hf_class} has "
                        f"{fmt.arrangement!r} (vlm.arrangements)")
    return problems + fmt.problems(model)


def format_for_model_type(model_type: Any, where: str) -> type[HFFormat]:
    """The registered format whose ``model_type`` equals ``model_type``; ``ValueError`` naming those supported."""
    for name in FORMATS.names():
        fmt = FORMATS.get(name)
        if fmt.model_type == model_type:
            return fmt
    supported = {FORMATS.get(n).model_type: FORMATS.get(n).hf_class for n in FORMATS.names()}
    raise ValueError(f"{where}: model_type {model_type!r} is not a format vlm converts; supported: {supported}")


def format_for_model(model: Any, name: str | None = None) -> type[HFFormat]:
    """The format named ``name``; else the one ``model`` was imported from (``model.source_format``) when it can hold
    the model and is a transformers class (an original checkpoint's layout only by name); else the first registered one that can. ``ValueError`` for an unknown ``name`` (listing the formats)
    and, listing every format's problems, when none can hold the model."""
    if name is not None:
        if name not in FORMATS.names():
            raise ValueError(f"to_hf: unknown format {name!r} ({did_you_mean(name, FORMATS.names())}); expected one "
                             f"of: {', '.join(FORMATS.names())}")
        fmt = FORMATS.get(name)
        problems = all_problems(fmt, model)
        if problems:
            raise ValueError(f"to_hf: this model cannot be exported as {fmt.hf_class}: " + "; ".join(problems))
        return fmt
    source = getattr(model, "source_format", None)
    if (source in FORMATS.names() and FORMATS.get(source).loads_in_transformers
            and not all_problems(FORMATS.get(source), model)):
        return FORMATS.get(source)
    reasons = {}
    for n in FORMATS.names():
        fmt = FORMATS.get(n)
        problems = all_problems(fmt, model)
        if not problems:
            return fmt
        reasons[n] = "; ".join(problems)
    raise ValueError("to_hf: no transformers format can hold this model: "
                     + " | ".join(f"{n}: {r}" for n, r in reasons.items()) + ". " + SERVE_INSTEAD)


#: what serves a model no transformers format holds (the end of ``to_hf``'s error)
SERVE_INSTEAD = ("It still serves from its vlm directory: `python -m vlm.chat DIR` (DIR: the model directory or the run "
                 "directory), `vlm.load(DIR).chat(image, question)` in Python, or the OpenAI-compatible HTTP server "
                 "`python -m vlm.serve DIR`. Which encoder x connector compositions export to which format: docs/interop.md")
