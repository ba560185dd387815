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
EVA_VIT_G = {"hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 39, "num_attention_heads": 16,
             "image_size": 224, "patch_size": 14, "layer_norm_eps": 1e-6, "qkv_bias": True}
OPT_2_7B = {"model_type": "opt", "hidden_size": 2560, "ffn_dim": 10240, "num_hidden_layers": 32,
            "num_attention_heads": 32, "vocab_size": 50272, "max_position_embeddings": 2048,
            "word_embed_proj_dim": 2560, "do_layer_norm_before": True, "tie_word_embeddings": True}
QWEN2_0_5B = {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
              "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
              "max_position_embeddings": 32768, "tie_word_embeddings": True}

# Qwen-7B as a qwen2 model (Qwen-VL's LLM): MHA with q/k/v biases, SwiGLU 11008, untied embeddings
QWEN_7B = {"model_type": "qwen2", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 151936,
           "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
           "tie_word_embeddings": False}


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


def eva_vit_g_params(h: int = 1408, ffn: int = 6144, layers: int = 39, patches: int = 256) -> int:
    """Closed form: CLS + positions + patch conv, per layer fused qkv (+ q/k/v bias) / out proj / 2 MLP / 2 LN,
    post_layernorm."""
    per_layer = (h * 3 * h + 3 * h) + (h * h + h) + (h * ffn + ffn) + (ffn * h + h) + 4 * h
    return h + (patches + 1) * h + (3 * 14 * 14 * h + h) + layers * per_layer + 2 * h


def opt_params(d: int = 2560, ffn: int = 10240, layers: int = 32, vocab: int = 50272, positions: int = 2048) -> int:
    """Closed form: tied token embeddings, learned positions (+2 offset rows), per layer q/k/v/o + 2 MLP + 2 LN,
    final LN."""
    return vocab * d + (positions + 2) * d + layers * (4 * (d * d + d) + (d * ffn + ffn) + (ffn * d + d) + 4 * d) \
        + 2 * d


@pytest.fixture(scope="module")
def blip2():
    mc, cfg = inline("blip2", EVA_VIT_G, OPT_2_7B)
    with torch.device("meta"):
        model = vlm.build(mc)
    return model, cfg


def test_blip2_recipe_dimensions(blip2):
    """EVA ViT-g + Q-Former (32 queries) + OPT-2.7B at real size; the bridge has exactly transformers' BLIP-2
    Q-Former + query tokens + language projection + the tower's post_layernorm (our connector's input_norm)."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    model, cfg = blip2
    assert cfg.encoder.select == "all" and cfg.connector.name == "qformer"
    assert model.num_image_tokens() == 32 and model.encoder.num_tokens() == 257  # CLS + 16 x 16 patches
    assert count(model.encoder) == eva_vit_g_params() == 985_952_256
    assert count(model.llm) == opt_params() == 2_651_596_800  # OPT-2.7B
    with torch.device("meta"):
        hf = Blip2ForConditionalGeneration(Blip2Config(vision_config=EVA_VIT_G, text_config=OPT_2_7B,
                                                       num_query_tokens=32, image_token_index=50271))
    bridge = count(hf.qformer) + hf.query_tokens.numel() + count(hf.language_projection) \
        + count(hf.vision_model.post_layernorm)
    assert count(model.connector) == bridge == 107_133_696
    # ours keeps the tower's own (unused, frozen) post_layernorm besides the connector's copy
    assert count(model) == count(hf) + 2 * 1408 == 3_744_682_752


def test_blip2_hyperparameters_and_policy(blip2):
    model, cfg = blip2
    assert list(cfg.stages) == ["pretrain"]
    st = cfg.stage.pretrain
    assert (st.lr, st.weight_decay, list(st.betas), st.warmup_steps, st.min_lr_ratio) == (1e-4, 0.05, [0.9, 0.98],
                                                                                          2000, 0.5)
    assert (st.max_steps, st.global_batch_size, st.scheduler, st.template) == (80000, 1920, "cosine", "plain")
    assert cfg.connector.dropout == 0.1 and cfg.connector.cross_attention_frequency == 2
    apply_policies(model, st)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == count(model.connector)  # ViT and LLM frozen: Q-Former + projection (+ input LayerNorm)


# Qwen2.5-VL-3B-Instruct's config.json (the checkpoint's; transformers' Qwen2_5_VLConfig defaults are other sizes):
# one directory holds the tower (vision_config), the merger and the text model (text_config)
QWEN25_VL_3B = {
    "model_type": "qwen2_5_vl", "tie_word_embeddings": True, "image_token_id": 151655, "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                      "hidden_act": "silu", "in_channels": 3, "patch_size": 14, "temporal_patch_size": 2,
                      "spatial_merge_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
                      "out_hidden_size": 2048, "tokens_per_second": 2},
    "text_config": {"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                    "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936,
                    "max_position_embeddings": 128000, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                        "mrope_section": [16, 24, 24]}}}


def part_architecture(arch: dict, module: str) -> dict:
    """The config of ``module`` (encoder / llm) in a directory of ``arch``: a full vision-language model's
    ``vision_config`` / ``text_config`` with their ``model_type`` (``<type>_vision`` / ``<type>_text``), else
    ``arch`` itself."""
    if "vision_config" not in arch:
        return dict(arch)
    part, suffix = {"encoder": ("vision_config", "_vision"), "llm": ("text_config", "_text")}[module]
    return {**arch[part], "model_type": arch["model_type"] + suffix}


# the architecture of each model directory a recipe's `pretrained:` names (its config.json, written out here);
# {}: a weights file whose architecture the component config names itself (open_clip by model name)
# SmolVLM-256M's parts (recipe smolvlm_256m): SigLIP-B/16-512 as its tower, SmolLM2-135M with SmolVLM's 49,280-token
# vocabulary and untied output embeddings
SIGLIP_B16_512 = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                  "image_size": 512, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}
SMOLLM2_135M = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49280,
                "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
                "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}}
ARCHITECTURES = {"clip-vit-large-patch14-336": CLIP_L14_336, "vicuna-7b-v1.5": VICUNA_7B,
                 "siglip-base-patch16-512": SIGLIP_B16_512, "SmolLM2-135M-Instruct": SMOLLM2_135M,
                 "siglip-so400m-patch14-384": SIGLIP_SO400M, "Qwen2-0.5B-Instruct": QWEN2_0_5B,
                 "Qwen-7B-qwen2": QWEN_7B, "open_clip_pytorch_model.bin": {},
                 "blip2-eva-vit-g": EVA_VIT_G, "opt-2.7b": OPT_2_7B, "Qwen2.5-VL-3B-Instruct": QWEN25_VL_3B}
# Qwen-VL's parts: OpenCLIP ViT-bigG/14 at 448 px without its pooling head (1664 wide, 48 blocks, MLP 8192, 32 x 32
# patches + CLS position embeddings), the resampler at 4096 wide, Qwen-7B
BIGG_448 = (3 * 14 * 14 * 1664 + 1664 + 1025 * 1664 + 2 * 1664
            + 48 * (4 * 1664 * 1664 + 2 * 1664 * 8192 + 8192 + 9 * 1664))
QWENVL_RESAMPLER = 256 * 4096 + 1664 * 4096 + 4 * 4096 * 4096 + 4 * 4096 + 6 * 4096 + 4096 * 4096
QWEN_7B_PARAMS = 7_721_324_544
# Qwen-VL's own ViT (recipe qwenvl_chat_lora): ViT-bigG/14 at 448 px without the class token, a 256-row position table
QWENVL_VIT = BIGG_448 - 1664 - 1025 * 1664 + 256 * 1664
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
                    "qwenvl": BIGG_448 + QWENVL_RESAMPLER + QWEN_7B_PARAMS,  # ~9.66B
                    "blip2": 985_952_256 + 107_133_696 + 2_651_596_800,  # ~3.74B
                    # InternVL2-2B: InternViT-300M + LayerNorm(4096) -> 4096x2048 -> 2048x2048 + InternLM2-1.8B (~2.21B)
                    "internvl2": INTERNVIT_300M_PARAMS + (2 * 4096 + 4096 * 2048 + 2048 + 2048 * 2048 + 2048)
                    + INTERNLM2_1_8B_PARAMS,
                    # Qwen2.5-VL-3B-Instruct: transformers' Qwen2_5_VLForConditionalGeneration of QWEN25_VL_3B (~3.75B)
                    "qwen25vl_3b": 3_754_622_976,
                    "qwenvl_chat_lora": QWENVL_VIT + QWENVL_RESAMPLER + QWEN_7B_PARAMS,  # ~9.6B, Qwen-VL-Chat
                    # SmolVLM-256M: transformers' SmolVLMForConditionalGeneration of the same parts
                    "smolvlm_256m": 256_484_928}


def create_data_files(cfg) -> None:
    """Empty stand-ins at the data paths the run reads (the pre-training check tests that they exist)."""
    for key in used_data_keys(cfg):
        spec = cfg.data[key]
        if spec.get("path") is not None:
            Path(spec.path).parent.mkdir(parents=True, exist_ok=True)
            Path(spec.path).touch()
        if spec.get("image_root") is not None:
            Path(spec.image_root).mkdir(parents=True, exist_ok=True)
    if cfg.get("init_from") is not None:  # a checkpoint directory to start from (qwenvl_chat_lora: Qwen-VL-Chat)
        Path(cfg.init_from).mkdir(parents=True, exist_ok=True)
        (Path(cfg.init_from) / "model.safetensors").touch()


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
            if arch:
                mc[module]["config"] = part_architecture(arch, module)
    mc["connector"].pop("pretrained", None)  # a connector loading its weights from a directory (patch_merger)
    if cfg.tokenizer.get("path") is not None:  # a tokenizer directory (next to the weights): not here
        mc["image_token_id"] = mc["llm"]["config"]["vocab_size"] - 1
        mc["video_token_id"] = mc["llm"]["config"]["vocab_size"] - 2  # (a tower taking videos: Qwen's <|video_pad|>)
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


@pytest.fixture(scope="module")
def qwenvl():
    cfg = compose("qwenvl")
    mc, _ = meta_model_config(cfg)
    with torch.device("meta"):
        model = vlm.build(mc)
    return model, cfg


def test_qwenvl_recipe_dimensions(qwenvl):
    model, cfg = qwenvl
    assert cfg.encoder.name == "open_clip" and cfg.encoder.model_name == "ViT-bigG-14"
    assert model.encoder.image_size == 448 and model.encoder.grid() == (32, 32) and model.encoder.hidden_size == 1664
    assert model.encoder.num_tokens() == 1024  # CLS dropped
    assert model.num_image_tokens() == model.num_image_tokens((448, 448)) == 256
    c = model.connector
    assert c.query.shape == (256, 4096) and c.attn.num_heads == 32 and c.kv_proj.weight.shape == (4096, 1664)
    assert count(model.encoder) == BIGG_448 == 1_844_051_968  # Qwen-VL reports its ViT as 1.9B
    assert count(model.connector) == QWENVL_RESAMPLER == 91_791_360  # the "VL adapter" (reported as 0.08B)
    assert count(model.llm) == QWEN_7B_PARAMS  # Qwen-7B, reported as 7.7B
    assert count(model) == pytest.approx(9.657e9, rel=1e-3)  # Qwen-VL: 9.6B
    assert tuple(model.encoder.image_mean) == pytest.approx((0.48145466, 0.4578275, 0.40821073))


def test_qwenvl_stages_and_hyperparameters(qwenvl):
    model, cfg = qwenvl
    assert list(cfg.stages) == ["pretrain", "multitask", "sft"]
    want = {"pretrain": (2e-4, 0.005, 500, 50000, 30720, 512), "multitask": (5e-5, 0.2, 400, 19000, 4096, 2048),
            "sft": (1e-5, 0.1, 3000, 8000, 128, 2048)}
    for name, (lr, min_ratio, warmup, steps, batch, length) in want.items():
        st = cfg.stage[name]
        assert (st.lr, st.warmup_steps, st.max_steps, st.global_batch_size, st.max_length) == \
            (pytest.approx(lr), warmup, steps, batch, length)
        assert st.lr * st.min_lr_ratio == pytest.approx({"pretrain": 1e-6, "multitask": 1e-5, "sft": 1e-6}[name])
        assert list(st.betas) == [0.9, 0.98] and st.eps == pytest.approx(1e-6)
        assert st.weight_decay == pytest.approx(0.05) and st.max_grad_norm == 1.0 and st.scheduler == "cosine"
    trainable = {}
    with torch.device("meta"):
        for name in cfg.stages:
            apply_policies(model, cfg.stage[name])
            trainable[name] = {part for part in ("encoder", "connector", "llm")
                               if any(p.requires_grad for p in getattr(model, part).parameters())}
    assert trainable == {"pretrain": {"encoder", "connector"}, "multitask": {"encoder", "connector", "llm"},
                         "sft": {"connector", "llm"}}


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


def test_qwen25vl_3b_has_transformers_parameter_count():
    """Tower + rms_norm merger + Qwen2.5-VL text model at the 3B's dimensions have exactly the parameters of
    transformers' Qwen2_5_VLForConditionalGeneration built from the same config (tied embeddings counted once)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = compose("qwen25vl_3b")
    mc, tok = meta_model_config(cfg)
    assert tok is None and mc["connector"] == {"name": "patch_merger", "merge_size": 2, "norm": "rms_norm"}
    with torch.device("meta"):
        model = vlm.build(mc)
        hf = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**{k: v for k, v in QWEN25_VL_3B.items()
                                                                     if k != "model_type"}))
    visual = hf.model.visual
    assert count(model.encoder) == count(visual) - count(visual.merger)
    assert count(model.connector) == count(visual.merger) == 5120 * 5120 + 5120 + 5120 * 2048 + 2048 + 1280
    assert count(model.llm) == count(hf.model.language_model)  # tied: the head is the embedding
    assert count(model) == count(hf) == PUBLISHED_PARAMS["qwen25vl_3b"]  # published: 3.75B
    assert model.llm.position_scheme == "mrope"
    assert model.num_image_tokens((448, 644)) == (448 // 28) * (644 // 28)
    st = cfg.stage.sft
    assert list(cfg.stages) == ["sft"] and st.tiling.kind == "native" and st.template.name == "tokenizer"
    assert (st.tiling.min_pixels, st.tiling.max_pixels) == (256 * 28 * 28, 1280 * 28 * 28)
    with torch.device("meta"):
        apply_policies(model, st)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"llm"} and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    per_layer = 64 * ((2048 + 2048) * 2 + (2048 + 256) * 2 + (2048 + 11008) * 3)  # q, o; k, v; gate, up, down
    assert lora == 36 * per_layer
