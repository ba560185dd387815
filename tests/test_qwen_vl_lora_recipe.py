"""recipe=qwenvl_chat_lora: composes; on a tiny original Qwen-VL directory (init_from, tokenizer from its
qwen.tiktoken) it trains LoRA on q/k/v/o/up/gate only with the tower and resampler frozen, and the merged final/
exports back to the original layout, whose import gives the same logits."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from short_runs import short_run

import vlm
from tests.qwen_vl_fixtures import (
    TEXT,
    VISUAL,
    qwen2_reference,
    qwen_text_state,
    random_visual_state,
    train_ranks,
    write_qwen_vl_dir,
)
from vlm.interop import from_hf, to_hf
from vlm.train import compose, run

TINY = [f"encoder.model_config.vision_cfg.{k}={v}" for k, v in
        {"image_size": VISUAL["image_size"], "width": VISUAL["width"], "layers": VISUAL["layers"],
         "head_width": VISUAL["width"] // VISUAL["heads"], "mlp_ratio": VISUAL["mlp_ratio"]}.items()] + \
       [f"llm.config.{k}={v}" for k, v in
        {"vocab_size": TEXT["vocab_size"], "hidden_size": TEXT["hidden_size"],
         "intermediate_size": TEXT["intermediate_size"] // 2, "num_hidden_layers": TEXT["num_hidden_layers"],
         "num_attention_heads": TEXT["num_attention_heads"], "num_key_value_heads": TEXT["num_attention_heads"],
         "max_position_embeddings": TEXT["max_position_embeddings"]}.items()] + \
       ["encoder.model_config.embed_dim=128", "stage.sft.lora.r=4", "stage.sft.lora.alpha=8",
        "stage.sft.lr=1e-2", "stage.sft.warmup_ratio=0.0", "trainer.precision=fp32",
        "trainer.gradient_checkpointing=false", "stage.sft.max_length=1024", "trainer.threads=1"]


def test_recipe_composes_with_the_seed_targets():
    cfg = compose("qwenvl_chat_lora")
    sft = cfg.stage.sft
    assert list(sft.lora.target_modules) == ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj"]
    assert (sft.policy.encoder, sft.policy.connector, sft.policy.llm) == ("frozen", "frozen", "lora")
    assert sft.template == "qwen_vl" and cfg.encoder.class_token is False and cfg.encoder.pos_grid == 16
    assert cfg.tokenizer.path == cfg.init_from


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    return write_qwen_vl_dir(tmp_path_factory.mktemp("qwen_vl_lora"), train_ranks(),
                             qwen_text_state(qwen2_reference()), random_visual_state())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen_vl_data")
    records = []
    for i, color in enumerate([(220, 20, 20), (20, 20, 220), (20, 200, 20), (200, 200, 20)]):
        Image.new("RGB", (64, 48), color).save(d / f"{i}.png")
        records.append({"id": str(i), "conversations": [
            {"from": "user", "value": f"Picture 1: <img>{i}.png</img>\nWhat color is it?"},
            {"from": "assistant", "value": f"<ref>the square</ref><box>({i * 100},10),(900,990)</box>"}]})
    (d / "train.json").write_text(json.dumps(records))
    return d


def test_lora_trains_from_the_original_and_exports_back(original, data, tmp_path):
    overrides = [f"init_from={original}", f"data.sft.path={data / 'train.json'}", f"data.sft.image_root={data}",
                 *TINY, *short_run(["sft"], steps=1), "stage.sft.global_batch_size=2", f"output_dir={tmp_path / 'run'}"]
    res = run(compose("qwenvl_chat_lora", overrides))
    assert torch.isfinite(torch.tensor(res.stages[-1].final_loss))
    tuned = vlm.load(res.final_dir)
    out = to_hf(tuned, tmp_path / "export", format="qwen_vl")
    before, after = load_file(str(original / "model.safetensors")), load_file(str(out / "model.safetensors"))
    pos = "transformer.visual.attn_pool.pos_embed"  # recomputed by the resampler (not in a vlm directory)
    assert (before.pop(pos) - after.pop(pos)).abs().max() <= 1e-6
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # the merged adapters moved exactly the seed's targets: c_attn, attn.c_proj, w1, w2 of every layer
    targets = {f"transformer.h.{i}.{n}" for i in range(TEXT["num_hidden_layers"])
               for n in ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.w1.weight", "mlp.w2.weight")}
    assert changed == targets
    back = from_hf(out)
    ids = torch.tensor([back.tokenizer("Picture 1: <img>" + "<imgpad>" * 256 + "</img>\nHi")["input_ids"]])
    pixels = torch.randn(1, 3, VISUAL["image_size"], VISUAL["image_size"])
    with torch.no_grad():
        assert (back(input_ids=ids, pixel_values=pixels).logits
                - tuned(input_ids=ids, pixel_values=pixels).logits).abs().max() <= 1e-4
