"""Every shipped recipe trains: each stage runs a few optimizer steps on a CPU with the recipe's own policies,
gradient checkpointing, objectives, connectors, templates, tiling and strategy; only the sizes are shrunk.

What is shrunk (and nothing else): model widths and depths, connector queries, image sizes, tiles, data (a few
generated samples in the recipe's own data format), batch sizes and steps. Weights a recipe loads from ``pretrained:``
are tiny random models of the same architecture family saved under ``tmp_path`` (and loaded through the same path a
real run takes); a tokenizer directory is the byte-level tokenizer saved there. A recipe that cannot train (e.g. LoRA
+ gradient checkpointing crashing at the first step) fails here."""
from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image
from test_train_recipes import ARCHITECTURES, part_architecture
from transformers import PreTrainedModel

import vlm
from vlm.train import compose, list_options, run
from vlm.train.config_check import used_data_keys

TOWER = {"hidden_size": 16, "num_layers": 2, "num_heads": 2, "intermediate_size": 32}
LLM_DIMS = {"hidden_size": 32, "intermediate_size": 64, "ffn_dim": 64, "word_embed_proj_dim": 32,
            "num_hidden_layers": 2, "num_attention_heads": 2}
STEPS = 2
IMAGE = 28  # stand-in towers: 28 px, patch 14 -> a 2 x 2 grid


def tiny_llm_config(config: dict, vocab_size: int) -> dict:
    """``config`` (a transformers config dict) at tiny width and depth, same ``model_type``."""
    out = dict(config, vocab_size=vocab_size, max_position_embeddings=512)
    out.update({k: v for k, v in LLM_DIMS.items() if k in config})
    if "num_key_value_heads" in config:  # grouped-query attention stays grouped, multi-head stays multi-head
        out["num_key_value_heads"] = 1 if config["num_key_value_heads"] < config["num_attention_heads"] else 2
    if "mrope_section" in (config.get("rope_parameters") or {}):  # mRoPE: the sections split the tiny head's
        half = out["hidden_size"] // out["num_attention_heads"] // 2  # rotary frequencies
        out["rope_parameters"] = {**config["rope_parameters"], "mrope_section": [half // 2, half // 4, half // 4]}
    return out


def save_tokenizer(path: Path, cfg) -> int:
    """The byte-level tokenizer (with the recipe's pad token) saved as a tokenizer directory; its length."""
    from vlm.data.tokenizer import byte_tokenizer

    pad = cfg.tokenizer.get("pad_token")
    tok = byte_tokenizer(extra_tokens=[pad] if pad else [])
    path.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(path))
    return len(tok)


def stand_in_encoder(spec: dict, image: int = IMAGE) -> dict:
    """The encoder config with its ``pretrained`` weights replaced by a tiny random tower of the same family (at
    ``image`` px, patch 14), saved where a run reads it (a transformers directory) or described inline (open_clip: a
    model config)."""
    if spec.get("name") == "open_clip":
        spec.update(model_name=None, pretrained=None, pretrained_tag=None, image_size=IMAGE,
                    model_config={"embed_dim": 16, "vision_cfg": {"image_size": IMAGE, "patch_size": 14,
                                                                  "width": 16, "layers": 2, "head_width": 8}})
        return spec
    path = Path(spec.pop("pretrained"))
    dims = {**TOWER, "image_size": image, "patch_size": 14}
    tower = vlm.encoders.build({"name": spec["name"], **dims})
    if isinstance(tower.model, PreTrainedModel):
        tower.model.save_pretrained(str(path))
    else:  # a tower of our own (internvit): its transformers layout
        from transformers import InternVLVisionConfig, InternVLVisionModel

        InternVLVisionModel(InternVLVisionConfig(**tower.hf_config())).save_pretrained(str(path))
    spec["pretrained"] = str(path)
    return spec


def save_full_model(path: Path, arch: dict, vocab_size: int) -> None:
    """A tiny random vision-language model of ``arch``'s family (e.g. Qwen2.5-VL: tower, merger and text model in
    one directory) saved at ``path``, where a recipe's encoder, connector and LLM all read it."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    text = tiny_llm_config(part_architecture(arch, "llm"), vocab_size)
    text.pop("model_type")
    vision = {**arch["vision_config"], "depth": 2, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
              "out_hidden_size": text["hidden_size"], "fullatt_block_indexes": [1]}
    top = {k: v for k, v in arch.items() if k not in ("model_type", "vision_config", "text_config")
           and not k.endswith("token_id")}
    config = AutoConfig.for_model(arch["model_type"], vision_config=vision, text_config=text, **top)
    AutoModelForImageTextToText.from_config(config).save_pretrained(str(path))


def shrink_encoder(spec: dict) -> dict:
    for key, value in TOWER.items():
        if key in spec:
            spec[key] = value
    return spec


def write_records(spec: dict, n: int = 4) -> None:
    """A few samples with one image each at ``spec.path`` in the recipe's own record format."""
    images = Path(spec["image_root"])
    images.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (40 + 8 * i, 36), (60 * i, 100, 200 - 40 * i)).save(images / f"{i}.png")
    fmt = spec.get("format") or spec["name"]
    if fmt == "qwen_vl":
        records = [{"id": str(i), "conversations": [
            {"from": "user", "value": f"Picture 1: <img>{i}.png</img>\nWhat colour is it?"},
            {"from": "assistant", "value": f"colour {i}"}]} for i in range(n)]
    else:  # LLaVA json
        records = [{"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": f"colour {i}"}]}
            for i in range(n)]
    Path(spec["path"]).parent.mkdir(parents=True, exist_ok=True)
    Path(spec["path"]).write_text(json.dumps(records))


def shrink(cfg, root: Path):
    """``cfg`` (a composed recipe) at tiny size, its files written under ``root``."""
    c = OmegaConf.to_container(cfg, resolve=True)
    # a recipe that starts from a published checkpoint (init_from) trains from its own random weights at tiny size:
    # importing such a checkpoint is tested with the family (e.g. tests/test_qwen_vl_lora_recipe.py)
    c["init_from"] = None
    tok_path = c["tokenizer"].get("path")  # a tokenizer directory: the byte tokenizer there, the LLM sized to it
    vocab = save_tokenizer(Path(tok_path), cfg) + 8 if tok_path else None
    full = {}  # a directory holding a whole vision-language model: every part reads it
    # a pixel shuffle of 1/k needs a patch grid of multiples of k (SmolVLM's k = 4: a 4 x 4 grid, 56 px)
    image = 14 * max(2, round(1 / c["connector"].get("scale", 0.5)))
    if c["encoder"].get("pretrained"):
        arch = ARCHITECTURES.get(Path(c["encoder"]["pretrained"]).name, {})
        if "vision_config" in arch:
            save_full_model(Path(c["encoder"]["pretrained"]), arch, vocab)
            full = {c["encoder"]["pretrained"]}
        else:
            c["encoder"] = stand_in_encoder(c["encoder"], image)
    else:
        c["encoder"] = shrink_encoder(c["encoder"])
    arrangement = c.get("arrangement") or {}
    if arrangement.get("pinpoints"):  # the same tile grids (1x2, 2x2, ...) of the stand-in tower's tiles
        base = min(v for point in arrangement["pinpoints"] for v in point)
        arrangement["pinpoints"] = [[image * round(h / base), image * round(w / base)]
                                    for h, w in arrangement["pinpoints"]]
    conn = c["connector"]
    for key, value in {"num_queries": 4, "hidden_size": 16, "num_layers": 2, "num_heads": 2,
                       "intermediate_size": 32}.items():
        if key in conn:
            conn[key] = value
    if "corpus_samples" in c["tokenizer"]:  # a tokenizer trained on the recipe's data: on fewer samples
        c["tokenizer"]["corpus_samples"] = 64
    llm = c["llm"]
    if llm.get("pretrained") in full:
        pass
    elif llm.get("pretrained"):
        from transformers import AutoConfig, AutoModelForCausalLM

        arch = ARCHITECTURES[Path(llm["pretrained"]).name]
        hf = tiny_llm_config(arch, vocab)
        model_type = hf.pop("model_type")
        AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **hf)).save_pretrained(llm["pretrained"])
    else:
        llm["config"] = tiny_llm_config(llm["config"], vocab or llm["config"]["vocab_size"])
    for key in used_data_keys(cfg):
        spec = c["data"][key]
        if spec.get("path"):
            write_records(spec)
        if "size" in spec:
            spec["size"] = 8
    for name in c["stages"]:
        st = c["stage"][name]
        st.update(max_steps=STEPS, global_batch_size=2, micro_batch_size=1, save_every=None, eval_every=None)
        if st.get("warmup_steps"):
            st["warmup_steps"] = 1
        if st.get("tiling") and st["tiling"].get("kind") == "native":  # a few patches per image
            t = st["tiling"]
            factor = t.get("patch_size", 14) * t.get("merge_size", 2)
            t.update(min_pixels=4 * factor ** 2, max_pixels=16 * factor ** 2)
        if st.get("tiling") and st["tiling"].get("kind") == "dynamic":
            t = st["tiling"]
            t["max_tiles"] = max(2, t.get("min_tiles", 1))
            st["max_tiles_per_sample"] = t["max_tiles"] + int(bool(t.get("thumbnail")))
        if st.get("tiling") and st["tiling"].get("kind") == "idefics3":  # up to 2 x 2 crops of the stand-in tower
            st["tiling"]["longest_edge"] = 2 * image
        if st.get("objective") and "dim" in st["objective"]:
            st["objective"]["dim"] = 16
    c["trainer"].update(num_workers=0, progress=False, threads=None, log_every=1,
                        feature_cache_dir=str(root / "features"))
    c["eval"]["enabled"] = False
    c["output_dir"] = str(root / "run")
    return OmegaConf.create(c)


def plain(value):
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list_options("recipe"))
def test_every_recipe_trains_each_stage_at_tiny_size(recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("VLM_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("VLM_MODELS", str(tmp_path / "models"))
    # the run's plot is tested in test_train_e2e (vlm.train.run the module, not the function vlm.train exports)
    monkeypatch.setattr(importlib.import_module("vlm.train.run"), "plot_run", lambda run_dir: None)
    full = compose(recipe)
    cfg = shrink(full, tmp_path)
    for name in full.stages:  # only sizes changed
        for key in ("policy", "template", "packing", "loss_weighting", "partial_from", "lora", "module_lr"):
            assert plain(cfg.stage[name].get(key)) == plain(full.stage[name].get(key)), (name, key)
        assert plain(cfg.stage[name].objective).get("name") == plain(full.stage[name].objective).get("name")
    kept = ("trainer.gradient_checkpointing", "trainer.strategy", "trainer.precision", "connector.name",
            "encoder.name", "encoder.feature_layer", "encoder.select", "stages")
    for key in kept:
        assert plain(OmegaConf.select(cfg, key)) == plain(OmegaConf.select(full, key)), key
    result = run(cfg)
    assert list(result.losses) == list(full.stages)
    for name, losses in result.losses.items():
        assert len(losses) == STEPS and all(math.isfinite(x) for x in losses), (name, losses)
