import pytest
import torch

from vlm import connectors


@pytest.mark.parametrize("cfg,params", [({"name": "identity"}, 0), ({"name": "linear"}, 16 * 24 + 24),
                                        ({"name": "mlp", "depth": 1}, 16 * 24 + 24),
                                        ({"name": "mlp", "depth": 2}, 16 * 24 + 24 + 24 * 24 + 24),
                                        ({"name": "mlp", "depth": 3, "hidden_dim": 8}, 16 * 8 + 8 + 8 * 8 + 8 + 8 * 24 + 24)])
def test_shapes_and_params(cfg, params):
    out_dim = 16 if cfg["name"] == "identity" else 24
    c = connectors.build(cfg, in_dim=16, out_dim=out_dim)
    x = torch.randn(2, 9, 16)
    y = c(x, (3, 3))
    assert y.shape == (2, 9, out_dim)
    assert c.num_tokens(9, (3, 3)) == 9
    assert sum(p.numel() for p in c.parameters()) == params
    again = connectors.build(c.export_config())
    again.load_state_dict(c.state_dict())
    torch.testing.assert_close(again(x, (3, 3)), y)


def test_mlp2x_gelu_layout_matches_llava():
    c = connectors.build({"name": "mlp", "depth": 2}, in_dim=16, out_dim=24)
    assert list(c.state_dict()) == ["layers.0.weight", "layers.0.bias", "layers.2.weight", "layers.2.bias"]
    x = torch.randn(1, 4, 16)
    ref = torch.nn.functional.linear(torch.nn.functional.gelu(c.layers[0](x)), c.layers[2].weight, c.layers[2].bias)
    torch.testing.assert_close(c(x, (2, 2)), ref)


def test_errors():
    with pytest.raises(ValueError, match="identity connector needs"):
        connectors.build({"name": "identity"}, in_dim=16, out_dim=24)
    c = connectors.build({"name": "linear"}, in_dim=16, out_dim=24)
    with pytest.raises(ValueError, match=r"expects \(N, T, 16\)"):
        c(torch.randn(2, 9, 15), (3, 3))
    with pytest.raises(ValueError, match="depth"):
        connectors.build({"name": "mlp", "depth": 0}, in_dim=16, out_dim=24)
