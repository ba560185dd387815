"""Checks once: every name a config refers to is checked in one pass when it is composed (``config.check``), before
anything is built or read; only what needs the machine (files, the device) is left to ``check_runnable``."""
from __future__ import annotations

import pytest
import torch

from vlm.train import ConfigError, compose
from vlm.train.config_check import check_runnable

# (overrides on recipe micro, fragments of the one-line error: key=value, what was expected, the closest match)
NAME_MISTAKES = {
    "template": (["stage.sft.template=chatmll"], ["stage.sft.template='chatmll'", "unknown template", "'chatml'"]),
    "template in a mapping": (["stage.sft.template={name:vicuna_v2}"], ["stage.sft.template.name='vicuna_v2'",
                                                                         "did you mean 'vicuna_v1'"]),
    "template option": (["stage.sft.template={name:chatml,image_strat:x}"],
                        ["stage.sft.template.image_strat='x'", "template 'chatml' takes no argument",
                         "did you mean 'image_start'"]),
    "policy": (["stage.pretrain.policy.encoder=ful"], ["stage.pretrain.policy.encoder='ful'", "unknown policy",
                                                       "'full'"]),
    "policy for a part it cannot train": (["stage.sft.policy.connector=lora"],
                                          ["stage.sft.policy.connector='lora'", "with 'full'"]),
    "optimizer": (["stage.sft.optimizer=adam"], ["stage.sft.optimizer='adam'", "unknown optimizer", "'adamw'"]),
    "scheduler": (["stage.sft.scheduler=cosin"], ["stage.sft.scheduler='cosin'", "unknown scheduler", "'cosine'"]),
    "loss weighting": (["stage.sft.loss_weighting=tokens"], ["stage.sft.loss_weighting='tokens'", "'token'"]),
    "objective": (["+stage.sft.objective={name:siglipp}"], ["stage.sft.objective.name='siglipp'", "unknown objective",
                                                        "'siglip'"]),
    "tokenizer": (["tokenizer.name=bytes"], ["tokenizer.name='bytes'", "unknown tokenizer", "'byte'"]),
    "tokenizer corpus": (["tokenizer.name=byte_bpe", "+tokenizer.corpus=[pretrain,sfx]"],
                         ["tokenizer: corpus=['pretrain', 'sfx']", "data.sfx", "did you mean 'sft'"]),
    "dataset": (["data.pretrain.name=shape"], ["data.pretrain.name='shape'", "unknown dataset", "'shapes'"]),
    "reader format": (["~data.sft", "+data.sft={name:records,path:nope.json,format:llava2}"],
                      ["data.sft.format='llava2'", "unknown reader", "did you mean 'llava'"]),
    "reader option": (["~data.sft", "+data.sft={name:records,path:nope.json,format:llava,chek_files:false}"],
                      ["data.sft: chek_files=False", "'llava' reader", "did you mean 'check_files'"]),
    "reader option (auto format)": (["~data.sft", "+data.sft={name:llava_json,path:nope.json,allow_url:true}"],
                                    ["data.sft: allow_url=True", "did you mean 'allow_urls'"]),
    "encoder": (["encoder.name=sigclip"], ["encoder.name='sigclip'", "unknown encoder"]),
    "connector": (["connector.name=mpl"], ["connector.name='mpl'", "'mlp'"]),
    "llm": (["llm.name=hf_causal"], ["llm.name='hf_causal'", "'hf_causal_lm'"]),
    "strategy": (["trainer.strategy=fdsp"], ["trainer.strategy='fdsp'", "'fsdp'"]),
    "precision": (["trainer.precision=bf15"], ["trainer.precision='bf15'", "unknown precision", "'bf16'"]),
    "logger": (["logger.name=wandbb"], ["logger.name='wandbb'", "'wandb'"]),
    "schema key the recipe does not set": (["stage.sft.objective.name=siglip"],
                                           ["stage.sft.objective.name=siglip", "not set by the recipe",
                                            "expected +stage.sft.objective.name=siglip"]),
    "packing without a row length": (["stage.sft.packing=true", "stage.sft.max_length=null"],
                                     ["stage.sft.packing=true", "stage.sft.max_length"]),
}


@pytest.mark.parametrize("overrides,fragments", NAME_MISTAKES.values(), ids=NAME_MISTAKES.keys())
def test_every_name_is_checked_when_composed(overrides, fragments):
    with pytest.raises(ConfigError) as info:
        compose("micro", overrides)
    message = str(info.value)
    assert len(message.splitlines()) == 1, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_the_same_mistakes_pass_composition_unchecked():
    """The table above is about the check, not about Hydra: unchecked, each config composes."""
    for what, (overrides, _) in NAME_MISTAKES.items():
        if what != "schema key the recipe does not set":  # (Hydra's own error)
            compose("micro", overrides, validate=False)


def test_device_needs_are_left_to_the_run():
    """A config is machine-independent: qlora composes anywhere, and fails before training on a CPU."""
    cfg = compose("micro", ["stage.sft.policy.llm=qlora"])
    check_runnable(cfg)  # no device yet (python -m vlm.train's check of every job)
    with pytest.raises(ConfigError, match=r"stage.sft.policy.llm='qlora': .*needs a CUDA device"):
        check_runnable(cfg, torch.device("cpu"))


def test_init_from_without_weights_is_a_config_error(tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = compose("micro", [f"init_from={tmp_path / 'empty'}"])
    with pytest.raises(ConfigError, match=r"init_from=.*empty.*no weights found"):
        check_runnable(cfg)
