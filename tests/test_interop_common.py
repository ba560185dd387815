"""The steps every transformers format shares (``vlm.interop.common``), checked on their own: each family's model is
compared with transformers end to end in tests/test_interop*.py; these check the contract a new family builds on."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import Blip2ForConditionalGeneration, LlavaForConditionalGeneration

import vlm
from tests.conftest import tiny_cfg
from vlm import connectors
from vlm.interop import FORMATS
from vlm.interop.common import assemble, copy_projector, refuse_export, tying_problems

#: the formats that read a transformers config.json (``internvl_chat`` reads the original remote-code layout)
TRANSFORMERS_FORMATS = ["llava", "blip2", "internvl", "qwen2_vl", "qwen2_5_vl"]


@pytest.mark.parametrize("name", TRANSFORMERS_FORMATS)
def test_each_format_reads_only_its_model_type(tmp_path, name):
    fmt = FORMATS.get(name)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "other"}))
    with pytest.raises(ValueError, match=rf"config.json' has model_type='other'; expected '{fmt.model_type}' "
                                         rf"\({fmt.hf_class}\)"):
        fmt.from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "vlm", "encoder": {}}))
    with pytest.raises(ValueError, match=r"model_type=None; .*it is a vlm directory: use vlm.load"):
        fmt.from_hf(tmp_path)


@pytest.mark.parametrize("name", TRANSFORMERS_FORMATS)
def test_each_format_names_a_config_its_class_rejects(tmp_path, name):
    fmt = FORMATS.get(name)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": fmt.model_type, "text_config": 3}))
    with pytest.raises(ValueError, match=r"config.json' is not a valid \w+Config"):
        fmt.from_hf(tmp_path)


class Projector(nn.Module):
    """LLaVA's projector layout: ``linear_1 -> act -> linear_2``."""

    def __init__(self, d_in: int, d_out: int, d_hidden: int | None = None) -> None:
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(d_in, d_hidden or d_out), nn.Linear(d_hidden or d_out, d_out)


def test_copy_projector_both_ways_and_mismatch():
    torch.manual_seed(0)
    layers = {"layers.0": "linear_1", "layers.2": "linear_2"}
    conn = connectors.build({"name": "mlp", "depth": 2}, in_dim=8, out_dim=16)
    theirs = Projector(8, 16)
    copy_projector(conn, theirs, layers, to_hf=True)
    assert torch.equal(theirs.linear_1.weight, conn.layers[0].weight)
    assert torch.equal(theirs.linear_2.bias, conn.layers[2].bias)
    fresh = connectors.build({"name": "mlp", "depth": 2}, in_dim=8, out_dim=16)
    copy_projector(fresh, theirs, layers, to_hf=False)
    ours, back = conn.state_dict(), fresh.state_dict()
    assert ours.keys() == back.keys() and all(torch.equal(ours[k], back[k]) for k in ours)
    with pytest.raises(ValueError, match="from_hf: projector"):
        copy_projector(fresh, Projector(8, 16, d_hidden=12), layers, to_hf=False)
    with pytest.raises(ValueError, match="to_hf: projector"):
        copy_projector(conn, Projector(8, 16, d_hidden=12), layers, to_hf=True)


def test_tying_problems_ask_the_class():
    lm = vlm.build(tiny_cfg("clip", "gpt2")).llm  # gpt2 ties its output layer to wte, not embed_tokens
    assert tying_problems(lm, LlavaForConditionalGeneration, "LLaVA")  # LLaVA ties lm_head to embed_tokens
    assert Blip2ForConditionalGeneration._tied_weights_keys is None
    assert tying_problems(lm, Blip2ForConditionalGeneration, "BLIP-2") == []  # BLIP-2 leaves it to the text model


def test_refuse_export_lists_every_problem():
    refuse_export([], "LLaVA")
    with pytest.raises(ValueError, match="cannot be exported as transformers LLaVA: a; b$"):
        refuse_export(["a", "b"], "LLaVA")


def test_assemble_hooks(tmp_path):
    parts = vlm.build(tiny_cfg())
    seen = {}

    def prepare(model):
        seen["prepare"] = (model.tokenizer, dict(model.generation), model.image_token)

    def preprocessing(config, image_size, where):
        seen["preprocessing"] = (config, image_size, where)
        return {"resize_mode": "crop"}

    config = SimpleNamespace(text_config={"eos_token_id": 3, "bos_token_id": 1})
    model = assemble(tmp_path, config, parts.encoder, parts.connector, parts.llm, image_token_id=5, tokenizer=True,
                     image_processor={"k": 1}, image_processor_file=tmp_path / "x.json", image_token="<IMG>",
                     prepare=prepare, preprocessing=preprocessing)
    assert seen["prepare"] == (None, {}, "<IMG>")  # no tokenizer in the directory; generation not read yet
    assert seen["preprocessing"] == ({"k": 1}, parts.encoder.image_size, str(tmp_path / "x.json"))
    assert model.generation["eos_token_id"] == [3] and model.generation["bos_token_id"] == 1
    assert model.image_preprocessing == {"resize_mode": "crop"} and model.image_token == "<IMG>"
    assert not model.training
