"""Generation on processed prompts: batches (left padding), stop ids and stop strings per sample, sampling options,
and streaming.

``generate_replies(model, items, tokenizer, ...)`` takes processor outputs (``Processor(sample,
add_generation_prompt=True)``), pads them on the left, calls ``VLM.generate`` once and decodes each row exactly as
training's evaluation does (``vlm.train.evaluate.decode``: cut at the first stop/pad id, special tokens kept, outer
whitespace stripped), then cuts each reply at the first stop string. ``stream_reply`` runs the same generation for
one prompt in a thread and yields the text as it grows; the pieces join to the same text ``generate_replies`` gives.
"""
from __future__ import annotations

import queue
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch


def decode(tokenizer: Any, rows: torch.Tensor, stops: Sequence[int]) -> list[str]:
    """New tokens -> text, cut at the first stop/pad token (special tokens before it are kept: box tags may be)."""
    out = []
    for row in rows.tolist():
        n = stop_index(tokenizer, row, stops)
        out.append(tokenizer.decode(row[:n], skip_special_tokens=False).strip())
    return out


def stop_index(tokenizer: Any, ids: Sequence[int], stops: Sequence[int]) -> int | None:
    """Index of the first stop or pad id in ``ids`` (``None``: there is none)."""
    cut = set(stops) | ({tokenizer.pad_token_id} if tokenizer.pad_token_id is not None else set())
    return next((i for i, t in enumerate(ids) if t in cut), None)


@dataclass
class Reply:
    """One generated reply: ``text`` (cut at the stop id / stop string), ``finish`` (``"stop"``: an end-of-reply id
    or a stop string ended it; ``"length"``: ``max_new_tokens`` ran out) and ``num_tokens`` generated."""

    text: str
    finish: str
    num_tokens: int


def model_stop_ids(model: Any, override: Any = None) -> list[int]:
    """The ids that end a reply: ``override`` (an int or list) or the model's saved ``generation["eos_token_id"]``."""
    ids = override if override is not None else (getattr(model, "generation", None) or {}).get("eos_token_id", [])
    return [int(i) for i in ([ids] if isinstance(ids, int) else ids)]


def cut_at_stop_strings(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``(text before the earliest stop string, whether one occurred)``."""
    hits = [text.index(s) for s in stop if s and s in text]
    return (text[:min(hits)].rstrip(), True) if hits else (text, False)


def _options(model: Any, tokenizer: Any, stop: Sequence[str], kwargs: dict[str, Any]) -> dict[str, Any]:
    opts = dict(kwargs)
    opts.setdefault("max_new_tokens", 128)
    if opts.get("temperature") is not None or opts.get("top_p") is not None or opts.get("top_k") is not None:
        opts.setdefault("do_sample", True)
    opts.setdefault("do_sample", False)
    if opts["max_new_tokens"] < 1:
        raise ValueError(f"max_new_tokens must be >= 1; got {opts['max_new_tokens']}")
    if stop:
        opts["stop_strings"], opts["tokenizer"] = list(stop), tokenizer
    return opts


def check_context(model: Any, lengths: Sequence[int], max_new_tokens: int) -> None:
    """Raise when a prompt leaves no room in the LLM's context window (``max_position_embeddings``)."""
    limit = getattr(getattr(model.llm.model, "config", None), "max_position_embeddings", None)
    if limit is None:
        return
    for i, n in enumerate(lengths):
        if n >= limit:
            raise ValueError(f"prompt {i} has {n} tokens, more than the model's context window of {limit} tokens; "
                             f"shorten the prompt or the history (e.g. /reset)")
        if n + max_new_tokens > limit:
            warnings.warn(f"prompt {i} ({n} tokens) + max_new_tokens={max_new_tokens} exceeds the context window of "
                          f"{limit}; the reply may be cut", stacklevel=3)


def _batch(model: Any, items: Sequence[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    from vlm.data.collate import PadCollator

    batch = PadCollator(pad_id, padding_side="left")(list(items))
    device = next(model.parameters()).device
    pv = batch.get("pixel_values")
    return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device),
            "pixel_values": None if pv is None else pv.to(device)}


@torch.no_grad()
def generate_replies(model: Any, items: Sequence[dict[str, Any]], tokenizer: Any, *, stop: Sequence[str] = (),
                     streamer: Any = None, **generate_kwargs: Any) -> list[Reply]:
    """Answer each processed prompt in ``items`` (one ``VLM.generate`` call, left-padded ``(B, L)``).

    ``generate_kwargs``: ``max_new_tokens`` (default 128), ``do_sample`` (default: True when ``temperature``,
    ``top_p`` or ``top_k`` is given, else greedy), ``temperature``, ``top_p``, ``top_k``, ``repetition_penalty``,
    ``eos_token_id`` (default: the model's saved stop ids), ``use_cache`` and any other ``GenerationConfig`` key.
    ``stop``: strings that end a reply (each row stops on its own; the stop string is not part of the reply).
    Raises ``ValueError`` when a prompt does not fit the context window."""
    if not items:
        return []
    opts = _options(model, tokenizer, stop, generate_kwargs)
    check_context(model, [int(it["input_ids"].numel()) for it in items], opts["max_new_tokens"])
    stops = model_stop_ids(model, opts.pop("eos_token_id", None))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else 0)
    batch = _batch(model, items, pad)
    new = model.generate(batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"],
                         eos_token_id=stops or None, pad_token_id=pad, streamer=streamer, **opts)
    return [_reply(tokenizer, row, stops, stop, opts["max_new_tokens"]) for row in new]


def _reply(tokenizer: Any, row: torch.Tensor, stops: Sequence[int], stop: Sequence[str], max_new: int) -> Reply:
    ids = row.tolist()
    n = stop_index(tokenizer, ids, stops)
    text = tokenizer.decode(ids[:n], skip_special_tokens=False).strip()
    text, hit = cut_at_stop_strings(text, stop)
    finish = "stop" if n is not None or hit else "length"
    if finish == "length" and stop:
        warnings.warn(f"no stop string {list(stop)} occurred within max_new_tokens={max_new}; the reply ends where "
                      f"the token budget ran out", stacklevel=3)
    return Reply(text, finish, len(ids) if n is None else n)


class ReplyStreamer:
    """A ``transformers`` streamer (its ``put``/``end`` protocol) for one prompt: collects new ids and serves the growing reply as text pieces
    through :meth:`pieces`. A piece is released once it can no longer change: text that could still be the start of
    a stop string, trailing whitespace (stripped from a finished reply) and incomplete characters are held back."""

    def __init__(self, tokenizer: Any, stops: Sequence[int], stop: Sequence[str] = ()) -> None:
        self.tokenizer, self.stops, self.stop = tokenizer, list(stops), list(stop)
        self.ids: list[int] = []
        self.queue: queue.Queue = queue.Queue()
        self.first = True
        self.done = False

    def text(self) -> str:
        """The reply so far, decoded exactly as :func:`generate_replies` decodes a finished one."""
        text = decode(self.tokenizer, torch.tensor([self.ids], dtype=torch.long), self.stops)[0] if self.ids else ""
        return cut_at_stop_strings(text, self.stop)[0]

    def put(self, value: torch.Tensor) -> None:
        if self.first:  # generate passes the prompt first (empty here: the prompt goes in as embeddings)
            self.first = False
            if value.numel() == 0 or value.ndim > 1 and value.shape[-1] != 1:
                return
        self.ids += [int(v) for v in value.reshape(-1)]
        self.queue.put(False)

    def end(self) -> None:
        self.queue.put(True)

    def _stable(self, text: str) -> str:
        keep = len(text.rstrip())
        for s in self.stop:  # a suffix that may grow into a stop string stays back
            for k in range(min(len(s) - 1, keep), 0, -1):
                if text[:keep].endswith(s[:k]):
                    keep -= k
                    break
        stable = text[:keep]
        return stable[:stable.index("\ufffd")] if "\ufffd" in stable else stable

    def pieces(self, error: list[BaseException]) -> Iterator[str]:
        """Yield text pieces until generation ends; ``error`` receives the generating thread's exception."""
        sent = ""
        while True:
            finished = self.queue.get()
            if error:
                raise error[0]
            text = self.text() if finished else self._stable(self.text())
            if text.startswith(sent) and len(text) > len(sent):
                yield text[len(sent):]
                sent = text
            if finished:
                return


def stream_reply(model: Any, item: dict[str, Any], tokenizer: Any, *, stop: Sequence[str] = (),
                 **generate_kwargs: Any) -> Iterator[str]:
    """Yield the reply to one processed prompt piece by piece as it is generated; ``"".join`` of the pieces equals
    ``generate_replies(model, [item], tokenizer, ...)[0].text`` for the same options."""
    streamer = ReplyStreamer(tokenizer, model_stop_ids(model, generate_kwargs.get("eos_token_id")), stop)
    error: list[BaseException] = []

    def run() -> None:
        try:
            generate_replies(model, [item], tokenizer, stop=stop, streamer=streamer, **generate_kwargs)
        except BaseException as e:  # noqa: BLE001 -- re-raised in the consumer's thread
            error.append(e)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield from streamer.pieces(error)
    finally:
        thread.join()
