"""``pixel_shuffle_mlp`` with ``head='linear'`` is transformers' ``Idefics3Connector`` (pixel shuffle with
``scale_factor`` 2-4 + one Linear without bias), element for element; its options are checked when built and its
grid when composed."""
import pytest
import torch
from transformers import Idefics3Config
from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

import vlm
from tests.conftest import TINY_TEXT
from vlm import connectors


@pytest.mark.parametrize("scale_factor", [2, 3, 4])
def test_linear_head_equals_idefics3_connector(scale_factor):
    cfg = Idefics3Config(vision_config={"hidden_size": 32, "image_size": 96, "patch_size": 8},
                         text_config={**TINY_TEXT["llama"], "hidden_size": 48, "num_attention_heads": 4},
                         scale_factor=scale_factor)
    torch.manual_seed(scale_factor)
    ref = Idefics3Connector(cfg).eval()
    ours = connectors.build({"name": "pixel_shuffle_mlp", "in_dim": 32, "out_dim": 48, "scale": 1 / scale_factor,
                             "head": "linear"})
    assert [n for n, _ in ours.named_parameters()] == ["layers.0.weight"]  # no bias, as Idefics3SimpleMLP
    with torch.no_grad():
        ours.layers[0].weight.copy_(ref.modality_projection.proj.weight)
    x = torch.randn(3, 144, 32)  # a 12x12 patch grid
    assert torch.equal(ours(x, (12, 12)), ref(x))
    assert ours.num_tokens(144, (12, 12)) == 144 // scale_factor ** 2


def test_options_are_checked():
    with pytest.raises(ValueError, match=r"head='conv'; expected one of \['mlp', 'linear'\]"):
        connectors.build({"name": "pixel_shuffle_mlp", "in_dim": 8, "out_dim": 8, "head": "conv"})
    with pytest.raises(ValueError, match=r"hidden_dim=16 does not apply"):
        connectors.build({"name": "pixel_shuffle_mlp", "in_dim": 8, "out_dim": 8, "head": "linear", "hidden_dim": 16})
    mlp = connectors.build({"name": "pixel_shuffle_mlp", "in_dim": 8, "out_dim": 8, "bias": False})
    assert all(not n.endswith("bias") for n, _ in mlp.layers[1:].named_parameters())


def test_a_scale_that_does_not_divide_the_grid_is_refused_when_composed():
    cfg = {"encoder": {"name": "idefics3_vision", "image_size": 40, "patch_size": 8, "hidden_size": 32,
                       "num_layers": 1, "num_heads": 4, "intermediate_size": 64},
           "connector": {"name": "pixel_shuffle_mlp", "scale": 0.5, "head": "linear"},
           "llm": {"name": "hf_causal_lm", "config": TINY_TEXT["llama"]}}
    with pytest.raises(ValueError, match=r"needs a patch grid whose sides are divisible by 2; got 5x5"):
        vlm.build(cfg)
