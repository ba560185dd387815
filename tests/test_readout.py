"""``readout``: the tower answers the questions directly, byte by byte (vlm/objectives/readout.py)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vlm.data.processor import Processor
from vlm.data.sample import ImageRef, Message, Sample
from vlm.objectives import build as build_objective
from vlm.objectives.readout import END
from vlm.train import ConfigError, compose, run

from test_objectives import micro_model


def qa_batch(model, pairs, image_size=32):  # noqa: D103
    """A chatml batch of (question, answer, colour) samples: one solid-colour image each."""
    proc = Processor.for_model(model, model.tokenizer, "chatml")
    items = []
    for q, a, colour in pairs:
        img = Image.new("RGB", (image_size, image_size), colour)
        items.append(proc(Sample([Message("user", [ImageRef(0), q]), Message("assistant", [a])], [img])))
    from vlm.data.collate import PadCollator

    batch = PadCollator(model.tokenizer.pad_token_id)(items)
    batch.pop("meta")
    return batch


@pytest.fixture(scope="module")
def case():
    _, model = micro_model()
    return model


def test_targets_are_the_answer_bytes_then_the_end_marker(case):
    model = case
    head = build_objective({"name": "readout", "dim": 16, "hidden": 32, "max_chars": 6}, model=model)
    batch = qa_batch(model, [("What is written?", "42", "red"), ("Where?", "a long answer", "blue")])
    target = head.targets(model.tokenizer, batch["input_ids"], batch["labels"])
    assert target[0].tolist() == [ord("4"), ord("2"), END, -100, -100, -100]
    assert target[1].tolist() == [*b"a lon", END]  # cut at max_chars, the end marker kept


def test_question_embedding_is_the_prompt_only(case):
    model = case
    head = build_objective({"name": "readout", "dim": 16, "hidden": 32}, model=model)
    batch = qa_batch(model, [("What is written?", "42", "red")])
    ids, labels = batch["input_ids"], batch["labels"]
    q = head.embed_question(ids, labels, batch["attention_mask"], model.image_token_id)
    prompt = [i for i, y in zip(ids[0].tolist(), labels[0].tolist()) if y == -100 and i != model.image_token_id]
    torch.testing.assert_close(q[0], head.question.weight[prompt].mean(0))
    # the answer's tokens never enter the question (changing them changes nothing)
    other = ids.clone()
    other[labels != -100] = 7
    torch.testing.assert_close(head.embed_question(other, labels, batch["attention_mask"], model.image_token_id), q)


def test_learns_to_answer_from_the_image(case):
    """Two questions whose answers depend only on the image's colour: the tower + read-out learn them."""
    model = case
    torch.manual_seed(0)
    head = build_objective({"name": "readout", "dim": 32, "hidden": 64, "max_chars": 8}, model=model)
    pairs = [("Which colour?", "red", "red"), ("Which colour?", "blue", "blue"),
             ("Which colour?", "green", "green"), ("Is it dark?", "no", "yellow")]
    batch = qa_batch(model, pairs)
    params = list(model.encoder.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, 3e-3)
    for _ in range(150):
        out = head(model, batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    out = head(model, batch)
    assert out.metrics["exact"] == 1.0 and out.loss.item() < 0.05
    assert out.logits.shape == (4, 8, 257)


def test_bad_input_is_named(case):
    model = case
    head = build_objective({"name": "readout", "dim": 16, "hidden": 32}, model=model)
    batch = qa_batch(model, [("What?", "42", "red")])
    with pytest.raises(ValueError, match="sample 0 of the batch has no answer"):
        head(model, {**batch, "labels": torch.full_like(batch["labels"], -100)})
    with pytest.raises(ValueError, match="exactly one image per sample"):
        head(model, {**batch, "pixel_values": torch.randn(2, 3, 32, 32)})
    tokenizer, model.tokenizer = model.tokenizer, None
    try:
        with pytest.raises(ValueError, match="decodes the answers with the model's tokenizer"):
            build_objective({"name": "readout"}, model=model)
    finally:
        model.tokenizer = tokenizer


def test_readout_stage_trains_the_tower_only(tmp_path):
    """``recipes/stage/readout.yaml``: first in a recipe, on the SFT data and template; only the encoder changes."""
    overrides = ["stage=[readout,sft]", "stages=[readout,sft]", "stage.readout.global_batch_size=8",
                 "stage.readout.micro_batch_size=4", "stage.readout.max_steps=4", "stage.readout.save_every=2",
                 "stage.readout.objective.dim=16", "stage.readout.objective.hidden=32", "stage.sft.max_steps=2",
                 "eval.enabled=false", f"output_dir={tmp_path}"]
    cfg = compose("micro", overrides)
    assert cfg.stage.readout.template == cfg.stage.sft.template and cfg.stage.readout.data == "sft"
    res = run(cfg)
    assert all(math.isfinite(x) for x in res.losses["readout"]) and len(res.losses["readout"]) == 4
    delta = load_file(str(tmp_path / "readout" / "weights.safetensors"))
    assert delta and all(k.startswith("encoder.") for k in delta)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if r.get("stage") == "readout" and "objective" in r]
    assert logged and all(0.0 <= r["objective"]["exact"] <= 1.0 for r in logged)


def test_readout_refuses_packing():
    with pytest.raises(ConfigError, match="needs one whole sample per row"):
        compose("micro", ["stage=[readout,sft]", "stages=[readout,sft]", "stage.readout.packing=true",
                          "stage.readout.max_length=256"])


def test_region_features_sample_the_box_left_to_right(case):
    """The token map is sampled at points spread over the box, in row-major order: a map whose value is the
    token's column gives the columns under the box, left to right."""
    model = case
    head = build_objective({"name": "readout", "dim": 16, "hidden": 32, "region_grid": [1, 4]}, model=model)
    h, w = head.grid
    assert head.regions and h * w == head.num_tokens
    col = torch.arange(w, dtype=torch.float32).repeat(h)[None, :, None]              # (1, T, 1): value = column
    whole = head.region_features(col, [0], [(0, 0, 1000, 1000)])
    torch.testing.assert_close(whole, torch.arange(w, dtype=torch.float32)[None])
    # the right half of the image: points at columns 2.25, 2.75, 3.25 (border-clamped), 3.75 -> interpolated
    right = head.region_features(col, [0], [(500, 0, 1000, 1000)])[0]
    assert right.tolist() == sorted(right.tolist()) and right[0] > 1.5 and right[-1] <= w - 1


def test_grounding_answers_train_the_region_read_out(case):
    model = case
    head = build_objective({"name": "readout", "dim": 16, "hidden": 32}, model=model)
    batch = qa_batch(model, [("Where is it?", "<ref>42</ref><box>(100,100),(600,400)</box>", "red"),
                             ("What is written?", "17", "blue")])
    out = head(model, batch)
    assert "region_exact" in out.metrics and math.isfinite(out.loss.item())
    out.loss.backward()
    assert head.region_mlp[0].weight.grad.abs().sum() > 0
    plain = build_objective({"name": "readout", "dim": 16, "hidden": 32, "regions": False}, model=model)
    assert "region_exact" not in plain(model, batch).metrics
