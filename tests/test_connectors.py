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


def internvl_pixel_shuffle(x, scale_factor=0.5):
    """transformers' ``InternVLModel.pixel_shuffle`` (InternVL's ps_version v2) on ``(N, h, w, C)``, as the oracle."""
    from transformers import InternVLConfig, InternVLModel

    cfg = InternVLConfig(vision_config={"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
                                        "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                         text_config={"model_type": "qwen2", "hidden_size": 16, "intermediate_size": 32,
                                      "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                                      "vocab_size": 64})
    return InternVLModel(cfg).pixel_shuffle(x, scale_factor)


def test_pixel_shuffle_mlp_matches_internvl():
    torch.manual_seed(0)
    c = connectors.build({"name": "pixel_shuffle_mlp", "scale": 0.5}, in_dim=8, out_dim=24)
    x = torch.randn(2, 16, 8)  # a 4x4 grid
    # InternVL's extract_feature: reshape to (N, h, w, C), shuffle, flatten, mlp1
    ref = internvl_pixel_shuffle(x.reshape(2, 4, 4, 8))
    ref = c.layers(ref.reshape(2, -1, ref.shape[-1]))
    assert c.num_tokens(16, (4, 4)) == 4
    torch.testing.assert_close(c(x, (4, 4)), ref)
    assert list(c.state_dict())[:4] == ["layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"]
    # every 2x2 block of neighbouring patches lands in one output token
    x = torch.arange(16.0).reshape(1, 16, 1).repeat(1, 1, 2)
    folded = internvl_pixel_shuffle(x.reshape(1, 4, 4, 2)).reshape(1, 4, 8)
    assert sorted(set(folded[0, 0].tolist())) == [0.0, 1.0, 4.0, 5.0]


def test_pixel_shuffle_mlp_errors():
    c = connectors.build({"name": "pixel_shuffle_mlp"}, in_dim=8, out_dim=24)
    with pytest.raises(ValueError, match="no CLS"):
        c.num_tokens(17, (4, 4))
    with pytest.raises(ValueError, match="divisible by 2"):
        c.num_tokens(9, (3, 3))
    with pytest.raises(ValueError, match="1/k"):
        connectors.build({"name": "pixel_shuffle_mlp", "scale": 0.3}, in_dim=8, out_dim=24)


def test_pixel_shuffle_in_a_vlm():
    import vlm
    from tests.conftest import image_batch_ids, tiny_cfg

    model = vlm.build(tiny_cfg("siglip", "qwen2", connector={"name": "pixel_shuffle_mlp", "scale": 0.5},
                               interpolate_pos_encoding=True))
    assert model.num_image_tokens() == 4 and model.num_image_tokens((64, 32)) == 8
    ids = image_batch_ids(model, [1, 2])
    out = model(ids, torch.randn(3, 3, 32, 32), labels=ids)
    assert torch.isfinite(out.loss)


def test_linear_connector_learned_position_embedding():
    plain = connectors.build({"name": "linear"}, in_dim=6, out_dim=4)
    posed = connectors.build({"name": "linear", "pos_embed": 9}, in_dim=6, out_dim=4)
    posed.proj.load_state_dict(plain.proj.state_dict())
    x = torch.randn(2, 9, 6)
    torch.testing.assert_close(posed(x, (3, 3)), plain(x, (3, 3)))  # zero-initialized: starts as the projection
    with torch.no_grad():
        posed.pos.copy_(torch.arange(36.0).reshape(9, 4))
    torch.testing.assert_close(posed(x, (3, 3)) - plain(x, (3, 3)), torch.arange(36.0).reshape(1, 9, 4).expand(2, -1, -1))
    posed(x, (3, 3)).sum().backward()
    assert posed.pos.grad is not None and torch.equal(posed.pos.grad, torch.full((9, 4), 2.0))
    with pytest.raises(ValueError, match="sized for 9 tokens per image; got 16"):
        posed(torch.randn(1, 16, 6), (4, 4))
    again = connectors.build(posed.export_config(), in_dim=6, out_dim=4)
    assert again.pos.shape == (9, 4)
    with pytest.raises(ValueError, match="pos_embed=-1"):
        connectors.build({"name": "linear", "pos_embed": -1}, in_dim=6, out_dim=4)
