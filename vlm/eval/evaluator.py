"""Generation-based evaluation: greedy ``model.generate`` on an evaluation set, scored by the dataset.

A dataset with an ``evaluate(predictions, samples) -> {metric: value}`` method (``shapes``: VQA exact match per
subtype, grounding Acc@IoU0.5 and mean IoU, caption F1, ``all``) scores itself; any other dataset is scored by
``vlm.eval.score.score_samples`` (the metric each sample's reference calls for: VQA accuracy, multiple choice,
grounding, captioning), which also gives each record its ``score`` (and ``iou``). ``python -m vlm.eval`` runs this
same function. Processes split the samples and gather the predictions; under FSDP every rank generates
the same number of tokens (no early stop) so the sharded forward passes stay in lockstep.

A sample that cannot be read (a missing image, ...), whose reference cannot score a prediction (a blank reference
answer, ...: ``vlm.eval.score.reference_problem``, for datasets scored per sample) or whose prompt the processor
drops (``SampleDropped``: longer than ``max_length`` -- generation prompts are never cut -- or over the tile budget)
is not answered: it is left out of the scores and counted in ``eval_dropped`` (its record says why).

Evaluation sits below training: it imports nothing from ``vlm.train``. The processes it runs on are passed in as
``Workers``: training's periodic evaluation passes its strategy (``vlm.train.distributed.Strategy``), ``python -m
vlm.eval`` a ``OneProcess``.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from vlm.data.collate import MEDIA_KEYS
from vlm.devices import resolve_device
from vlm.generation import stop_ids
from vlm.inference.generate import decode, model_stop_ids
from vlm.metrics import count_key, score_keys
from vlm.objectives import TrainModule


class Workers(Protocol):
    """The processes an evaluation runs on: what ``evaluate`` asks of them. Training's strategy
    (``vlm.train.distributed.Strategy``) is one; ``OneProcess`` is the single process of ``python -m vlm.eval``."""

    rank: int  # this process, in 0 .. world_size - 1
    world_size: int
    device: torch.device  # where this process generates

    @property
    def is_main(self) -> bool: ...

    def inference(self, wrapped: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
        """The module to call ``generate`` on (all processes enter together)."""
        ...

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order, on every process."""
        ...


class OneProcess:
    """``Workers`` of one process on ``device`` (``auto``: the local CUDA device if there is one, else CPU; a CUDA
    device becomes the current one). Raises ``RuntimeError`` for a CUDA device without CUDA."""

    rank, world_size, is_main = 0, 1, True

    def __init__(self, device: str = "auto") -> None:
        self.device = resolve_device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    @contextlib.contextmanager
    def inference(self, wrapped: nn.Module) -> Iterator[nn.Module]:
        yield getattr(wrapped, "module", wrapped)

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]


def model_frame(processor: Any) -> tuple[int, int] | None:
    """The pixel frame ``(S, S)`` a model reads and answers absolute boxes in (its processor's tile size)."""
    size = getattr(getattr(processor, "image_processor", None), "image_size", None)
    return (int(size), int(size)) if size else None


def _fetch(samples: Any, i: int, check: Callable[[Any], str | None] | None = None) -> Any:
    """Sample ``i`` itself, or the ``DataError`` that makes it unreadable (counted in ``samples.bad``). Never the
    next good sample, as indexing a skipping dataset gives: that would score a neighbour twice in ``i``'s place.
    ``check``: what keeps a read sample from being scored (``vlm.eval.score.reference_problem``: a blank reference
    answer, ...), or None; such a sample is a ``SampleError`` too (reason ``reference``), naming its file and id."""
    from vlm.data.errors import DataError
    from vlm.data.readers.base import SampleError

    read = getattr(samples, "sample", None)
    try:
        sample = samples[i] if read is None else read(i)
    except DataError as e:
        if read is None:  # a dataset that cannot name its own bad samples: its error stands
            raise
        error = e
    else:
        problem = check(sample) if check is not None else None
        if problem is None:
            return sample
        meta = getattr(sample, "meta", {})
        error = SampleError(problem, reason="reference", index=meta.get("index", i), sample_id=sample.id,
                            source=meta.get("source"))
    bad = getattr(samples, "bad", None)
    if bad is not None:
        bad.add(error)
    return error


def _prompt(processor: Any, sample: Any) -> tuple[dict[str, Any] | None, str | None]:
    """``(item, None)``, or ``(None, why)`` when the sample cannot be read or the processor drops its generation
    prompt."""
    from vlm.data.errors import DataError
    from vlm.data.processor import SampleDropped

    if isinstance(sample, DataError):
        return None, f"{getattr(sample, 'reason', 'invalid')}: {sample}"
    try:
        return processor(sample, add_generation_prompt=True), None
    except SampleDropped as e:
        return None, f"{e.reason}: {e}"


def _filler(processor: Any) -> dict[str, Any]:
    """A text-only generation prompt with an empty question: generated (and discarded) under lockstep when every
    prompt of a batch was dropped, so that this rank still runs the sharded forward passes the others run."""
    from vlm.data.sample import Message, Sample

    return processor(Sample([Message("user", [""])], id="<filler>"), add_generation_prompt=True)


@torch.no_grad()
def generate_predictions(model: nn.Module, processor: Any, collator: Any, samples: Sequence[Any], batch_size: int,
                         max_new_tokens: int, device: torch.device, precision: torch.dtype,
                         lockstep: bool = False, progress: bool = False) -> tuple[list[str | None], list[str | None]]:
    """``(predictions, dropped)`` per sample: the decoded answer, or ``None`` with the reason in ``dropped`` when the
    processor dropped the prompt (it is never generated from). ``progress``: a progress bar over the batches."""
    tokenizer = processor.tokenizer
    # the model's own stop ids when it has them (a loaded or imported model: what chat and its export stop at),
    # else the template's (training: the same list the export will write)
    stops = model_stop_ids(model) if getattr(model, "generation", None) else stop_ids(tokenizer, processor.template)
    preds: list[str | None] = []
    dropped: list[str | None] = []
    from tqdm.auto import tqdm

    for i in tqdm(range(0, len(samples), batch_size), desc="evaluating", unit="batch", disable=not progress):
        prompts = [_prompt(processor, s) for s in samples[i:i + batch_size]]
        dropped += [why for _, why in prompts]
        items = [item for item, _ in prompts if item is not None]
        if not items and not lockstep:
            preds += [None] * len(prompts)
            continue
        batch = collator(items or [_filler(processor)])
        batch.pop("meta", None)
        kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": tokenizer.pad_token_id,
                  "eos_token_id": None if lockstep else stops}
        if lockstep:
            kwargs["min_new_tokens"] = max_new_tokens
        with torch.autocast(device.type, dtype=precision, enabled=precision != torch.float32):
            media = {key: batch[key].to(device) for key in MEDIA_KEYS if key in batch}
            new = model.generate(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                                 **media, **kwargs)
        answers = iter(decode(tokenizer, new, stops))
        preds += [next(answers) if item is not None else None for item, _ in prompts]
    return preds, dropped


def evaluate(wrapped: nn.Module, workers: Workers, processor: Any, samples: Any, *, batch_size: int,
             max_new_tokens: int, precision: torch.dtype, limit: int | None = None,
             lockstep: bool = False, progress: bool = False) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Metrics (on every rank) and, on rank 0, one record per sample (id, task, prediction, target).

    Samples that cannot be read (a missing image, ...) or whose prompt the processor drops are not scored (each
    index is its own sample: a bad one is never replaced by the next); ``metrics["eval_dropped"]`` (present when
    > 0) counts them and their records carry ``prediction: None`` and ``dropped`` (the reason)."""
    from vlm.data.collate import PadCollator
    from vlm.eval.score import reference_problem

    n = len(samples) if limit is None else min(limit, len(samples))
    mine = list(range(workers.rank, n, workers.world_size))
    per_rank = -(-n // workers.world_size)
    mine += mine[-1:] * (per_rank - len(mine)) if mine else [0] * per_rank  # equal work on every rank
    collator = PadCollator(processor.tokenizer.pad_token_id, padding_side="left")
    t0 = time.perf_counter()
    was_training = wrapped.training
    wrapped.eval()
    with workers.inference(wrapped) as module:
        model = module.model if isinstance(module, TrainModule) else module  # a stage's: generate with its model
        check = None if getattr(samples, "evaluate", None) is not None else reference_problem  # scored per sample
        fetched = {i: _fetch(samples, i, check) for i in dict.fromkeys(mine)}
        preds, dropped = generate_predictions(model, processor, collator, [fetched[i] for i in mine], batch_size,
                                              max_new_tokens, workers.device, precision, lockstep,
                                              progress=progress and workers.is_main)
    wrapped.train(was_training)
    gathered = workers.all_gather_object(list(zip(mine, preds, dropped)))
    by_index: dict[int, tuple[str | None, str | None]] = {}
    for part in gathered:
        for i, p, why in part:
            by_index.setdefault(i, (p, why))
    order = sorted(by_index)[:n]
    scored = [i for i in order if by_index[i][1] is None]
    fetched.update({i: _fetch(samples, i, check) for i in order if i not in fetched})  # other ranks' samples
    subset = [fetched[i] for i in scored]
    predictions = [by_index[i][0] for i in scored]
    scorer = getattr(samples, "evaluate", None)
    metrics: dict[str, float] = {}
    each: list[dict[str, Any]] = []
    if scored and scorer is not None:
        metrics = dict(scorer(predictions, subset))
    elif scored:
        from vlm.eval.score import score_samples

        metrics, each = score_samples(predictions, subset, json_frame=model_frame(processor))
    scores = dict(zip(scored, each))
    if len(scored) < len(order):  # only when some were dropped: the usual metrics stay as they were
        metrics["eval_dropped"] = len(order) - len(scored)
    metrics["eval_seconds"] = time.perf_counter() - t0
    records = []
    for i in order:
        s, (p, why) = fetched[i], by_index[i]
        if not hasattr(s, "messages"):  # unreadable: named by its error
            records.append({"id": getattr(s, "sample_id", None) or i, "task": None, "prediction": None,
                            "target": None, "dropped": why})
            continue
        records.append({"id": s.id, "task": s.meta.get("task"), "prediction": p,
                        "target": s.messages[-1].text() if s.messages else None, **({"dropped": why} if why else {}),
                        **({k: v for k, v in scores[i].items() if k != "row"} if i in scores else {})})
    return metrics, records


def format_table(metrics: dict[str, float]) -> str:
    """A markdown table: one row per task/metric with its sample count."""
    rows = score_keys(metrics)
    order = {"all": 2, "vqa": 1, "multi_image": 1}
    rows.sort(key=lambda k: (order.get(k, 0), k))
    label = {"grounding": "grounding (Acc@IoU0.5)", "grounding/iou": "grounding (mean IoU)",
             "caption": "caption (colour-shape F1)", "all": "overall (mean over samples)"}
    lines = ["| task | score | n |", "| --- | ---: | ---: |"]
    for k in rows:
        n = metrics.get(count_key(k), metrics.get(count_key(k.split('/')[0]), ""))
        n = int(n) if isinstance(n, float) and n.is_integer() else n
        lines.append(f"| {label.get(k, k)} | {metrics[k]:.3f} | {n} |")
    if metrics.get("eval_dropped"):
        lines.append(f"\n{int(metrics['eval_dropped'])} sample(s) not evaluated: unreadable (a missing image, ...), "
                     f"no reference to score against (a blank reference answer, ...) or a prompt the processor "
                     f"dropped (longer than max_length, over the tile budget); see `dropped` in the records")
    return "\n".join(lines)

