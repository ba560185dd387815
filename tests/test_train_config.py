"""Recipes compose, every key is overridable, and bad configs fail before anything is built."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from vlm.train import ConfigError, check, compose, list_options, recipes_dir


def test_recipes_dir_found_and_env_override(tmp_path, monkeypatch):
    d = recipes_dir()
    assert (d / "config.yaml").is_file() and (d / "recipe" / "tiny.yaml").is_file()
    monkeypatch.setenv("VLM_RECIPES", str(tmp_path))
    assert recipes_dir() == d  # a folder without config.yaml adds to the shipped recipes (tests/test_train_own_data.py)
    (tmp_path / "config.yaml").write_text((d / "config.yaml").read_text())
    assert recipes_dir() == tmp_path.resolve()  # a whole recipes folder replaces them
    monkeypatch.setenv("VLM_RECIPES", str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="not a folder"):
        recipes_dir()


def test_default_recipe_is_tiny_with_three_stages():
    cfg = compose()
    assert cfg.name == "tiny"
    assert list(cfg.stages) == ["align", "pretrain", "sft"]
    assert cfg.stage.align.objective.name == "siglip" and cfg.stage.align.policy.encoder == "full"
    assert cfg.stage.pretrain.template == "plain" and cfg.stage.pretrain.policy.encoder == "frozen"
    assert cfg.tokenizer.name == "byte_bpe" and cfg.trainer.threads == 1


def test_shipped_recipes_compose():
    for name in ("tiny", "micro", "llava15", "scratch_siglip_qwen"):
        assert name in list_options("recipe")
        cfg = compose(name)
        assert cfg.name == name
        for st in cfg.stages:
            assert cfg.stage[st].data in cfg.data


def test_overrides_reach_every_level():
    cfg = compose("tiny", ["connector=linear", "stage.sft.lr=1e-4", "trainer.strategy=ddp", "seed=3",
                           "stage.sft.policy.llm=lora", "encoder.feature_layer=2", "stages=[sft]"])
    assert cfg.connector.name == "linear" and "depth" not in cfg.connector
    assert cfg.stage.sft.lr == pytest.approx(1e-4)
    assert cfg.trainer.strategy == "ddp" and cfg.seed == 3
    assert cfg.stage.sft.policy.llm == "lora" and cfg.encoder.feature_layer == 2
    assert list(cfg.stages) == ["sft"]


def test_command_line_group_choice_beats_the_recipe():
    assert compose("llava15", ["connector=linear"]).connector.name == "linear"
    assert compose("llava15").connector.name == "mlp"


@pytest.mark.parametrize("override", ["foo=1", "stage.sft.foo=1", "trainer.nope=true", "eval.bogus=2"])
def test_unknown_key_is_an_error(override):
    with pytest.raises(ConfigError, match="foo|nope|bogus"):
        compose("tiny", [override])


def test_an_unknown_key_with_no_near_spelling_lists_the_keys_there_are():
    """``learning_rate`` is nowhere near ``lr`` by spelling: the error lists the stage's keys instead."""
    with pytest.raises(ConfigError, match=r"stage.sft.learning_rate=1e-3: unknown key; expected a key of stage.sft "
                                          r"\(no close match; its keys: .*\blr\b"):
        compose("tiny", ["stage.sft.learning_rate=1e-3"])


def test_unknown_option_lists_the_known_ones():
    with pytest.raises(ConfigError, match="connector") as e:
        compose("tiny", ["connector=qformer_xl"])
    assert "mlp" in str(e.value)


def test_unknown_key_inside_a_recipe_file_is_caught_by_the_schema():
    raw = OmegaConf.to_container(compose("micro"), resolve=True)
    raw["stage"]["sft"]["learning_rate"] = 1.0
    with pytest.raises(ConfigError, match="learning_rate"):
        check(raw)
    raw = OmegaConf.to_container(compose("micro"), resolve=True)
    raw["stage"]["sft"]["lr"] = "fast"
    with pytest.raises(ConfigError, match="lr"):
        check(raw)


def test_struct_mode_after_compose():
    cfg = compose("micro")
    with pytest.raises(Exception):
        cfg.stage.sft.not_a_key = 1


def test_stage_list_must_name_configured_stages():
    with pytest.raises(ConfigError, match="dpo"):
        compose("micro", ["stages=[pretrain,dpo]"])


def test_pretrained_paths_default_under_vlm_models(monkeypatch):
    monkeypatch.setenv("VLM_MODELS", "/weights")
    cfg = compose("llava15")
    assert cfg.encoder.pretrained == "/weights/clip-vit-large-patch14-336"
    assert cfg.llm.pretrained == "/weights/vicuna-7b-v1.5"
    assert cfg.tokenizer.path == "/weights/vicuna-7b-v1.5"
    monkeypatch.delenv("VLM_MODELS")
    assert Path(compose("llava15").llm.pretrained) == Path("models/vicuna-7b-v1.5")


def test_switching_a_component_drops_the_recipes_options_for_it():
    """The tiny recipe's connector options (pos_embed) belong to its connector choice, not to the recipe."""
    assert dict(compose("tiny").connector) == {"name": "linear", "pos_embed": 9}
    for option, expected in (("mlp", {"name": "mlp", "depth": 2, "act": "gelu"}), ("linear", {"name": "linear"})):
        assert dict(compose("tiny", [f"connector={option}"]).connector) == expected


def test_stage_list_that_drops_a_recipe_configured_stage_is_refused():
    """`micro` sets lr/steps for its pretrain stage; stage=[readout,sft] alone would still run that pretrain (after
    sft): the config says so instead of running it."""
    with pytest.raises(ConfigError, match=r"stage 'pretrain' has only the recipe's settings for it"):
        compose("micro", ["stage=[readout,sft]"])
    assert list(compose("micro", ["stage=[readout,sft]", "stages=[readout,sft]"]).stages) == ["readout", "sft"]
