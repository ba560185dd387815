"""Generation on processed prompts: batches (left padding), stop ids and stop strings per sample, sampling options,
and streaming.

``generate_replies(model, items, tokenizer, ...)`` takes processor outputs (``Processor(sample,
add_generation_prompt=True)``), pads them on the left, calls ``VLM.generate`` once and decodes each row exactly as
training's evaluation does (``vlm.eval.evaluator.decode``: cut at the first stop id, special tokens kept), cuts it
at the first stop string to be complete and strips its outer whitespace (``reply_text``). The stop ids are the
model's ``generation["eos_token_id"]`` and nothing else (``vlm.generation``: the same list an export writes, so served
transformers stops where vlm stops). ``stream_reply`` runs the same generation for one prompt in a thread and yields
the text as it grows; the pieces join to the same text ``generate_replies`` gives.
"""
from __future__ import annotations

import queue
import re
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch


def decode(tokenizer: Any, rows: torch.Tensor, stops: Sequence[int]) -> list[str]:
    """New tokens -> text, cut at the first stop id (special tokens before it are kept: box tags may be)."""
    out = []
    for row in rows.tolist():
        n = stop_index(tokenizer, row, stops)
        out.append(tokenizer.decode(row[:n], skip_special_tokens=False).strip())
    return out


def stop_index(tokenizer: Any, ids: Sequence[int], stops: Sequence[int]) -> int | None:
    """Index of the first id of ``stops`` in ``ids`` (``None``: there is none). Only ``stops`` end a reply: a pad id
    does when the model lists it (``vlm.generation.stop_ids``), as transformers' ``generate`` stops only at
    ``eos_token_id``. (``tokenizer`` is unused; kept for callers.)"""
    cut = set(stops)
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


def first_stop(text: str, stop: Sequence[str]) -> int | None:
    """Where the reply ends in ``text``: the start of the stop string that is complete first, reading ``text`` from
    the left (the smallest end; of those ending there, the earliest start); ``None`` when none occurs.

    This is where a generation that stops as soon as a stop string appears ends, however the text is split into
    tokens: a longer stop string that began earlier but is not complete yet does not count."""
    best: tuple[int, int] | None = None
    for s in stop:
        if s and s in text:
            i = text.index(s)  # the first occurrence ends first
            best = min(best, (i + len(s), i)) if best else (i + len(s), i)
    return None if best is None else best[1]


def cut_at_stop_strings(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``(text before the first stop string (:func:`first_stop`), whether one occurred)``.

    The one cut rule of a finished reply (``chat``, ``chat_batch``, ``chat_stream``; :func:`reply_text`): stop strings
    are looked for in the text as generated (before its outer whitespace is stripped, so a stop string may begin or
    end with whitespace); the stop string and everything after it are dropped, then the reply's outer whitespace."""
    cut = first_stop(text, stop)
    return (text, False) if cut is None else (text[:cut], True)


def stable_prefix(raw: str, stop: Sequence[str]) -> str:
    """The text every finished reply that continues ``raw`` must start with.

    ``raw``: the decoded new tokens so far (no stop id among them, not stripped). A finished reply is
    ``cut_at_stop_strings(decoded, stop)[0].strip()`` for some continuation of ``raw``. Once a stop string is
    complete the reply is settled (no later text can end before it). Until then held back are: replacement characters
    at the end (an incomplete UTF-8 character whose next bytes are still to come), the longest suffix that is the
    start of a stop string (it may complete into one) and the whitespace before the held-back point (stripped if the
    reply ends there). Releasing only this text makes the streamed pieces join to exactly the finished reply."""
    text = raw.rstrip("\ufffd")
    if first_stop(text, stop) is not None:
        return cut_at_stop_strings(text, stop)[0].strip()
    cut = len(text)
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), 0, -1):  # the longest suffix of text that starts s
            if text.endswith(s[:k]):
                cut = min(cut, len(text) - k)
                break
    return text[:cut].strip()


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


def check_context(model: Any, items: Sequence[dict[str, Any]], max_new_tokens: int) -> None:
    """Raise when a prompt (a processed item) leaves no room in the LLM's context window
    (``max_position_embeddings``); the message says how many of its tokens are image / video placeholders."""
    limit = getattr(getattr(model.llm.model, "config", None), "max_position_embeddings", None)
    if limit is None:
        return
    media_ids = [i for i in (getattr(model, "image_token_id", None), getattr(model, "video_token_id", None))
                 if i is not None]
    for i, item in enumerate(items):
        ids = item["input_ids"]
        n = int(ids.numel())
        if n >= limit:
            media = sum(int((ids == t).sum()) for t in media_ids)
            hint = (f"; {media} of them are image / video tokens: use fewer or smaller images (a native-resolution "
                    f"model: a lower max_pixels in its tiling)" if media else "")
            raise ValueError(f"prompt {i} has {n} tokens, more than the model's context window of {limit} tokens"
                             f"{hint}; shorten the prompt or the history (e.g. /reset)")
        if n + max_new_tokens > limit:
            warnings.warn(f"prompt {i} ({n} tokens) + max_new_tokens={max_new_tokens} exceeds the context window of "
                          f"{limit}; the reply may be cut", stacklevel=3)


def _batch(model: Any, items: Sequence[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    from vlm.data.collate import MEDIA_KEYS, PadCollator

    batch = PadCollator(pad_id, padding_side="left")(list(items))
    device = next(model.parameters()).device
    out = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device),
           "pixel_values": None}
    out.update({key: batch[key].to(device) for key in MEDIA_KEYS if key in batch})
    return out


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
    check_context(model, items, opts["max_new_tokens"])
    stops = model_stop_ids(model, opts.pop("eos_token_id", None))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else 0)
    batch = _batch(model, items, pad)
    new = model.generate(batch.pop("input_ids"), attention_mask=batch.pop("attention_mask"),
                         eos_token_id=stops or None, pad_token_id=pad, streamer=streamer, **batch, **opts)
    return [_reply(tokenizer, row, stops, stop, opts["max_new_tokens"]) for row in new]


def reply_text(tokenizer: Any, ids: Sequence[int], stops: Sequence[int], stop: Sequence[str]
               ) -> tuple[str, int | None, bool]:
    """``(reply, index of the first stop id or None, whether a stop string cut it)`` of new token ids: decoded up to
    the first stop id (special tokens kept), cut at the first stop string (:func:`cut_at_stop_strings`), outer
    whitespace stripped. The one decoding of a finished reply, streamed or not."""
    n = stop_index(tokenizer, ids, stops)
    text, hit = cut_at_stop_strings(tokenizer.decode(list(ids[:n]), skip_special_tokens=False), stop)
    return text.strip(), n, hit


def _reply(tokenizer: Any, row: torch.Tensor, stops: Sequence[int], stop: Sequence[str], max_new: int) -> Reply:
    ids = row.tolist()
    text, n, hit = reply_text(tokenizer, ids, stops, stop)
    finish = "stop" if n is not None or hit else "length"
    if finish == "length" and stop:
        warnings.warn(f"no stop string {list(stop)} occurred within max_new_tokens={max_new}; the reply ends where "
                      f"the token budget ran out", stacklevel=3)
    return Reply(text, finish, len(ids) if n is None else n)


#: A SentencePiece byte-fallback token: its decoder turns a run of them into text together (the whole run becomes
#: replacement characters when it is not valid UTF-8), so a run is settled only once another token ends it.
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def open_byte_run(tokenizer: Any, ids: Sequence[int]) -> int:
    """Where the trailing run of byte-fallback tokens (``<0xNN>``) of ``ids`` starts (``len(ids)``: none)."""
    i = len(ids)
    while i > 0 and _BYTE_TOKEN.fullmatch(str(tokenizer.convert_ids_to_tokens(int(ids[i - 1])) or "")):
        i -= 1
    return i


class ReplyStreamer:
    """A ``transformers`` streamer (its ``put``/``end`` protocol) for one prompt: collects new ids and serves the
    growing reply as text pieces through :meth:`pieces`. A piece is released once it can no longer change
    (:func:`stable_prefix`): text that could still be the start of a stop string, trailing whitespace (stripped from
    a finished reply), incomplete characters and an open run of byte-fallback tokens are held back, so the pieces
    join to exactly the finished reply."""

    def __init__(self, tokenizer: Any, stops: Sequence[int], stop: Sequence[str] = ()) -> None:
        self.tokenizer, self.stops, self.stop = tokenizer, list(stops), list(stop)
        self.ids: list[int] = []
        self.queue: queue.Queue = queue.Queue()
        self.first = True
        self.done = False

    def text(self) -> str:
        """The reply so far, decoded and cut exactly as :func:`generate_replies` decodes and cuts a finished one."""
        return reply_text(self.tokenizer, self.ids, self.stops, self.stop)[0]

    def stable(self) -> str:
        """The part of the reply that no later token can change (:func:`stable_prefix`); the whole :meth:`text` once a
        stop id has occurred (generation ends there)."""
        if stop_index(self.tokenizer, self.ids, self.stops) is not None:
            return self.text()
        settled = self.ids[:open_byte_run(self.tokenizer, self.ids)]
        return stable_prefix(self.tokenizer.decode(settled, skip_special_tokens=False), self.stop)

    def put(self, value: torch.Tensor) -> None:
        if self.first:  # generate passes the prompt first (empty here: the prompt goes in as embeddings)
            self.first = False
            if value.numel() == 0 or value.ndim > 1 and value.shape[-1] != 1:
                return
        self.ids += [int(v) for v in value.reshape(-1)]
        self.queue.put(False)

    def end(self) -> None:
        self.queue.put(True)

    def pieces(self, error: list[BaseException]) -> Iterator[str]:
        """Yield text pieces until generation ends; ``error`` receives the generating thread's exception."""
        sent = ""
        while True:
            finished = self.queue.get()
            if error:
                raise error[0]
            text = self.text() if finished else self.stable()
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
