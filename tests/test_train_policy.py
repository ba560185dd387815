"""Every stage / policy combination sets exactly the intended ``requires_grad``."""
from __future__ import annotations

import itertools

import pytest
import torch

from vlm.train import ConfigError, compose
from vlm.train.config import stage_config
from vlm.train.build import build_model, build_tokenizer, seed_everything
from vlm.train.policy import apply_policies, check_policies, layer_stack, merge_lora

UNUSED_ENCODER = ("post_layernorm", "head")  # tower parts after the selected feature layer: never trained


def build(overrides=()):
    cfg = compose("micro", list(overrides))
    seed_everything(0)
    model = build_model(cfg, build_tokenizer(cfg, ["plain", "chatml"]))
    return cfg, model


def trainable(module):
    return {n for n, p in module.named_parameters() if p.requires_grad}


def names(module):
    return {n for n, _ in module.named_parameters()}


def expected(module_name, policy, module, stage):
    everything = names(module)
    if module_name == "encoder":
        everything = {n for n in everything if not any(u in n for u in UNUSED_ENCODER)}
    if policy == "frozen":
        return set()
    if policy == "full":
        return everything
    if policy == "lora":
        return {n for n in everything if "lora_" in n}
    if policy == "partial":
        start = stage.partial_from[module_name]
        stack_name, stack = layer_stack(module)
        first = start % len(stack)
        keep = {f"{stack_name}.{i}." for i in range(first, len(stack))}
        out = {n for n in everything if any(n.startswith(k) for k in keep)}
        # plus what follows the stack: the final norm of the LLM
        if module_name == "llm":
            out |= {n for n in everything if n.startswith("model.model.norm")}
        return out
    raise AssertionError(policy)


ENCODER_LLM = ["frozen", "full", "lora", "partial"]
CONNECTOR = ["frozen", "full", "partial"]


@pytest.mark.parametrize("enc,conn,llm", [c for c in itertools.product(ENCODER_LLM, CONNECTOR, ENCODER_LLM)
                                           if set(c) != {"frozen"}])  # all frozen: test_everything_frozen_is_an_error
def test_policy_combinations(enc, conn, llm):
    cfg, model = build([f"stage.sft.policy.encoder={enc}", f"stage.sft.policy.connector={conn}",
                        f"stage.sft.policy.llm={llm}", "stage.sft.partial_from.encoder=1",
                        "stage.sft.partial_from.llm=-1", "stage.sft.partial_from.connector=1",
                        "stage.sft.lora.target_modules=[q_proj,v_proj]"])
    stage = cfg.stage.sft
    check_policies(stage, torch.device("cpu"))
    apply_policies(model, stage)
    for module_name, policy in (("encoder", enc), ("connector", conn), ("llm", llm)):
        module = getattr(model, module_name)
        want = expected(module_name, policy, module, stage)
        assert trainable(module) == want, (module_name, policy, sorted(trainable(module) ^ want)[:6])
        if policy == "lora":
            lora = {n for n in names(module) if "lora_" in n}
            assert lora and all(("q_proj" in n or "v_proj" in n) for n in lora)
        else:
            assert not any("lora_" in n for n in names(module))


def test_stage_defaults_pretrain_trains_only_the_connector():
    cfg, model = build(["stage.pretrain.policy.encoder=frozen", "stage.pretrain.policy.llm=frozen"])
    apply_policies(model, cfg.stage.pretrain)
    assert trainable(model.encoder) == set() and trainable(model.llm) == set()
    assert trainable(model.connector) == names(model.connector)


def test_shipped_stage_defaults():
    cfg = compose("llava15")
    assert dict(cfg.stage.pretrain.policy) == {"encoder": "frozen", "connector": "full", "llm": "frozen"}
    assert dict(cfg.stage.sft.policy) == {"encoder": "frozen", "connector": "full", "llm": "full"}
    cfg = compose("scratch_siglip_qwen")
    assert dict(cfg.stage.sft.policy) == {"encoder": "frozen", "connector": "full", "llm": "lora"}


def test_partial_encoder_from_layer():
    cfg, model = build(["stage.sft.policy.encoder=partial", "stage.sft.partial_from.encoder=1"])
    apply_policies(model, cfg.stage.sft)
    t = trainable(model.encoder)
    assert t and all(".layers.1." in n for n in t)
    assert not any("embeddings" in n for n in t)


def test_everything_frozen_is_an_error():
    from vlm.train.optim import param_groups

    cfg, model = build(["stage.sft.policy.encoder=frozen", "stage.sft.policy.connector=frozen",
                        "stage.sft.policy.llm=frozen"])
    apply_policies(model, cfg.stage.sft)
    with pytest.raises(ValueError, match="no trainable"):
        param_groups(model, cfg.stage.sft)


def test_unknown_policy_and_bad_targets_fail_at_compose_time():
    with pytest.raises(ConfigError, match=r"stage.sft.policy.llm='adapters': unknown policy.*'frozen'"):
        compose("micro", ["stage.sft.policy.llm=adapters"])
    with pytest.raises(ConfigError, match=r"stage.sft.policy.connector='lora': .*train the connector with 'full'"):
        compose("micro", ["stage.sft.policy.connector=lora"])
    cfg = compose("micro", ["stage.sft.policy.connector=lora"], validate=False)
    with pytest.raises(ValueError, match=r"policy.connector='lora'"):  # the same check, without a device
        check_policies(cfg.stage.sft)


def test_qlora_on_cpu_fails_before_anything_is_built():
    cfg = compose("micro", ["stage.sft.policy.llm=qlora"])
    with pytest.raises(RuntimeError, match="CUDA"):
        check_policies(cfg.stage.sft, torch.device("cpu"))


def test_merge_lora_gives_the_same_function():
    cfg, model = build(["stage.sft.policy.llm=lora", "stage.sft.lora.dropout=0.0"])
    apply_policies(model, cfg.stage.sft)
    with torch.no_grad():
        for n, p in model.llm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    model.eval()
    ids = torch.randint(0, 200, (2, 12))
    before = model(ids).logits
    merge_lora(model)
    assert not any("lora_" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(model(ids).logits, before, atol=1e-5, rtol=1e-5)


def test_lora_asks_the_component_whether_it_supports_lora():
    """The check comes from the component family's capability, not from the module's name; a built component that
    does not state ``supports_lora`` is refused when the policy is applied too."""
    from vlm.connectors.base import Connector
    from vlm.train.policy import Lora, component_family

    assert [m for m in ("encoder", "connector", "llm") if component_family(m).supports_lora] == ["encoder", "llm"]
    with pytest.raises(ConfigError, match="the connector does not support LoRA: train the connector with 'full'"):
        compose("micro", ["stage.sft.policy.connector=lora"])  # refused when the config is composed
    cfg = compose("micro", ["stage.sft.policy.connector=lora"], validate=False)
    with pytest.raises(ValueError, match="the connector does not support LoRA: train the connector with 'full'"):
        check_policies(stage_config(cfg, "sft"), torch.device("cpu"))
    with pytest.raises(ValueError, match="the llm does not support LoRA"):
        Lora().apply(Connector(), "llm", cfg.stage.sft)


def test_layer_stack_asks_the_component_before_guessing():
    """A tower with 2 blocks whose blocks hold a longer Sequential (an MLP): 'partial' must train blocks, not MLP
    layers. The component's own ``blocks()`` decides; without it the longest stack is the (wrong) guess."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 4))

    class Tower(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([Block(), Block()])

    class StatingTower(Tower):
        def blocks(self) -> nn.ModuleList:
            return self.layers

    name, stack = layer_stack(StatingTower())
    assert name == "layers" and len(stack) == 2
    name, stack = layer_stack(Tower())
    assert len(stack) == 3  # the guess: a block's MLP
