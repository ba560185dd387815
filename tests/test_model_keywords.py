"""A keyword that nothing consumes is an error naming it (issue 22: ``model(**batch, loss_weighting="sample")``
returned the token-mean loss without a word); a moved one says where it went; the LM's own keywords still pass."""
from __future__ import annotations

import pytest
import torch

import vlm
from tests.conftest import image_batch_ids, tiny_cfg
from vlm.llm.keywords import accepted_keywords
from vlm.loss import lm_loss
from vlm.objectives import build as build_objective


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model_batch(request):
    torch.manual_seed(0)
    model = vlm.build(tiny_cfg(text=request.param)).eval()
    ids = image_batch_ids(model, [1, 1], length=model.num_image_tokens() + 12)
    labels = ids.masked_fill(ids == model.image_token_id, -100)
    labels[0, -4:], labels[1, :-9] = -100, -100  # two answers of different lengths: the weightings differ
    size = model.image_size
    batch = {"input_ids": ids, "labels": labels, "pixel_values": torch.randn(2, 3, size, size)}
    return model, batch


def test_moved_keywords_say_where_they_went(model_batch):
    model, batch = model_batch
    with pytest.raises(TypeError, match=r"loss_weighting moved to the lm objective.*stage\.<name>\.loss_weighting"):
        model(**batch, loss_weighting="sample")
    with pytest.raises(TypeError, match=r"objective moved out of the model.*TrainModule"):
        model(**batch, objective=True)
    for call in (model.hidden_states, model.generate):
        with pytest.raises(TypeError, match="loss_weighting moved"):
            call(batch["input_ids"], batch["pixel_values"], loss_weighting="sample")


def test_the_new_home_of_loss_weighting_gives_the_weighted_loss(model_batch):
    """What the message points at computes what the old keyword did: the sample-weighted loss, not the token mean."""
    model, batch = model_batch
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["pixel_values"]).logits
        objective = build_objective({"name": "lm"}, model=model, loss_weighting="sample")
        got = objective(model, batch).loss
    torch.testing.assert_close(got, lm_loss(logits, batch["labels"], "sample"), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, lm_loss(logits, batch["labels"], "token"))


@pytest.mark.parametrize("keywords", [{"loss_weightings": "sample"}, {"weighting": "token"}, {"foo": 1, "bar": 2},
                                      {"segment_id": None}, {"num_items": 4}, {"use_cache": False, "temprature": 0}])
def test_unknown_keywords_are_named(model_batch, keywords):
    model, batch = model_batch
    unknown = sorted(k for k in keywords if k != "use_cache")
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) " + repr(unknown).replace("[", r"\[")
                       .replace("]", r"\]")):
        model(**batch, **keywords)
    with pytest.raises(TypeError, match="unexpected keyword"):
        model.hidden_states(batch["input_ids"], batch["pixel_values"], **keywords)
    if all(v is not None for v in keywords.values()):  # transformers' own check, which lets None values pass
        with pytest.raises(ValueError, match=f"not used by the model.*{unknown[0]}"):
            model.generate(batch["input_ids"], batch["pixel_values"], max_new_tokens=2, **keywords)


def test_the_lm_keywords_still_pass(model_batch):
    """The LM's documented keywords reach it and act: use_cache, num_items_in_batch, output_hidden_states,
    return_dict, logits_to_keep (named parameters and TransformersKwargs pass-throughs)."""
    model, batch = model_batch
    with torch.no_grad():
        base = model(**batch, use_cache=False)
        assert model(**batch, num_items_in_batch=1000).loss < base.loss  # the sum / 1000, not the mean
        out = model(**batch, output_hidden_states=True)
        assert out.hidden_states is not None and len(out.hidden_states) == 3
        assert isinstance(model(**batch, return_dict=False), tuple)
        assert model(batch["input_ids"], batch["pixel_values"], logits_to_keep=1).logits.shape[1] == 1
        hidden = model.hidden_states(batch["input_ids"], batch["pixel_values"], use_cache=False)
        assert hidden.shape[:2] == batch["input_ids"].shape


def test_accepted_keywords_are_asked_of_the_signature():
    def forward(self, input_ids=None, *, labels=None):
        return None

    def forward_kw(self, input_ids=None, **kwargs):
        return None

    assert accepted_keywords(forward) == {"input_ids", "labels"}
    got = accepted_keywords(forward_kw)  # unannotated **kwargs: transformers' documented pass-throughs
    assert got is None or {"input_ids", "num_items_in_batch", "output_attentions", "return_dict"} <= got
