"""Evaluation never answers a cut prompt: prompts the processor drops are counted and reported, not generated from.
The same on training's strategy and on ``python -m vlm.eval``'s ``OneProcess``."""
from __future__ import annotations

import pytest
import torch
from data_fixtures import processor
from PIL import Image
from torch import nn

from vlm.data.sample import ImageRef, Message, Sample
from vlm.data.tokenizer import byte_tokenizer
from vlm.eval.evaluator import OneProcess, evaluate, format_table
from vlm.train.distributed import Strategy

HEADER = "<|im_start|>assistant\n"


class Echo(nn.Module):
    """Answers 'blue' to every prompt and records the prompts it was given (decoded, padding removed)."""

    def __init__(self, tok):
        super().__init__()
        self.tok, self.prompts = tok, []

    def generate(self, input_ids, pixel_values=None, attention_mask=None, **kw):
        for row, mask in zip(input_ids, attention_mask):
            self.prompts.append(self.tok.decode(row[mask.bool()]))
        answer = self.tok("blue", add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
        return torch.tensor([answer] * input_ids.shape[0])


def sample(i: int, question: str, answer: str = "blue") -> Sample:
    return Sample([Message("user", [ImageRef(0), question]), Message("assistant", [answer])],
                  [Image.new("RGB", (8, 8))], id=f"s{i}")


WORKERS = {"strategy": lambda: Strategy(None), "one_process": lambda: OneProcess("cpu")}


@pytest.mark.parametrize("workers", sorted(WORKERS))
@pytest.mark.parametrize("lockstep", [False, True])
def test_dropped_prompts_are_counted_not_answered(lockstep, workers):
    tok = byte_tokenizer()
    proc = processor(tok, "chatml", k=2, max_length=40)
    long_q = "Which shape is closest to the top left corner of the picture, and what colour is it? " * 3
    samples = [sample(0, long_q), sample(1, "Colour?"), sample(2, long_q), sample(3, long_q, "red"),
               sample(4, "Shape?", "red")]
    model = Echo(tok)
    metrics, records = evaluate(model, WORKERS[workers](), proc, samples, batch_size=1 if lockstep else 2,
                                max_new_tokens=3, precision=torch.float32, lockstep=lockstep)
    assert metrics["answer"] == 0.5 and metrics["answer/n"] == 2  # s1 right, s4 wrong; 3 not scored
    assert metrics["eval_dropped"] == 3
    assert [r["prediction"] for r in records] == [None, "blue", None, None, "blue"]
    assert [r.get("dropped", "").split(":")[0] for r in records] == ["too_long", "", "too_long", "too_long", ""]
    assert all(p.endswith(HEADER) for p in model.prompts)  # no prompt lost its end
    answered = [p for p in model.prompts if "?" in p]
    assert len(answered) == 2 and all(long_q not in p for p in answered)
    # lockstep (FSDP): a batch of dropped prompts still runs generate, on an empty filler prompt, discarded
    assert len(model.prompts) == (5 if lockstep else 2)
    assert "3 sample(s) not evaluated" in format_table(metrics)


def test_nothing_dropped_keeps_the_usual_metrics():
    tok = byte_tokenizer()
    metrics, records = evaluate(Echo(tok), Strategy(None), processor(tok, "chatml", k=2, max_length=64),
                                [sample(0, "Colour?")], batch_size=4, max_new_tokens=3, precision=torch.float32)
    assert "eval_dropped" not in metrics and metrics["answer"] == 1.0 and "dropped" not in records[0]
    assert "not evaluated" not in format_table(metrics)


def _qa(i: int, answer, **extra) -> dict:
    return {"id": f"q{i}", "messages": [{"role": "user", "content": f"Colour {i}?"},
                                        {"role": "assistant", "content": answer}], **extra}


BLANK_REFERENCES = {  # record -> what the drop says
    "spaces": (_qa(1, "   "), "blank reference answer '   '"),
    "newline": (_qa(2, "\n\t"), "blank reference answer"),
    "empty": (_qa(3, ""), ""),  # the reader's own drop or the blank reference: either way named, not scored
    "answers": (_qa(4, "blue", answers=["blue", " "]), "blank reference answer in answers="),
    "captions": (_qa(5, "a cat", captions=["", "a cat"]), "blank reference answer in captions="),
    "choice": (_qa(6, "D", options=["red", "blue"]), "names none of the 2 options"),
    "no_answer": ({"id": "q7", "messages": [{"role": "user", "content": "Colour?"}]}, "no reference answer"),
    "metric": (_qa(8, "blue", metric="bleu"), "metric 'bleu' is not one of"),
}


@pytest.mark.parametrize("case", list(BLANK_REFERENCES))
def test_a_sample_without_a_usable_reference_is_a_named_drop(case, tmp_path):
    """An evaluation file whose sample has a blank reference answer (or none, or one that names no option) drops that
    sample, named by file, id and what was wrong, counted in eval_dropped; the others are scored (it used to stop
    the run with a traceback after training)."""
    import json

    from vlm.data.files import files

    record, says = BLANK_REFERENCES[case]
    path = tmp_path / "val.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (_qa(0, "blue"), record, _qa(9, "red"))))
    samples = files(str(path), str(path), part="eval")
    tok = byte_tokenizer()
    metrics, records = evaluate(Echo(tok), Strategy(None), processor(tok, "chatml", k=2, max_length=64), samples,
                                batch_size=2, max_new_tokens=3, precision=torch.float32)
    assert metrics["eval_dropped"] == 1 and metrics["all/n"] == 2 and metrics["all"] == 0.5
    assert [r["prediction"] for r in records] == ["blue", None, "blue"]
    why = records[1]["dropped"]
    assert f"{path}: sample #1 (id {record['id']!r})" in why and says in why, why
    assert samples.bad.total == 1
