"""The batching queue between the HTTP handlers (asyncio) and the model (one worker thread).

Handlers ``submit`` a :class:`Job` (a processed prompt + its options); the worker takes the oldest job, waits
``batch_wait_s`` for others to arrive — and, up to ``gather_s``, for requests that have arrived but whose images and
prompt are still being prepared (``arrive`` / ``arrived``; prompts are built one at a time, so requests that arrive
together reach the queue one by one) — and runs every waiting job that samples the same way (greedy, or the same
temperature / top_p; a seeded job always runs alone, so its seed gives the same reply every time) in ONE left-padded
``VLM.generate`` call, at most ``max_batch`` rows. Each row is watched token by token (:class:`_Rows`): it ends at a
stop id, a complete stop string, its own ``max_tokens`` or its client's disconnect, then its generation stops
(a per-row stopping criterion) while the others go on. Rows are decoded exactly as ``generate_replies`` decodes a
reply (``reply_text``), so with greedy decoding each reply equals the request answered alone, which equals
``model.chat``.

Capacity: ``max_queue`` jobs waiting or running; one more raises :class:`Overloaded` (the handler answers 503 with
``Retry-After``). A job's slot is freed when its row ends or, still waiting, when it is cancelled.
"""
from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from vlm.inference.generate import ReplyStreamer, _batch, model_stop_ids, reply_text


class Overloaded(Exception):
    """The queue is full."""


@dataclass
class Job:
    """One request: ``item`` (a processed prompt), ``budget`` (max new tokens, already clamped to the context),
    ``sampling`` (``{}``: greedy; else ``do_sample``, ``temperature``, ``top_p``), ``stop`` strings, ``seed``,
    ``stream`` (send text pieces as they settle). Events go to ``events`` on the handler's loop:
    ``("delta", text)``, ``("done", (text, finish_reason, completion_tokens))``, ``("error", message)``."""

    item: dict[str, Any]
    budget: int
    sampling: dict[str, Any] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    released: bool = False

    @property
    def key(self) -> Any:
        """Jobs with equal keys may share a generate call."""
        if self.seed is not None:
            return ("seeded", id(self))
        return tuple(sorted(self.sampling.items()))

    def emit(self, kind: str, payload: Any) -> None:
        if self.loop is not None and self.events is not None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))


class _Rows(BaseStreamer, StoppingCriteria):
    """Streamer + stopping criterion of one batched generate call: follows every row's new ids, ends rows
    (stop id, stop string, budget, cancel), releases their slots and sends their events."""

    def __init__(self, jobs: list[Job], tokenizer: Any, stops: list[int], release: Any) -> None:
        self.jobs, self.release = jobs, release
        self.watch = [ReplyStreamer(tokenizer, stops, j.stop) for j in jobs]
        self.sent = [""] * len(jobs)
        self.done = [False] * len(jobs)
        self.stops, self.tokenizer = set(stops), tokenizer
        self.first = True

    def put(self, value: torch.Tensor) -> None:
        if self.first:  # generate passes the prompt first (empty: the prompt goes in as embeddings)
            self.first = False
            if value.numel() == 0 or value.ndim > 1 and value.shape[-1] != 1:
                return
        for r, token in enumerate(value.reshape(len(self.jobs), -1)[:, -1].tolist()):
            if self.done[r]:
                continue
            job, w = self.jobs[r], self.watch[r]
            w.ids.append(int(token))
            if job.cancelled.is_set():
                self.finish(r, cancelled=True)
            elif int(token) in self.stops or len(w.ids) >= job.budget or \
                    (job.stop and reply_text(self.tokenizer, w.ids, [], job.stop)[2]):
                self.finish(r)
            elif job.stream:
                self.send(r, w.stable())

    def send(self, r: int, text: str) -> None:
        if text.startswith(self.sent[r]) and len(text) > len(self.sent[r]):
            self.jobs[r].emit("delta", text[len(self.sent[r]):])
            self.sent[r] = text

    def finish(self, r: int, cancelled: bool = False) -> None:
        self.done[r] = True
        job, ids = self.jobs[r], self.watch[r].ids
        self.release(job)   # before the last event: a handler that has its reply finds the slot freed
        if not cancelled:
            text, n, hit = reply_text(self.tokenizer, ids, list(self.stops), job.stop)
            if job.stream:
                self.send(r, text)
            job.emit("done", (text, "stop" if n is not None or hit else "length", len(ids) if n is None else n))

    def end(self) -> None:
        for r in range(len(self.jobs)):
            if not self.done[r]:
                self.finish(r, cancelled=self.jobs[r].cancelled.is_set())

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)


class Scheduler:
    """Owns the model: ``submit`` jobs from any thread; ``start`` / ``stop`` the worker thread."""

    def __init__(self, model: Any, tokenizer: Any, *, max_queue: int = 64, max_batch: int = 16,
                 batch_wait_s: float = 0.01, gather_s: float = 0.5) -> None:
        if max_queue < 1 or max_batch < 1:
            raise ValueError(f"max_queue and max_batch must be >= 1; got {max_queue}, {max_batch}")
        self.model, self.tokenizer = model, tokenizer
        self.max_queue, self.max_batch, self.batch_wait_s = max_queue, max_batch, batch_wait_s
        self.gather_s = max(gather_s, batch_wait_s)
        self.arriving = 0        # requests received whose prompt is still being prepared
        self.pending: collections.deque[Job] = collections.deque()
        self.active = 0          # jobs holding a slot: waiting or running
        self.stats = {"served": 0, "cancelled": 0, "batches": 0, "rejected": 0}
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="vlm-serve-worker", daemon=True)
        self.stops = model_stop_ids(model)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.stops or [0])[0]

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Let the worker finish the jobs it holds, then end it."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join(timeout)

    def submit(self, job: Job) -> None:
        with self.cond:
            if self.active >= self.max_queue:
                self.stats["rejected"] += 1
                raise Overloaded(f"{self.active} requests are queued or running (--max-queue {self.max_queue})")
            self.active += 1
            self.pending.append(job)
            self.cond.notify_all()

    def arrive(self) -> None:
        """A request came in; its job follows (``submit``) once its prompt is built, then call ``arrived``."""
        with self.cond:
            self.arriving += 1

    def arrived(self) -> None:
        with self.cond:
            self.arriving -= 1
            self.cond.notify_all()

    def cancel(self, job: Job) -> None:
        """The client went away: a waiting job leaves the queue, a running row ends at its next token."""
        job.cancelled.set()
        with self.cond:
            if job in self.pending:
                self.pending.remove(job)
                self._release(job)

    def release(self, job: Job) -> None:
        with self.cond:
            self._release(job)

    def _release(self, job: Job) -> None:
        if not job.released:
            job.released = True
            self.active -= 1
            self.stats["cancelled" if job.cancelled.is_set() else "served"] += 1
            self.cond.notify_all()

    def snapshot(self) -> dict[str, int]:
        with self.cond:
            return {"queued": len(self.pending), "active": self.active, "max_queue": self.max_queue, **self.stats}

    def _take(self) -> list[Job] | None:
        with self.cond:
            while not self.pending:
                if self.stopping:
                    return None
                self.cond.wait()
            first = self.pending[0]
            t0 = time.monotonic()
            while not self.stopping and len(self.pending) < self.max_batch:   # let requests arriving together join
                waited = time.monotonic() - t0
                if waited >= self.gather_s or waited >= self.batch_wait_s and not self.arriving:
                    break
                self.cond.wait(timeout=0.005)
            jobs = [j for j in self.pending if j.key == first.key][:self.max_batch]
            for j in jobs:
                self.pending.remove(j)
            return jobs

    def _loop(self) -> None:
        while (jobs := self._take()) is not None:
            if jobs:
                self.run(jobs)

    @torch.no_grad()
    def run(self, jobs: list[Job]) -> None:
        """One batched generate call for ``jobs`` (same sampling key)."""
        rows = _Rows(jobs, self.tokenizer, self.stops, self.release)
        self.stats["batches"] += 1
        try:
            batch = _batch(self.model, [j.item for j in jobs], self.pad)
            if jobs[0].seed is not None:
                torch.manual_seed(jobs[0].seed)
            self.model.generate(batch.pop("input_ids"), attention_mask=batch.pop("attention_mask"),
                                eos_token_id=self.stops or None, pad_token_id=self.pad, streamer=rows,
                                stopping_criteria=StoppingCriteriaList([rows]),
                                max_new_tokens=max(j.budget for j in jobs), **batch,
                                **{"do_sample": False, **jobs[0].sampling})
        except Exception as e:  # noqa: BLE001 -- answered to every row's client as a 500
            for r, job in enumerate(jobs):
                if not rows.done[r]:
                    rows.done[r] = True
                    self.release(job)
                    job.emit("error", f"generation failed: {type(e).__name__}: {e}")
            return
        rows.end()
