"""Generation settings: which ids end a reply, which id pads, which id starts a text.

One dict, ``{"eos_token_id": [ids], "pad_token_id": id, "bos_token_id": id}`` (keys with no value left out), is the
single source for ``VLM.generate`` defaults, training evaluation, ``config.json`` of a vlm directory and the
``generation_config.json`` + ``text_config`` of an exported LLaVA directory, so every consumer stops where vlm stops.

``eos_token_id`` lists the tokenizer's ``eos_token``, the chat template's end-of-turn token (``<|im_end|>``,
``<|eot_id|>``, ...) when that is a single other token, and the tokenizer's ``pad_token`` when it is another token.
This list is THE stop rule: a reply ends at the first of these ids and at nothing else, in ``VLM.generate``,
``model.chat`` / ``chat_stream``, training's evaluation and transformers' ``generate`` on an exported directory
(which reads the same list from ``generation_config.json``). A pad id is a stop because vlm never trains a pad as a
target: a model that emits it has left its training distribution, and every consumer must end the reply there, not
only those that happen to cut at pad. A transformers model directory loaded by ``vlm.load`` keeps the stop list its
own ``generation_config.json`` gives (no pad added), so vlm answers on it exactly as transformers does.
"""
from __future__ import annotations

import warnings
from typing import Any

GENERATION_KEYS = ("eos_token_id", "pad_token_id", "bos_token_id")


def stop_ids(tokenizer: Any, template: Any = None) -> list[int]:
    """The ids that end a reply: ``tokenizer.eos_token_id``, then the template's end-of-turn token (when it is one
    token; a longer end-of-turn cannot be an id and is left out with a warning), then ``tokenizer.pad_token_id`` (when
    set and not already listed)."""
    ids = [int(tokenizer.eos_token_id)] if getattr(tokenizer, "eos_token_id", None) is not None else []
    eot = template.end_of_turn(tokenizer) if template is not None else None
    if eot:
        enc = tokenizer(eot, add_special_tokens=False)["input_ids"]
        if len(enc) == 1:
            if int(enc[0]) not in ids:
                ids.append(int(enc[0]))
        else:
            warnings.warn(f"the template's end of turn {eot!r} is {len(enc)} tokens {list(enc)}, not one; generation "
                          f"stops only at the eos token(s) {ids}", stacklevel=2)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is not None and int(pad) not in ids:
        ids.append(int(pad))
    return ids


def generation_settings(tokenizer: Any, template: Any = None) -> dict[str, Any]:
    """``{"eos_token_id": [...], "pad_token_id": ..., "bos_token_id": ...}`` of ``tokenizer`` (+ ``template``);
    ``{}`` without a tokenizer."""
    if tokenizer is None:
        return {}
    out: dict[str, Any] = {}
    eos = stop_ids(tokenizer, template)
    if eos:
        out["eos_token_id"] = eos
    for key in ("pad_token_id", "bos_token_id"):
        value = getattr(tokenizer, key, None)
        if value is not None:
            out[key] = int(value)
    return out


def read_settings(source: Any) -> dict[str, Any]:
    """The generation settings held by a transformers ``GenerationConfig`` / ``PretrainedConfig`` (or a dict):
    ``eos_token_id`` always as a list; keys without a value left out."""
    get = source.get if isinstance(source, dict) else lambda k: getattr(source, k, None)
    out: dict[str, Any] = {}
    for key in GENERATION_KEYS:
        value = get(key)
        if value is None or value == []:
            continue
        if key == "eos_token_id":
            value = [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
        else:
            value = int(value)
        out[key] = value
    return out
