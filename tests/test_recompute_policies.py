"""Gradient checkpointing under every training policy: for each LLM policy x checkpointing mode x tower/connector
policy, the loss and every gradient equal those of the same model without checkpointing.

The models are built as a run builds them (``build_model(..., gradient_checkpointing=mode)``, then the stage's
policies), so transformers' own checkpointing switch and peft's adapter injection are the real ones. Before the fix,
every LLM policy that freezes the input embeddings (``frozen``, ``partial``, ``lora``) crashed at the first forward
under checkpointing: transformers' switch hooks the embeddings so their output requires grad, which made the frozen
lookup's output a leaf that the in-place image injection may not write into."""
from __future__ import annotations

import copy
import functools
import importlib.util
import itertools

import pytest
import torch
from conftest import image_batch_ids

from vlm.train import compose
from vlm.train.build import build_model, build_tokenizer, seed_everything
from vlm.train.policy import apply_policies

MODES = ("full", "selective")
LLM_POLICIES = ("frozen", "partial", "lora", "qlora", "full")
# (encoder, connector): both frozen, both trained, the tower through LoRA adapters
SIDES = (("frozen", "frozen"), ("full", "full"), ("lora", "full"))
HAS_QLORA = torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None


@functools.cache
def micro():
    return compose("micro", ["stage.sft.partial_from.llm=-1", "stage.sft.lora.dropout=0.1"])


def stage_cfg(llm: str, encoder: str, connector: str):
    """The micro recipe's SFT stage with these policies."""
    stage = copy.deepcopy(micro().stage.sft)
    stage.policy.llm, stage.policy.encoder, stage.policy.connector = llm, encoder, connector
    return stage


@pytest.fixture(scope="module")
def built():
    """The micro model without checkpointing and in each mode, from one seed (same weights), and a batch."""
    cfg = micro()
    tok = build_tokenizer(cfg, ["plain", "chatml"])
    models = {}
    for m in ("none", *MODES):
        seed_everything(0)
        models[m] = build_model(cfg, tok, gradient_checkpointing=m if m != "none" else False)
    ref = models["none"].state_dict()
    for m in MODES:
        assert all(torch.equal(v, ref[k]) for k, v in models[m].state_dict().items())
    size = models["none"].encoder.image_size
    ids = image_batch_ids(models["none"], [1, 2], length=64)
    px = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    return models, ids, px


def prepare(model, stage, device):
    """Apply ``stage``'s policies (LoRA ``B`` made non-zero, so ``A`` gets a gradient too) on ``device``."""
    model = copy.deepcopy(model)
    seed_everything(0)
    apply_policies(model, stage)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.to(device)


def loss_and_grads(model, ids, px):
    model.train().zero_grad(set_to_none=True)
    torch.manual_seed(3)  # the same dropout masks in every run (checkpointing replays them in the recompute)
    dev = next(model.parameters()).device
    loss = model(ids.to(dev), px.to(dev), labels=ids.to(dev)).loss
    loss.backward()
    grads = {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach().cpu(), grads


def assert_same(got, want, atol=1e-6):
    (loss, grads), (ref_loss, ref_grads) = got, want
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=atol)
    assert grads.keys() == ref_grads.keys() and grads
    missing = [n for n, g in ref_grads.items() if g is None]
    assert not missing, f"no gradient without checkpointing: {missing[:4]}"
    for name, g in grads.items():
        assert g is not None, f"{name}: no gradient under checkpointing"
        torch.testing.assert_close(g, ref_grads[name], rtol=0, atol=atol, msg=name)


# every LLM policy with the tower and connector frozen or trained (nothing to train: frozen everywhere), and the
# tower through LoRA with the LLM frozen or through LoRA
CASES = [(llm, side, m) for llm, side, m in itertools.product(LLM_POLICIES, SIDES, MODES)
         if (side != SIDES[0] or llm != "frozen") and (side != SIDES[2] or llm in ("frozen", "lora"))]


@pytest.fixture(scope="module")
def references():
    return {}


@pytest.mark.parametrize(("llm", "side", "m"), CASES, ids=[f"llm={a}-enc={b[0]}-conn={b[1]}-{c}" for a, b, c in CASES])
def test_checkpointing_gives_the_same_loss_and_gradients(built, references, monkeypatch, llm, side, m):
    models, ids, px = built
    stage = stage_cfg(llm, *side)
    device = torch.device("cpu")
    if llm == "qlora":
        if HAS_QLORA:
            device = torch.device("cuda")
        else:  # QLoRA's path on CPU as far as it runs: everything but bitsandbytes' NF4 quantization (CUDA only)
            monkeypatch.setattr("vlm.train.policy.quantize_4bit", lambda model, *a, **k: None)
    key = (llm, side)
    if key not in references:  # without checkpointing: shared by both modes
        references[key] = loss_and_grads(prepare(models["none"], stage, device), ids, px)
    got = loss_and_grads(prepare(models[m], stage, device), ids, px)
    assert_same(got, references[key], atol=1e-6 if device.type == "cpu" else 1e-4)


@pytest.mark.skipif(not HAS_QLORA, reason="QLoRA's NF4 quantization needs CUDA and bitsandbytes")
@pytest.mark.parametrize("m", MODES)
def test_qlora_quantized_llm_under_checkpointing(built, m):
    """The real NF4 quantization (CUDA): the quantized LLM with adapters trains under checkpointing."""
    models, ids, px = built
    stage = stage_cfg("qlora", "frozen", "full")
    model = prepare(models[m], stage, torch.device("cuda"))
    assert any(type(mod).__name__ == "Linear4bit" for mod in model.llm.modules())
    ref = loss_and_grads(prepare(models["none"], stage, torch.device("cuda")), ids, px)
    assert_same(loss_and_grads(model, ids, px), ref, atol=1e-4)


@pytest.mark.parametrize("m", MODES)
def test_injection_under_an_input_grad_hook(built, m):
    """A hook that makes a frozen embedding's output require grad (transformers' / peft's
    ``enable_input_require_grads``, as peft's ``prepare_model_for_kbit_training`` installs it) leaves the lookup's
    output a leaf: injection then writes out of place, with the same loss and gradients."""
    models, ids, px = built
    stage = stage_cfg("lora", "frozen", "full")
    ref = loss_and_grads(prepare(models["none"], stage, torch.device("cpu")), ids, px)
    model = prepare(models[m], stage, torch.device("cpu"))
    model.llm.model.enable_input_require_grads()
    embeds = model.llm.embed(ids)
    assert embeds.is_leaf and embeds.requires_grad
    assert_same(loss_and_grads(model, ids, px), ref)


def test_checkpointing_leaves_the_embedding_output_alone(built):
    """transformers' switch hooks the input embeddings (needed by reentrant checkpointing only; ours is
    non-reentrant): the hook is removed, so a frozen lookup's output stays a plain tensor written in place."""
    models, ids, _ = built
    for m in MODES:
        model = prepare(models[m], stage_cfg("lora", "frozen", "full"), torch.device("cpu")).train()
        embeds = model.llm.embed(ids)
        assert not embeds.requires_grad, m
        feats = torch.zeros(int((ids == model.image_token_id).sum()), embeds.shape[-1])
        assert model.llm.inject(embeds, ids, feats, model.image_token_id).data_ptr() == embeds.data_ptr()
