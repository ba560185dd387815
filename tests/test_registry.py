import pytest

import vlm
from vlm import connectors, encoders, llm
from vlm.registry import Registry
from tests.conftest import tiny_cfg


def test_unknown_name_lists_known_names():
    with pytest.raises(KeyError) as e:
        encoders.build({"name": "clipp"})
    assert "clipp" in str(e.value) and "clip" in str(e.value) and "siglip" in str(e.value)
    with pytest.raises(KeyError, match="known connectors: identity, linear, mlp"):
        connectors.build({"name": "qformerx"}, in_dim=4, out_dim=4)
    with pytest.raises(KeyError, match="hf_causal_lm"):
        llm.build({"name": "llama"})


def test_lookup_is_exact_not_substring():
    reg = Registry("thing")
    reg.register("mlp")(lambda: 1)
    reg.register("mlp2")(lambda: 2)
    assert reg.build({"name": "mlp"}) == 1 and reg.build({"name": "mlp2"}) == 2
    with pytest.raises(KeyError):
        reg.get("ml")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("mlp")(lambda: 3)


def test_unknown_argument_is_named():
    with pytest.raises(TypeError, match=r"unknown argument\(s\) 'depht' \(did you mean 'depth'\?\)"):
        connectors.build({"name": "mlp", "depht": 2}, in_dim=4, out_dim=4)
    with pytest.raises(TypeError, match="feature_layr"):
        encoders.build({"name": "clip", "feature_layr": -2})
    with pytest.raises(TypeError, match=r"llm 'hf_causal_lm': unknown argument\(s\) 'confg' \(did you mean 'config'\?\); "
                                        r"accepted: .*'config'"):
        llm.build({"name": "hf_causal_lm", "confg": {"model_type": "llama"}})
    with pytest.raises(KeyError, match="'name'"):
        encoders.build({"image_size": 32})


def test_build_unknown_top_level_key():
    cfg = tiny_cfg()
    cfg["projector"] = {"name": "mlp"}
    with pytest.raises(TypeError, match="projector"):
        vlm.build(cfg)


def test_omegaconf_config_accepted():
    from omegaconf import OmegaConf

    model = vlm.build(OmegaConf.create(tiny_cfg()))
    assert model.num_image_tokens() == 16


def test_read_config_points_a_run_directory_to_its_final_model(tmp_path):
    """``python -m vlm.convert RUN`` (the run, not its ``final/``): the error names where the model is."""
    from vlm.pretrained import read_config

    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"does not exist; expected a vlm directory \(a training run\? its "
                                                r"model is '.*final'\)"):
        read_config(tmp_path, "convert", "a vlm directory")
    assert read_config(tmp_path / "final", "convert", "a vlm directory") == {}
