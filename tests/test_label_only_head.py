"""The label-only LM head (vlm.loss.label_only_lm_loss, the lm objective's default): the vocabulary projection and
the cross-entropy only at labelled positions, chunked, give the same loss and gradients as the full logits, for
every weighting, on padded and packed batches with images; token weighting honours num_items_in_batch like
transformers' own loss. Also: injection writes into the embeddings without a copy and still matches masked_scatter."""
from __future__ import annotations

import pytest
import torch

import vlm
from vlm.loss import WEIGHTINGS, label_only_lm_loss, lm_loss, mask_segment_starts
from vlm.objectives import build as build_objective

from conftest import image_batch_ids, tiny_cfg


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = vlm.build(tiny_cfg())
    m.train()
    return m


def padded_batch(model):
    ids = image_batch_ids(model, [1, 0, 2], length=48, seed=1)
    labels = torch.full_like(ids, -100)
    for row, (start, end) in enumerate([(30, 48), (5, 40), (44, 48)]):
        labels[row, start:end] = ids[row, start:end]
    mask = torch.ones_like(ids)
    mask[1, 40:] = 0
    return {"input_ids": ids, "labels": labels, "attention_mask": mask,
            "pixel_values": torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))}


def packed_batch(model):
    ids = image_batch_ids(model, [1, 1], length=48, seed=3)
    seg = torch.tensor([[1] * 20 + [2] * 16 + [3] * 12, [1] * 30 + [0] * 18])
    labels = torch.full_like(ids, -100)
    labels[0, 14:] = ids[0, 14:]          # crosses the segment boundaries: their starts are never targets
    labels[1, 22:30] = ids[1, 22:30]
    return {"input_ids": ids, "labels": labels, "segment_ids": seg,
            "pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))}


def loss_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("make", [padded_batch, packed_batch])
@pytest.mark.parametrize("weighting", WEIGHTINGS.names())
@pytest.mark.parametrize("chunk", [7, 4096])   # several chunks (recomputed in backward) and a single one
def test_label_only_loss_and_gradients_equal_the_full_logits(model, make, weighting, chunk):
    assert model.supports_label_only_head
    batch = make(model)
    seg = batch.get("segment_ids")
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def full():
        return lm_loss(model(**inputs).logits, mask_segment_starts(batch["labels"], seg), weighting, seg)

    def label_only():
        return label_only_lm_loss(model.hidden_states(**inputs), model.output_head, batch["labels"], weighting, seg,
                                  chunk_size=chunk)

    ref_loss, ref_grads = loss_and_grads(model, full)
    loss, grads = loss_and_grads(model, label_only)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    assert grads.keys() == ref_grads.keys() and any(k.startswith("encoder.") for k in grads)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("make", [padded_batch, packed_batch])
@pytest.mark.parametrize("weighting", WEIGHTINGS.names())
def test_lm_objective_shares_equal_with_and_without_the_label_only_head(model, make, weighting):
    """The objective's step share (weight / total, num_items_in_batch for token) is the same either way."""
    batch = make(model)
    full = build_objective({"name": "lm", "label_only_head": False}, model=model, loss_weighting=weighting)
    fast = build_objective({"name": "lm", "head_chunk_size": 5}, model=model, loss_weighting=weighting)
    w = full.weight(batch)
    total = 3 * w + 1
    ref_loss, ref_grads = loss_and_grads(model, lambda: full(model, batch, weight=w, total=total).loss)
    out = fast(model, batch, weight=w, total=total)
    assert out.logits is None and full(model, batch).logits is not None
    loss, grads = loss_and_grads(model, lambda: fast(model, batch, weight=w, total=total).loss)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, atol=1e-6, rtol=1e-5, msg=name)


def test_token_weighting_matches_transformers_loss_with_num_items_in_batch(model):
    """token weighting = the LM's own (transformers') loss, num_items_in_batch included."""
    batch = packed_batch(model)
    with torch.no_grad():
        ref = model(**batch, num_items_in_batch=11).loss
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        got = label_only_lm_loss(model.hidden_states(**inputs), model.output_head, batch["labels"], "token",
                                 batch["segment_ids"], num_items_in_batch=11, chunk_size=3)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)


def test_a_batch_without_targets_gives_zero_loss_with_gradients(model):
    batch = padded_batch(model)
    batch["labels"] = torch.full_like(batch["labels"], -100)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    loss = label_only_lm_loss(model.hidden_states(**inputs), model.output_head, batch["labels"])
    loss.backward()
    assert loss.item() == 0.0 and model.output_head.weight.grad is not None
    model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="chunk_size"):
        label_only_lm_loss(torch.zeros(1, 2, 4), model.output_head, torch.zeros(1, 2, dtype=torch.long), chunk_size=0)
    with pytest.raises(ValueError, match="head_chunk_size"):
        build_objective({"name": "lm", "head_chunk_size": 0}, model=model)


def test_models_with_a_logit_transform_fall_back_to_the_full_logits():
    cfg = tiny_cfg()
    cfg["llm"]["config"]["final_logit_softcapping"] = 30.0
    m = vlm.build({**cfg, "llm": {**cfg["llm"], "strict_config": False}})
    assert not m.supports_label_only_head


def test_injection_writes_in_place_and_matches_masked_scatter(model):
    ids = image_batch_ids(model, [2, 1], length=48, seed=5)
    embeds = model.llm.embed(ids)
    feats = torch.randn(int((ids == model.image_token_id).sum()), embeds.shape[-1])
    expected = embeds.masked_scatter((ids == model.image_token_id).unsqueeze(-1), feats)
    out = model.llm.inject(embeds, ids, feats, model.image_token_id)
    assert out.data_ptr() == embeds.data_ptr()
    assert torch.equal(out, expected)
