"""Position schemes and injection sites are capabilities the parts state and ``VLM`` asks (docs/architecture.md)."""
import pytest
import torch

import vlm
from tests.conftest import tiny_cfg
from vlm.connectors import CONNECTORS
from vlm.injection import INJECTION_SITES
from vlm.llm.masks import positions_from_segments
from vlm.llm.positions import POSITION_SCHEMES, PositionScheme


def test_every_connector_states_a_registered_injection_site():
    sites = {CONNECTORS.get(name).injection_site for name in CONNECTORS.names()}
    assert sites == set(INJECTION_SITES.names())  # each site is used, each connector's site exists


@pytest.mark.parametrize("connector, site", [("mlp", "input_embeddings"), ("xattn", "cross_attention")])
def test_the_model_injects_where_the_connector_says(connector, site):
    cfg = tiny_cfg()
    cfg["connector"] = {"name": connector}
    model = vlm.build(cfg)
    assert type(model.injection) is INJECTION_SITES.get(site)


def test_rope_1d_keeps_given_positions_restarts_per_segment_and_else_leaves_them_to_the_lm():
    scheme = POSITION_SCHEMES.get("rope_1d")()
    ids = torch.zeros(2, 6, dtype=torch.long)
    seg = torch.tensor([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
    assert scheme.position_ids(ids) is None
    assert torch.equal(scheme.position_ids(ids, segment_ids=seg), positions_from_segments(seg))
    given = torch.arange(6).expand(2, 6)
    assert scheme.position_ids(ids, segment_ids=seg, position_ids=given) is given


def test_the_model_asks_the_llms_position_scheme(monkeypatch):
    """A scheme the LLM states decides the positions the LM sees: a stretched 1-D scheme gives exactly the logits of
    calling the model with those positions."""
    class Shifted(PositionScheme):
        def position_ids(self, input_ids, **_):
            return torch.arange(input_ids.shape[1]).expand_as(input_ids) * 2

    torch.manual_seed(0)
    model = vlm.build(tiny_cfg()).eval()
    ids = torch.randint(0, 50, (1, 7))
    want = model(ids, position_ids=torch.arange(7)[None] * 2).logits
    default = model(ids).logits
    model.positions = Shifted()
    got = model(ids).logits
    assert torch.equal(got, want) and not torch.allclose(got, default)


def test_an_unknown_injection_site_is_named(monkeypatch):
    cfg = tiny_cfg()
    monkeypatch.setattr(CONNECTORS.get("mlp"), "injection_site", "deep_stack")
    with pytest.raises(KeyError, match="deep_stack"):
        vlm.build(cfg)
