"""The ``idefics3_vision`` encoder: transformers' ``Idefics3VisionTransformer`` (its bucketized position ids, which
are not the identity for every grid: n = 25 repeats positions), read through ``post_layernorm`` as Idefics3 reads
it; it starts from a SigLIP checkpoint (SmolVLM's start), giving SigLIP's own features where positions agree."""
import pytest
import torch
import transformers
from transformers import Idefics3VisionConfig, SiglipConfig, SiglipModel, SiglipVisionModel
from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionTransformer

from vlm import encoders

DIMS = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64}


def test_features_are_idefics3s_last_hidden_state_for_a_grid_with_repeated_positions():
    enc = encoders.build({"name": "idefics3_vision", **DIMS, "image_size": 50, "patch_size": 2}).eval()  # n = 25
    ref = Idefics3VisionTransformer(Idefics3VisionConfig(**enc.hf_config.to_dict())).eval()
    ref.load_state_dict(enc.model.state_dict())
    x = torch.randn(2, 3, 50, 50)
    with torch.no_grad():
        assert torch.equal(enc(x), ref(pixel_values=x).last_hidden_state)
    assert enc.num_tokens() == 625 and enc.export_config()["post_layernorm"] is True


def test_post_layernorm_off_reads_hidden_states_and_refuses_other_layers_with_it():
    enc = encoders.build({"name": "idefics3_vision", **DIMS, "image_size": 32, "patch_size": 8,
                          "post_layernorm": False, "feature_layer": -2}).eval()
    assert enc(torch.randn(1, 3, 32, 32)).shape == (1, 16, 32)
    with pytest.raises(ValueError, match=r"post_layernorm=True normalizes the last layer's output"):
        encoders.build({"name": "idefics3_vision", **DIMS, "image_size": 32, "patch_size": 8, "feature_layer": -2})
    with pytest.raises(ValueError, match=r"image size \(36, 36\) is not divisible by the patch size 8"):
        encoders.build({"name": "idefics3_vision", **DIMS, "image_size": 36, "patch_size": 8})


def test_starts_from_a_siglip_checkpoint(tmp_path):
    transformers.logging.set_verbosity_error()
    cfg = SiglipConfig(vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                      "num_attention_heads": 4, "image_size": 64, "patch_size": 8},
                       text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                    "num_attention_heads": 4})
    torch.manual_seed(0)
    SiglipModel(cfg).save_pretrained(str(tmp_path))
    enc = encoders.build({"name": "idefics3_vision", "pretrained": str(tmp_path)}).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # an 8x8 grid: the bucketized positions are the identity
        ref = SiglipVisionModel.from_pretrained(str(tmp_path)).eval()(pixel_values=x).last_hidden_state
        assert torch.equal(enc(x), ref)
    assert enc.image_size == 64 and enc.patch_size == 8
