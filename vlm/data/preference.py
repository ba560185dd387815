"""Preference pairs: records ``{images, prompt | conversation, chosen, rejected}`` -> one packed row per pair.

A record (JSON / JSONL / parquet / HF ``datasets``, any source ``load_records`` reads) holds:

- ``images`` (or ``image``): the image sources, as in SFT records (``vlm.data.readers``);
- the prompt: ``prompt`` (a string with ``<image>`` placeholders, or a list of messages) or ``conversation`` /
  ``messages`` / ``conversations`` (messages ``{"role"|"from", "content"|"value"}``, ending with the user's turn);
- ``chosen`` and ``rejected``: the two answers, each a string, an assistant message, or a whole conversation (the
  prompt then is their shared turns before the last; TRL's "implicit prompt" form);
- ``kind`` (optional): a label the held-out evaluation scores separately (``pairs/preference_accuracy/<kind>``).

Each answer becomes an SFT sample (the prompt + that answer, read by the ``messages`` reader) and is processed by
the stage's processor: the same template, box rewriting and checks as SFT data. The two processed sequences share
their tokens up to the first answer token; the item is one row ``prompt + chosen + rejected`` with ``part (L,)``
= 1 on the prompt, 2 on the chosen answer, 3 on the rejected answer (0: padding once collated), so that the
objective runs the tower and the prompt once and keeps the answers from attending to each other
(``vlm.objectives.pair_logps``).

Bad pairs are counted skips by reason (or errors without ``skip_bad``), like SFT samples: ``no_answer`` (a missing
or empty answer), ``same_answers`` (chosen equals rejected), ``mismatched_images`` (``chosen_images`` and
``rejected_images`` differ), ``mismatched_prompt`` (two whole conversations whose prompts differ), ``too_long``
(the row is longer than ``max_length``, or an answer was cut), and every reason of the SFT reader and processor.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from vlm.data.collate import PadCollator
from vlm.data.dataset import SampleDataset, WrapsSamples
from vlm.data.dataset_registry import DATASETS
from vlm.data.processor import SampleDropped
from vlm.data.readers.base import SampleError
from vlm.data.readers.records import load_records
from vlm.data.sample import Sample
from vlm.labels import IGNORE_INDEX

PROMPT_KEYS = ("prompt", "conversation", "messages", "conversations")
PROMPT, CHOSEN, REJECTED = 1, 2, 3  # ``part`` values (0 = padding)


@dataclass
class Pair:
    """Two SFT samples that differ only in their last (assistant) message."""

    chosen: Sample
    rejected: Sample


def _messages(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, Mapping):
        return [dict(value)]
    if isinstance(value, Sequence):
        return [dict(m) for m in value]
    raise SampleError(f"the prompt is a {type(value).__name__}; expected a string or a list of messages",
                      reason="format")


def _answer(value: Any, which: str) -> tuple[list[dict[str, Any]] | None, Any]:
    """``(prompt messages or None, the answer's content)`` of ``chosen`` / ``rejected``."""
    if isinstance(value, (list, tuple)):  # a whole conversation: the prompt is everything before its last turn
        if not value:
            return None, None
        return [dict(m) for m in value[:-1]], dict(value[-1]).get("content", dict(value[-1]).get("value"))
    if isinstance(value, Mapping):
        return None, value.get("content", value.get("value"))
    return None, value


def _empty(content: Any) -> bool:
    return content is None or (isinstance(content, str) and not content.strip()) or content == []


def sft_records(record: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A preference record -> two ``messages``-format records (prompt + chosen, prompt + rejected). Raises
    ``SampleError`` with reasons ``no_answer``, ``same_answers``, ``mismatched_images``, ``mismatched_prompt``,
    ``format``."""
    if not isinstance(record, Mapping):
        raise SampleError(f"record is a {type(record).__name__}, expected a mapping", reason="format")
    (p_c, chosen), (p_r, rejected) = _answer(record.get("chosen"), "chosen"), _answer(record.get("rejected"),
                                                                                      "rejected")
    missing = [k for k, v in (("chosen", chosen), ("rejected", rejected)) if _empty(v)]
    if missing:
        raise SampleError(f"no {' and no '.join(missing)} answer; a preference record needs both 'chosen' and "
                          f"'rejected'", reason="no_answer")
    if chosen == rejected:
        raise SampleError(f"'chosen' equals 'rejected' ({str(chosen)[:60]!r}): the pair prefers nothing",
                          reason="same_answers")
    if record.get("chosen_images") != record.get("rejected_images"):  # both absent: the record's own images
        raise SampleError("'chosen_images' and 'rejected_images' differ; both answers must be about the same "
                          "images", reason="mismatched_images")
    key = next((k for k in PROMPT_KEYS if record.get(k) is not None), None)
    if p_c != p_r:
        raise SampleError("'chosen' and 'rejected' are conversations with different turns before their answers; "
                          "expected the same prompt", reason="mismatched_prompt")
    prompt = (_messages(record[key]) if key is not None else []) + (p_c or [])
    if not prompt:
        raise SampleError(f"no prompt: expected one of {list(PROMPT_KEYS)}, or 'chosen' / 'rejected' as whole "
                          f"conversations", reason="format")
    images = record.get("images", record.get("image", record.get("chosen_images")))
    base = {"messages": prompt, "id": record.get("id")}
    if images is not None:
        base["images"] = images
    return ({**base, "messages": prompt + [{"role": "assistant", "content": chosen}]},
            {**base, "messages": prompt + [{"role": "assistant", "content": rejected}]})


class PreferenceSamples(SampleDataset):
    """Preference records as ``Pair``s (``sample(i)``), with ``SampleDataset``'s bad-sample policy (``skip_bad``,
    ``max_bad_fraction``, counted skips by reason). ``indices``: the records of the file this part holds."""

    def __init__(self, source: Any, indices: Sequence[int] | None = None, **options: Any) -> None:
        records = load_records(source, split=options.pop("split", "train"), backend=options.pop("backend", "auto"))
        if len(records) == 0:
            raise ValueError(f"no records in {source!r}")
        super().__init__(records, "messages", **options)
        self.source_name = str(source) if not isinstance(source, (list, tuple)) else None
        self.reader.source = self.source_name
        self.indices = list(range(len(records))) if indices is None else list(indices)
        self.selection: str | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def sample(self, index: int) -> Pair:  # type: ignore[override]
        i = self.indices[index]
        record = self.records[i]
        sid = record.get("id", i) if isinstance(record, Mapping) else i
        try:
            chosen, rejected = sft_records(record)
        except SampleError as e:
            raise SampleError(e.problem, reason=e.reason, index=i, sample_id=sid, source=self.source_name) from None
        pair = Pair(self.reader.convert(chosen, index=i), self.reader.convert(rejected, index=i))
        if isinstance(record, Mapping) and record.get("kind") is not None:  # scored per kind when held out
            pair.chosen.meta["kind"] = str(record["kind"])
        return pair


def pair_row(chosen: dict[str, Any], rejected: dict[str, Any], max_length: int | None,
             sample_id: Any = None) -> dict[str, Any]:
    """Two processed items (``input_ids``/``labels (L,)``, pixels, ``meta``) -> one row ``prompt + chosen +
    rejected``: ``input_ids``/``labels``/``part (L_p + L_c + L_r,)``, the chosen item's pixels, ``meta``.

    The prompt is their common tokens before either answer's first label. Raises ``SampleDropped`` (``too_long``) for
    a cut answer or a row over ``max_length``, ``SampleError`` (``mismatched_images``) when the pixels differ."""
    for item in (chosen, rejected):
        if item["meta"].get("truncated"):
            raise SampleDropped(f"an answer was cut at max_length={max_length}; a cut answer is not the answer "
                                f"that was preferred", reason="too_long", sample_id=sample_id)
    for key in ("pixel_values", "image_grid_thw"):
        a, b = chosen.get(key), rejected.get(key)
        if (a is None) != (b is None) or (a is not None and (a.shape != b.shape or not torch.equal(a, b))):
            raise SampleError(f"the two answers' {key} differ; both must be about the same images",
                              reason="mismatched_images", sample_id=sample_id)
    ci, ri, cl, rl = chosen["input_ids"], rejected["input_ids"], chosen["labels"], rejected["labels"]
    n = min(len(ci), len(ri))
    differ = (ci[:n] != ri[:n]).nonzero()
    common = int(differ[0]) if len(differ) else n
    first = [int((lab != IGNORE_INDEX).nonzero()[0]) for lab in (cl, rl)]
    p = min([common] + first)
    if common < min(first):
        raise SampleError(f"the two sequences differ at token {common}, before the answers (tokens {first}): the "
                          f"prompt must be the same", reason="mismatched_prompt", sample_id=sample_id)
    row = torch.cat([ci, ri[p:]])
    if max_length is not None and len(row) > max_length:
        raise SampleDropped(f"the pair's row (prompt {p} + chosen {len(ci) - p} + rejected {len(ri) - p} tokens = "
                            f"{len(row)}) is longer than max_length={max_length}", reason="too_long",
                            sample_id=sample_id)
    part = torch.cat([torch.full((p,), PROMPT), torch.full((len(ci) - p,), CHOSEN),
                      torch.full((len(ri) - p,), REJECTED)])
    out = {k: v for k, v in chosen.items() if k not in ("input_ids", "labels", "meta")}
    meta = {**chosen["meta"], "num_tokens": len(row), "prompt_tokens": p}
    return {**out, "input_ids": row, "labels": torch.cat([cl, rl[p:]]), "part": part, "meta": meta}


class ProcessedPairs(WrapsSamples, Dataset):
    """``pair_row`` of each ``Pair`` (processed by ``processor``, the stage's), lazily; bad pairs skipped and counted
    by the wrapped ``PreferenceSamples``. ``ref_logps``: reference log-probs by record index (``{i: (chosen,
    rejected)}``, the ``precomputed`` reference's table), attached to the items as ``ref_logps (2,)``."""

    is_preference = True

    def __init__(self, samples: PreferenceSamples, processor: Any) -> None:
        self.samples, self.processor = samples, processor
        self.ref_logps: dict[int, tuple[float, float]] | None = None
        self.images_per_sample: int | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def process(self, pair: Pair) -> dict[str, Any]:
        sid = pair.chosen.id
        row = pair_row(self.processor(pair.chosen), self.processor(pair.rejected), self.processor.max_length, sid)
        row["meta"]["index"] = pair.chosen.meta.get("index")
        row["meta"]["kind"] = pair.chosen.meta.get("kind", pair.chosen.meta.get("task"))  # per-kind eval metrics
        return row

    def __getitem__(self, index: int) -> dict[str, Any]:
        first_good = getattr(self.samples, "first_good", None)
        item = first_good(index, self.process) if first_good else self.process(self.samples.sample(index))
        if self.ref_logps is not None:
            item["ref_logps"] = torch.tensor(self.ref_logps[item["meta"]["index"]], dtype=torch.float64)
        return item


class PairCollator:
    """``PadCollator`` (right padding) plus ``part (B, L)`` (0 on padding) and, when the items carry them,
    ``ref_logps (B, 2)`` float64."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad = PadCollator(pad_token_id, "right")

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        items = [it for it in items if it is not None]
        batch = self.pad(items)
        batch["part"] = self.pad._pad([it["part"] for it in items], 0)
        if all("ref_logps" in it for it in items):
            batch["ref_logps"] = torch.stack([it["ref_logps"] for it in items])
        return batch


# ------------------------------------------------------------------------------------------------ registration
def processed_pairs(samples: Any, processor: Any) -> Any:
    """``ProcessedPairs`` over ``samples`` with a processor, else ``samples`` (each ``sample(i)`` a ``Pair``)."""
    return samples if processor is None else ProcessedPairs(samples, processor)


@DATASETS.register("preference")
def preference(train: str, eval: str | None = None, part: str = "train", heldout: int | str = "auto",
               seed: int = 0, image_root: str | None = None, processor: Any = None,
               add_generation_prompt: bool = False, skip_bad: bool = True, max_bad_fraction: float | None = 0.05,
               **reader_options: Any) -> Any:
    """Preference pairs from a file (``.json`` / ``.jsonl`` / ``.parquet`` / ``save_to_disk`` folder; the module
    docstring's records). ``part``: ``train`` (the file less the held-out slice when no ``eval`` file is given) or
    ``eval`` (the ``eval`` file, or ``heldout`` samples of ``train``: ``vlm.data.files.heldout_indices``).
    Relative image paths resolve against ``image_root``, else the file's folder."""
    from pathlib import Path

    from vlm.data.files import PARTS, _existing, heldout_indices, heldout_unused

    if part not in PARTS:
        raise ValueError(f"preference part={part!r}; expected one of {list(PARTS)}")
    _existing(train, "data.train")
    _existing(eval, "data.eval")
    heldout_unused(eval, heldout)
    source = eval if part == "eval" and eval is not None else train
    root = image_root if image_root is not None else str(Path(source).parent)
    options = dict(image_folder=root, skip_bad=skip_bad, max_bad_fraction=max_bad_fraction, **reader_options)
    samples = PreferenceSamples(source, **options)
    if eval is None:
        held = heldout_indices(len(samples.records), heldout, seed)
        keep = held if part == "eval" else sorted(set(range(len(samples.records))) - set(held))
        samples.indices = keep
        samples.selection = f"{part}: {len(keep)} of the {len(samples.records)} pairs of {source}"
    return processed_pairs(samples, processor)


def preference_held_out(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The held-out part of a ``preference`` spec: the same file's ``part: eval`` (its ``eval`` file, or the
    ``heldout`` pairs its training part leaves out)."""
    return {**spec, "part": "eval"}


preference.held_out = preference_held_out  # type: ignore[attr-defined]
