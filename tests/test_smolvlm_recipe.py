"""The ``smolvlm_256m`` recipe, built on ``meta`` with SmolVLM-256M's published dimensions (SigLIP-B/16-512 tower,
scale_factor 4, SmolLM2-135M with the 49,280-token vocabulary and untied output embeddings), has exactly the
parameters of transformers' ``SmolVLMForConditionalGeneration`` for the equivalent config, and its geometry (64
tokens per 512 px view, up to 4 x 4 crops + the global image) is Idefics3's."""
import torch
from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

import vlm
from tests.test_train_recipes import PUBLISHED_PARAMS, SIGLIP_B16_512, SMOLLM2_135M, inline


def test_smolvlm_256m_recipe_has_transformers_parameter_count():
    mc, run = inline("smolvlm_256m", SIGLIP_B16_512, SMOLLM2_135M)
    assert run.encoder.name == "idefics3_vision" and run.encoder.post_layernorm
    assert (run.connector.scale, run.connector.head, run.connector.bias) == (0.25, "linear", False)
    assert run.stage.sft.tiling.kind == "idefics3" and run.stage.sft.tiling.longest_edge == 2048
    with torch.device("meta"):
        model = vlm.build(mc)
        hf = SmolVLMForConditionalGeneration(SmolVLMConfig(
            vision_config=SIGLIP_B16_512, text_config=SMOLLM2_135M, scale_factor=4, tie_word_embeddings=False))
    count = lambda module: sum(p.numel() for p in module.parameters())
    assert count(model) == count(hf) == PUBLISHED_PARAMS["smolvlm_256m"]
    assert count(model.encoder) == count(hf.model.vision_model)
    assert count(model.connector) == count(hf.model.connector) == 768 * 16 * 576  # one Linear, no bias
    assert model.num_image_tokens() == 64  # (512 / 16 / 4)^2
