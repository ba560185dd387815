"""The ``dpo`` objective on a micro VLM: the shared-prompt forward (one per pair) gives the log-probs of two separate
forwards and of the model's own logits; the three reference modes agree; preference data (files, shapes pairs) and
its bad input (counted skips by reason); the objective's metrics and its share of the step."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from PIL import Image

from vlm.data.datasets import build_dataset
from vlm.data.preference import PairCollator, pair_row, sft_records
from vlm.data.processor import Processor
from vlm.data.readers.base import SampleError
from vlm.objectives import build as build_objective
from vlm.objectives.pair_logps import CHOSEN, REJECTED, separate_logps, shared_logps
from vlm.train import compose
from vlm.train.build import build_model, build_tokenizer, seed_everything
from vlm.train.policy import apply_policies
from vlm.train.schema import stage_config


@pytest.fixture(scope="module")
def micro():
    """A micro VLM (eval mode), its tokenizer and a chatml processor."""
    cfg = compose("micro", [])
    seed_everything(0)
    tok = build_tokenizer(cfg, ["plain", "chatml"])
    model = build_model(cfg, tok).eval()
    return cfg, tok, model, Processor.for_model(model, tok, template="chatml", max_length=250)


@pytest.fixture(scope="module")
def batch(micro):
    """Four shapes pairs (answers of different lengths) collated into pair rows."""
    _, tok, _, proc = micro
    ds = build_dataset({"name": "shapes_preference", "split": "train", "size": 6, "image_size": 32,
                        "tasks": {"vqa_color": 1, "grounding": 1, "vqa_count": 1}}, proc)
    b = PairCollator(tok.pad_token_id)([ds[i] for i in range(4)])
    b.pop("meta")
    return b


def own_logps(model, ids, labels, pixels):
    """Summed target log-probs of one sequence from the model's own ``forward`` logits (batch of one)."""
    logits = model(input_ids=ids[None], pixel_values=pixels).logits[0, :-1]
    lp = torch.log_softmax(logits, -1)
    tgt = labels[1:]
    m = tgt != -100
    return lp[m].gather(1, tgt[m][:, None]).sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shared_prompt_forward_equals_two_forwards_and_the_models_logits(micro, batch, dtype):
    """Summed over answers of up to ~55 tokens of a random model (~300 nats): in float64 within 1e-5 absolute; in
    float32 within float32's rounding of such sums (1e-7 relative)."""
    _, tok, model, _ = micro
    model = copy.deepcopy(model).to(dtype)
    batch = {k: v.to(dtype) if k == "pixel_values" else v for k, v in batch.items()}
    tol = dict(atol=1e-5, rtol=0) if dtype == torch.float64 else dict(atol=1e-5, rtol=2e-7)
    assert (batch["part"] == REJECTED).any() and (batch["part"] == CHOSEN).any()
    with torch.no_grad():
        shared = shared_logps(model, batch)
        two = separate_logps(model, batch, tok.pad_token_id)
    for a, b in ((shared.chosen, two.chosen), (shared.rejected, two.rejected)):
        torch.testing.assert_close(a, b, **tol)
    assert torch.equal(shared.chosen_tokens, two.chosen_tokens) and torch.equal(shared.rejected_tokens,
                                                                                 two.rejected_tokens)
    # each answer alone, through VLM.forward (the reference: no mask or position of ours involved)
    tiles = batch["pixel_values"].shape[0] // batch["input_ids"].shape[0]
    for b in range(batch["input_ids"].shape[0]):
        part, ids, labels = batch["part"][b], batch["input_ids"][b], batch["labels"][b]
        pixels = batch["pixel_values"][b * tiles:(b + 1) * tiles]
        for which, got in ((CHOSEN, shared.chosen[b]), (REJECTED, shared.rejected[b])):
            keep = (part == 1) | (part == which)
            with torch.no_grad():
                want = own_logps(model, ids[keep], labels[keep], pixels)
            torch.testing.assert_close(got, want.to(got.dtype), **tol)


def test_shared_prompt_gradients_equal_two_forwards(micro, batch):
    _, tok, model, _ = micro
    grads = []
    for fn in (lambda: shared_logps(model, batch), lambda: separate_logps(model, batch, tok.pad_token_id)):
        model.zero_grad()
        lp = fn()
        (lp.chosen - 0.5 * lp.rejected).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-4, msg=n)
    model.zero_grad()


def lora_model(cfg, tok):
    seed_everything(0)
    model = build_model(cfg, tok)
    apply_policies(model, stage_config(compose("micro", ["stage.sft.policy.llm=lora"]), "sft"))
    return model


def test_reference_modes_agree(micro, batch):
    """copy / adapters / precomputed: the reference is the starting model, whatever the policy learned since."""
    cfg, tok, _, proc = micro
    model = lora_model(cfg, tok)
    objectives = {mode: build_objective({"name": "dpo", "reference": mode, "beta": 0.5}, model=model)
                  for mode in ("copy", "adapters", "precomputed")}
    ds = build_dataset({"name": "shapes_preference", "split": "train", "size": 6, "image_size": 32,
                        "tasks": {"vqa_color": 1, "grounding": 1, "vqa_count": 1}}, proc)
    collator = PairCollator(tok.pad_token_id)
    ds.ref_logps = objectives["precomputed"].reference_table(model, ds, collator, torch.device("cpu"),
                                                             torch.float32)
    with torch.no_grad():  # the policy moves away from the reference (as training would)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn_like(p) * 0.5)
    rows = collator([ds[i] for i in range(4)])
    rows.pop("meta")
    model.eval()
    out = {mode: obj(model, rows) for mode, obj in objectives.items()}
    for mode in ("adapters", "precomputed"):
        torch.testing.assert_close(out[mode].loss, out["copy"].loss, atol=1e-5, rtol=0)
        for k, v in out["copy"].metrics.items():
            assert out[mode].metrics[k] == pytest.approx(v, abs=1e-5), (mode, k)
    assert out["copy"].metrics["rewards_chosen"] != 0  # the policy did move
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)  # restored after adapters off


def test_objective_terms_and_step_share(micro, batch):
    """IPO averages per token; sft_weight adds the chosen tokens' mean NLL; the loss is the batch's share."""
    _, _, model, _ = micro
    plain = build_objective({"name": "dpo", "loss_type": "ipo"}, model=model)
    with torch.no_grad():
        out = plain(model, batch)
        lp = shared_logps(model, batch)
        # the reference is a copy of this very model: d = 0, IPO's loss is (1 / (2 beta))^2
        assert out.loss.item() == pytest.approx((1 / 0.2) ** 2, rel=1e-6)
        sft = build_objective({"name": "dpo", "sft_weight": 2.0}, model=model)(model, batch, weight=4, total=8)
    nll = -(lp.chosen.sum() / lp.chosen_tokens.sum()).item()
    assert sft.loss.item() == pytest.approx((0.6931471805599453 + 2.0 * nll) * 4 / 8, rel=1e-5)
    assert set(out.metrics) == {"rewards_chosen", "rewards_rejected", "reward_margin", "preference_accuracy"}


def test_objective_refuses_plain_sft_batches_and_bad_options(micro):
    _, _, model, _ = micro
    obj = build_objective({"name": "dpo"}, model=model)
    with pytest.raises(ValueError, match="needs preference pairs"):
        obj(model, {"input_ids": torch.zeros(1, 4, dtype=torch.long), "labels": torch.zeros(1, 4, dtype=torch.long)})
    with pytest.raises(ValueError, match="reference='frozen'"):
        build_objective({"name": "dpo", "reference": "frozen"}, model=model)
    with pytest.raises(ValueError, match="needs LoRA adapters"):
        build_objective({"name": "dpo", "reference": "adapters"}, model=model)


# ------------------------------------------------------------------------------------------------------- data
def test_record_forms():
    a = {"images": ["x.png"], "prompt": "<image>\nColour?", "chosen": "red", "rejected": "blue"}
    c, r = sft_records(a)
    assert c["messages"][-1] == {"role": "assistant", "content": "red"} and r["messages"][:-1] == c["messages"][:-1]
    conv = [{"role": "user", "content": "<image>\nColour?"}]
    b = {"images": ["x.png"], "chosen": conv + [{"role": "assistant", "content": "red"}],
         "rejected": conv + [{"role": "assistant", "content": "blue"}]}
    assert sft_records(b) == (c, r)
    d = {"image": "x.png", "conversations": [{"from": "human", "value": "<image>\nColour?"}],
         "chosen": {"role": "assistant", "content": "red"}, "rejected": "blue"}
    assert sft_records(d)[0]["messages"][-1]["content"] == "red"


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory):
    """A JSONL file of preference records: 8 good, one of each bad kind."""
    return write_pairs(tmp_path_factory.mktemp("pairs"))


def write_pairs(d):
    """``d/pairs.jsonl``: 8 good preference records (two images), then one of each bad kind; returns its path."""
    for name, colour in (("r.png", (220, 30, 30)), ("b.png", (30, 80, 230))):
        Image.new("RGB", (32, 32), colour).save(d / name)
    good = [{"id": f"g{i}", "images": ["r.png" if i % 2 else "b.png"], "prompt": "<image>\nWhat colour is it?",
             "chosen": "red" if i % 2 else "blue", "rejected": "blue" if i % 2 else "red"} for i in range(8)]
    bad = [
        {"id": "same", "images": ["r.png"], "prompt": "<image>\nColour?", "chosen": "red", "rejected": "red"},
        {"id": "none", "images": ["r.png"], "prompt": "<image>\nColour?", "chosen": "red"},
        {"id": "long", "images": ["r.png"], "prompt": "<image>\nColour?", "chosen": "red " * 100, "rejected": "b"},
        {"id": "imgs", "prompt": "<image>\nColour?", "chosen": "red", "rejected": "blue",
         "chosen_images": ["r.png"], "rejected_images": ["b.png"]},
        {"id": "prompts", "images": ["r.png"], "chosen": [{"role": "user", "content": "<image>\nA?"},
                                                          {"role": "assistant", "content": "red"}],
         "rejected": [{"role": "user", "content": "<image>\nB?"}, {"role": "assistant", "content": "blue"}]},
        {"id": "gone", "images": ["missing.png"], "prompt": "<image>\nColour?", "chosen": "a", "rejected": "b"},
    ]
    path = d / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in good + bad))
    return path


def test_bad_pairs_are_counted_skips_by_reason(micro, pair_file):
    _, tok, _, proc = micro
    ds = build_dataset({"name": "preference", "train": str(pair_file), "heldout": 2, "max_bad_fraction": 1.0},
                       proc)
    held = build_dataset({"name": "preference", "train": str(pair_file), "heldout": 2, "part": "eval"}, proc)
    assert len(ds) + len(held) == 14 and not set(ds.indices) & set(held.indices)
    items = [ds[i] for i in range(len(ds))]
    got = {it["meta"]["id"] for it in items}
    assert got <= {f"g{i}" for i in range(8)}
    assert ds.bad.total == sum(1 for i in ds.indices if i >= 8)  # every bad record of this part, counted once
    batch = PairCollator(tok.pad_token_id)(items[:2])
    assert batch["part"].shape == batch["input_ids"].shape
    # without skip_bad, the first bad record is an error naming the file, the sample and the problem
    strict = build_dataset({"name": "preference", "train": str(pair_file), "heldout": 1, "skip_bad": False}, proc)
    with pytest.raises(SampleError, match=r"pairs\.jsonl.*sample #8 \(id 'same'\).*'chosen' equals 'rejected'"):
        for i in range(len(strict)):
            strict[i]


def test_each_bad_reason(micro, pair_file):
    _, _, _, proc = micro
    ds = build_dataset({"name": "preference", "train": str(pair_file), "eval": str(pair_file),
                        "max_bad_fraction": 1.0}, proc)
    for i in range(len(ds)):
        ds[i]
    assert dict(ds.bad.counts) == {"same_answers": 1, "no_answer": 1, "too_long": 1, "mismatched_images": 1,
                                   "mismatched_prompt": 1, "missing_image": 1}


def test_pair_row_refuses_different_pixels(micro):
    _, _, _, proc = micro
    item = {"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([-100, -100, 3]),
            "pixel_values": torch.zeros(1, 3, 4, 4), "meta": {}}
    other = {**item, "input_ids": torch.tensor([1, 2, 4]), "labels": torch.tensor([-100, -100, 4]),
             "pixel_values": torch.ones(1, 3, 4, 4)}
    with pytest.raises(SampleError, match="pixel_values differ"):
        pair_row(item, other, 100, "s")
    row = pair_row(item, {**other, "pixel_values": item["pixel_values"]}, 100, "s")
    assert row["input_ids"].tolist() == [1, 2, 3, 4] and row["part"].tolist() == [1, 1, 2, 3]


def test_shapes_pairs_reject_a_plausible_wrong_answer_of_the_same_kind():
    """``shapes_preference``: each rejected answer is a wrong answer to the same question, of the same form: another
    colour / shape, one more or one fewer, the right box (same size) moved onto another shape or by a third of the
    image (IoU with the right box < 0.5: a wrong place, not a few units off), a caption with one colour changed;
    each pair carries its kind (task)."""
    import re

    from vlm.data.shapes.preference import ShapesPairs
    from vlm.data.shapes.scene import COLORS, DEFAULT_SHAPES
    from vlm.data.boxes import iou

    pairs = ShapesPairs(split="train", size=250, image_size=48, seed=1,
                        tasks={"vqa_color": 1, "vqa_count": 1, "vqa_shape": 1, "grounding": 1, "caption": 1})
    seen = set()
    for i in range(len(pairs)):
        p = pairs.sample(i)
        task, right, wrong = p.chosen.meta["task"], p.chosen.messages[-1].text(), p.rejected.messages[-1].text()
        seen.add(task)
        assert p.chosen.messages[:-1] == p.rejected.messages[:-1] and right != wrong
        if task == "vqa_color":
            assert right in COLORS and wrong in COLORS
        elif task == "vqa_shape":
            assert right in DEFAULT_SHAPES and wrong in DEFAULT_SHAPES
        elif task == "vqa_count":
            assert abs(int(right) - int(wrong)) == 1 and int(wrong) >= 1
        elif task == "caption":  # one colour word changed, its article with it: no grammatical tell
            changed = [(x, y) for x, y in zip(right.split(), wrong.split()) if x != y]
            assert len(right.split()) == len(wrong.split()) and 1 <= len(changed) <= 2, (right, wrong)
            assert changed[-1][1] in COLORS and not re.search(r"\ba [aeiou]|\ban [^aeiou]", wrong), (right, wrong)
        else:
            a, b = ([int(v) for v in re.findall(r"\d+", t.split("<box>")[1])] for t in (right, wrong))
            assert right.split("<box>")[0] == wrong.split("<box>")[0]
            assert (a[2] - a[0], a[3] - a[1]) == (b[2] - b[0], b[3] - b[1]) and 0 <= min(b) and max(b) <= 999
            assert iou(a, b) < 0.5, (right, wrong)
    assert seen == {"vqa_color", "vqa_shape", "vqa_count", "grounding", "caption"}


def test_pairs_carry_their_kind(micro, tmp_path):
    """A record's ``kind`` (shapes pairs: their task) reaches the processed row's meta (per-kind held-out metrics)."""
    _, _, _, proc = micro
    Image.new("RGB", (32, 32), (220, 30, 30)).save(tmp_path / "r.png")
    records = [{"id": "a", "images": ["r.png"], "prompt": "<image>\nColour?", "chosen": "red", "rejected": "blue",
                "kind": "colour"},
               {"id": "b", "images": ["r.png"], "prompt": "<image>\nColour?", "chosen": "red", "rejected": "green"}]
    (tmp_path / "p.json").write_text(json.dumps(records))
    ds = build_dataset({"name": "preference", "train": str(tmp_path / "p.json"), "eval": str(tmp_path / "p.json")},
                       proc)
    assert [ds[i]["meta"]["kind"] for i in range(2)] == ["colour", None]
    shapes = build_dataset({"name": "shapes_preference", "split": "val", "size": 4, "image_size": 32}, proc)
    assert [shapes[i]["meta"]["kind"] for i in range(4)] == [shapes.samples.sample(i).chosen.meta["task"]
                                                              for i in range(4)]
