"""Every shipped recipe composes, passes every check that runs before training and builds on the meta device at
its real dimensions (nothing downloaded); parameter counts match the published models."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import vlm
from vlm.train import compose, list_options
from vlm.train.build import build_model, build_tokenizer
from vlm.train.config import model_config
from vlm.train.config_check import check_runnable, used_data_keys
from vlm.train.policy import apply_policies

CLIP_L14_336 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                "image_size": 336, "patch_size": 14, "projection_dim": 768, "hidden_act": "quick_gelu"}
VICUNA_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
             "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
SIGLIP_SO400M = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                 "num_attention_heads": 16, "image_size": 384, "patch_size": 14, "vision_use_head": False}
QWEN2_0_5B = {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
              "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
              "max_position_embeddings": 32768, "tie_word_embeddings": True}


def inline(recipe: str, encoder: dict, llm: dict) -> tuple[dict, object]:
    """The recipe's model config with the downloaded weights replaced by their architecture."""
    cfg = compose(recipe)
    mc = model_config(cfg)
    assert mc["encoder"].pop("pretrained") and mc["llm"].pop("pretrained")
    mc["encoder"]["config"] = encoder
    mc["llm"]["config"] = llm
    # a real run adds <image> to the tokenizer and grows the embeddings; on meta, reuse the last id instead
    # (transformers' mean-resizing of new rows cannot run on meta tensors)
    mc["image_token_id"] = llm["vocab_size"] - 1
    return mc, cfg


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def llava():
    mc, cfg = inline("llava15", CLIP_L14_336, VICUNA_7B)
    with torch.device("meta"):
        model = vlm.build(mc)
    return model, cfg


def test_llava15_recipe_dimensions(llava):
    model, cfg = llava
    assert cfg.encoder.feature_layer == -2 and cfg.encoder.select == "patch"
    assert cfg.connector.name == "mlp" and cfg.connector.depth == 2 and cfg.connector.act == "gelu"
    assert model.num_image_tokens() == 576  # (336 / 14)^2, CLS dropped
    assert count(model.encoder) == 303_507_456  # CLIP ViT-L/14-336 vision tower
    assert count(model.connector) == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert count(model.llm) == 6_738_415_616  # Vicuna-7B (LLaMA-2 7B)
    assert count(model) == pytest.approx(7.063e9, rel=1e-3)


def test_llava15_hyperparameters():
    cfg = compose("llava15")
    pre, sft = cfg.stage.pretrain, cfg.stage.sft
    assert (pre.lr, pre.global_batch_size, pre.epochs, pre.weight_decay) == (1e-3, 256, 1.0, 0.0)
    assert (sft.lr, sft.global_batch_size, sft.epochs, sft.weight_decay) == (2e-5, 128, 1.0, 0.0)
    for st in (pre, sft):
        assert st.scheduler == "cosine" and st.warmup_ratio == pytest.approx(0.03) and st.max_length == 2048
    assert pre.template == "plain"


def test_llava15_policies_on_meta(llava):
    model, cfg = llava
    apply_policies(model, cfg.stage.pretrain)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == count(model.connector)
    apply_policies(model, cfg.stage.sft)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == count(model.connector) + count(model.llm)


def test_scratch_siglip_qwen_image_tokens():
    mc, _ = inline("scratch_siglip_qwen", SIGLIP_SO400M, QWEN2_0_5B)
    with torch.device("meta"):
        model = vlm.build(mc)
    # the stride-14 patch conv floors: floor(384 / 14)^2 = 27 x 27, SigLIP has no CLS token
    assert model.encoder.grid() == (27, 27) and model.num_image_tokens() == 729


def test_scratch_siglip_qwen_dimensions_and_lora():
    mc, cfg = inline("scratch_siglip_qwen", SIGLIP_SO400M, QWEN2_0_5B)
    with torch.device("meta"):
        model = vlm.build(mc)
    assert count(model.encoder) == 412_987_248  # So400m/14-384 vision tower without the attention-pool head
    assert count(model.llm) == 494_032_768  # Qwen2-0.5B (tied embeddings)
    assert count(model.connector) == 1152 * 896 + 896 + 896 * 896 + 896
    sft = cfg.stage.sft
    assert sft.module_lr.connector == pytest.approx(1e-4) and sft.module_lr.llm == pytest.approx(3e-5)
    with torch.device("meta"):
        apply_policies(model, sft)
    lora = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
    # r=64 on q,k,v,o,gate,up,down of 24 layers: 64 * sum(in + out) per layer
    per_layer = 64 * ((896 + 896) * 2 + (896 + 128) * 2 + (896 + 4864) * 3)
    assert lora == 24 * per_layer == 35_192_832
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"connector", "llm"}

    from vlm.train.optim import param_groups

    groups = {g["name"]: g["lr"] for g in param_groups(model, sft)}
    assert groups["connector.decay"] == pytest.approx(1e-4) and groups["llm.decay"] == pytest.approx(3e-5)


# the architecture of each model directory a recipe's `pretrained:` names (its config.json, written out here)
ARCHITECTURES = {"clip-vit-large-patch14-336": CLIP_L14_336, "vicuna-7b-v1.5": VICUNA_7B,
                 "siglip-so400m-patch14-384": SIGLIP_SO400M, "Qwen2-0.5B-Instruct": QWEN2_0_5B}
# towers built from their own arguments (no transformers ``config``): the arguments a `pretrained:` directory gives
INTERNVIT_300M = {"hidden_size": 1024, "num_layers": 24, "num_heads": 16, "intermediate_size": 4096, "image_size": 448,
                  "patch_size": 14, "norm_type": "layer_norm", "qkv_bias": True, "qk_norm": False}
INTERNVIT_6B = {"hidden_size": 3200, "num_layers": 45, "num_heads": 25, "intermediate_size": 12800, "image_size": 448,
                "patch_size": 14, "norm_type": "rms_norm", "qkv_bias": False, "qk_norm": True}
ARGUMENT_ARCHITECTURES = {"InternViT-300M-448px-hf": INTERNVIT_300M, "InternViT-6B-448px-V1-5-hf": INTERNVIT_6B}
INTERNVIT_300M_PARAMS = 304_012_288
INTERNLM2_1_8B_PARAMS = 1_889_146_880
# parameter counts of the recipes built from published models (image token on the last id: no new embedding row)
PUBLISHED_PARAMS = {"llava15": 303_507_456 + (1024 * 4096 + 4096 + 4096 * 4096 + 4096) + 6_738_415_616,  # ~7.06B
                    "scratch_siglip_qwen": 412_987_248 + (1152 * 896 + 896 + 896 * 896 + 896) + 494_032_768,
                    # InternVL2-2B: InternViT-300M + LayerNorm(4096) -> 4096x2048 -> 2048x2048 + InternLM2-1.8B (~2.21B)
                    "internvl2": INTERNVIT_300M_PARAMS + (2 * 4096 + 4096 * 2048 + 2048 + 2048 * 2048 + 2048)
                    + INTERNLM2_1_8B_PARAMS}


def create_data_files(cfg) -> None:
    """Empty stand-ins at the data paths the run reads (the pre-training check tests that they exist)."""
    for key in used_data_keys(cfg):
        spec = cfg.data[key]
        if spec.get("path") is not None:
            Path(spec.path).parent.mkdir(parents=True, exist_ok=True)
            Path(spec.path).touch()
        if spec.get("image_root") is not None:
            Path(spec.image_root).mkdir(parents=True, exist_ok=True)


def meta_model_config(cfg):
    """``(vlm.build config, tokenizer or None)`` building the run's model at its real size on the meta device.

    Components loaded from ``pretrained`` directories get their architecture from ``ARCHITECTURES``; a file-free
    tokenizer is built as in a run, and the LLM's vocabulary is set to its final length (transformers cannot resize
    embeddings on meta)."""
    mc = model_config(cfg)
    for module in ("encoder", "llm"):
        pretrained = mc[module].pop("pretrained", None)
        if pretrained is not None and Path(pretrained).name in ARGUMENT_ARCHITECTURES:
            mc[module].update(ARGUMENT_ARCHITECTURES[Path(pretrained).name])
        elif pretrained is not None:
            arch = ARCHITECTURES.get(Path(pretrained).name)
            assert arch is not None, f"add the architecture of {pretrained!r} to ARCHITECTURES"
            mc[module]["config"] = dict(arch)
    if cfg.tokenizer.get("path") is not None:  # a tokenizer directory (next to the weights): not here
        mc["image_token_id"] = mc["llm"]["config"]["vocab_size"] - 1
        return mc, None
    tok = build_tokenizer(cfg, [cfg.stage[n].template for n in cfg.stages])
    tok.add_tokens(["<image>"], special_tokens=True)
    mc["llm"]["config"]["vocab_size"] = max(len(tok), mc["llm"]["config"]["vocab_size"])
    return mc, tok


@pytest.mark.parametrize("recipe", list_options("recipe"))
def test_every_recipe_checks_and_builds_on_meta(recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("VLM_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("VLM_MODELS", str(tmp_path / "models"))
    cfg = compose(recipe)                       # schema + every name (config.check)
    create_data_files(cfg)
    check_runnable(cfg, torch.device("cpu"))    # files and devices: the rest of what runs before training
    mc, tok = meta_model_config(cfg)
    with torch.device("meta"):
        model = vlm.build(mc, tok)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    n = count(model)
    if recipe in PUBLISHED_PARAMS:
        assert n == PUBLISHED_PARAMS[recipe]
    if tok is not None:  # small enough to build for real: the same parameters as the run's model
        real = build_model(cfg, tok)
        assert n == count(real) and [(k, v.shape) for k, v in model.state_dict().items()] == \
            [(k, v.shape) for k, v in real.state_dict().items()]
    with torch.device("meta"):
        for name in cfg.stages:  # every stage's policies apply to the built model
            apply_policies(model, cfg.stage[name])
            assert any(p.requires_grad for p in model.parameters()), name


@pytest.mark.parametrize("encoder,dims", [("internvit_300m", INTERNVIT_300M), ("internvit_6b", INTERNVIT_6B)])
def test_internvit_towers_have_transformers_parameter_counts(encoder, dims):
    """Our InternViT at the published dimensions has exactly the parameters of transformers' InternVLVisionModel."""
    from transformers import InternVLVisionConfig, InternVLVisionModel

    from vlm.encoders.internvit import dims_to_hf

    cfg = compose("internvl2", [f"encoder={encoder}"])
    spec = {k: v for k, v in dict(cfg.encoder).items() if k != "pretrained"}
    with torch.device("meta"):
        ours = vlm.encoders.build({**spec, **dims})
        theirs = InternVLVisionModel(InternVLVisionConfig(**dims_to_hf(ours.dims)))
    assert count(ours) == count(theirs)
    if encoder == "internvit_300m":
        assert count(ours) == INTERNVIT_300M_PARAMS  # InternViT-300M-448px
    else:
        assert count(ours) == pytest.approx(5.54e9, rel=1e-2)  # InternViT-6B-448px-V1.5 (5.5B)


def test_internvl2_recipe():
    cfg = compose("internvl2")
    pre, sft = cfg.stage.pretrain, cfg.stage.sft
    assert (pre.lr, pre.weight_decay, sft.lr, sft.weight_decay, sft.global_batch_size) == (2e-4, 0.01, 4e-5, 0.01, 128)
    assert dict(pre.policy) == {"encoder": "frozen", "connector": "full", "llm": "frozen"}
    assert dict(sft.policy) == {"encoder": "full", "connector": "full", "llm": "full"}
    for st in (pre, sft):
        assert st.tiling.max_tiles == 12 and st.tiling.thumbnail and st.max_length == 4096
        assert st.template.image_start == "<img>" and st.template.image_end == "</img>"
    mc = model_config(cfg)
    mc["encoder"].pop("pretrained")
    mc["encoder"].update(INTERNVIT_300M)
    mc["image_token_id"] = mc["llm"]["config"]["vocab_size"] - 1
    with torch.device("meta"):
        model = vlm.build(mc)
    assert model.encoder.grid() == (32, 32) and model.num_image_tokens() == 256  # 1024 patches, pixel-shuffled
    assert count(model.llm) == INTERNLM2_1_8B_PARAMS
