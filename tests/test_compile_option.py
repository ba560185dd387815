"""``trainer.compile=true`` wires ``torch.compile`` onto every decoder and vision-tower block in place (names and
state dict unchanged). Running the compiled blocks is not tested here: inductor's first compilation takes minutes
on the shared 2-core CPU (docs/performance.md)."""
from __future__ import annotations

import torch

import vlm
from vlm.train import compose
from vlm.train.policy import layer_stack
from vlm.train.stage import compile_layers

from conftest import tiny_cfg


def test_compile_layers_compiles_each_block_in_place():
    torch.manual_seed(0)
    model = vlm.build(tiny_cfg())
    keys = list(model.state_dict())
    compile_layers(model)
    blocks = [*model.llm.decoder_layers(), *model.encoder.blocks()]  # the stacks each component states
    assert blocks and all(b._compiled_call_impl is not None for b in blocks)
    assert layer_stack(model.llm)[1] is model.llm.decoder_layers()
    assert list(model.state_dict()) == keys


def test_trainer_compile_is_a_config_key():
    assert compose("micro", ["trainer.compile=true"]).trainer.compile is True
