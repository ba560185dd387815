"""Activation checkpointing modes (``vlm.recompute``): ``full`` and ``selective`` give the same loss and gradients
as no checkpointing, and ``selective`` recomputes elementwise ops but never a matmul (``full`` re-runs the
matmuls). Counted with a dispatch mode during the backward pass."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_VISION, image_batch_ids, tiny_cfg
from torch.utils._python_dispatch import TorchDispatchMode

import vlm
from vlm import encoders
from vlm.recompute import mode
from vlm.train.config import ConfigError, compose

aten = torch.ops.aten
MATMULS = {aten.mm.default, aten.addmm.default, aten.bmm.default}


class Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[object, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func] = self.ops.get(func, 0) + 1
        return func(*args, **(kwargs or {}))

    def count(self, ops) -> int:
        return sum(self.ops.get(op, 0) for op in ops)


def run(model, ids, px):
    """Loss, every gradient, and the ops dispatched during the backward pass."""
    model.train().zero_grad(set_to_none=True)
    loss = model(ids, px, labels=ids).loss
    with Count() as c:
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, c


@pytest.fixture(scope="module")
def runs():
    torch.manual_seed(0)
    ref = vlm.build(tiny_cfg())
    ids = image_batch_ids(ref, [1, 1])
    px = torch.randn(2, 3, 32, 32)
    out = {"none": run(ref, ids, px)}
    for m in ("full", "selective"):
        model = copy.deepcopy(ref)
        assert model.llm.enable_gradient_checkpointing(m) and model.encoder.enable_gradient_checkpointing(m)
        out[m] = run(model, ids, px)
    return out


@pytest.mark.parametrize("m", ["full", "selective"])
def test_same_loss_and_gradients(runs, m):
    loss, grads, _ = runs[m]
    ref_loss, ref_grads, _ = runs["none"]
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=0, atol=1e-6, msg=name)


def test_selective_recomputes_elementwise_ops_but_no_matmul(runs):
    plain, full, selective = (runs[m][2] for m in ("none", "full", "selective"))
    # full re-runs every forward matmul of the checkpointed blocks in the backward pass; selective keeps them
    assert full.count(MATMULS) > plain.count(MATMULS)
    assert selective.count(MATMULS) == plain.count(MATMULS)
    # ... and recomputes the activation functions (forward silu / gelu in the backward pass) that plain keeps
    acts = {aten.silu.default, aten.gelu.default}
    assert plain.count(acts) == 0 < selective.count(acts)


@pytest.mark.parametrize("name", ["internvit", "siglip"])
def test_encoder_blocks_checkpointed_in_each_mode(name):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    plain = encoders.build(dict(TINY_VISION[name])).train()
    grads = {}
    for m in ("none", "full", "selective"):
        enc = copy.deepcopy(plain)
        assert enc.enable_gradient_checkpointing(m) is (m != "none")
        enc(x).square().mean().backward()
        grads[m] = {n: p.grad for n, p in enc.named_parameters() if p.grad is not None}
    for m in ("full", "selective"):
        for n in grads["none"]:
            torch.testing.assert_close(grads[m][n], grads["none"][n], rtol=0, atol=1e-6, msg=n)


def test_checkpointed_blocks_survive_deepcopy_and_eval():
    enc = encoders.build(dict(TINY_VISION["internvit"]))
    enc.enable_gradient_checkpointing("selective")
    other = copy.deepcopy(enc)
    block = other.blocks()[0]
    assert block.forward.__self__ is block  # rebound to the copy, not the original block
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(other.eval()(x), enc.eval()(x))


@pytest.mark.parametrize(("value", "expected"), [(False, "none"), (None, "none"), ("none", "none"), (True, "full"),
                                                 ("true", "full"), ("full", "full"), ("Selective", "selective")])
def test_mode_spellings(value, expected):
    assert mode(value) == expected


def test_config_accepts_selective_and_names_a_wrong_value():
    assert compose("micro", ["trainer.gradient_checkpointing=selective"]).trainer.gradient_checkpointing == "selective"
    assert compose("micro", ["trainer.gradient_checkpointing=true"]).trainer.gradient_checkpointing == "full"
    with pytest.raises(ConfigError, match=r"trainer.gradient_checkpointing='partial'.*selective"):
        compose("micro", ["trainer.gradient_checkpointing=partial"])
