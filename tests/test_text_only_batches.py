"""A batch without images (text-only samples of an SFT mixture) while the tower or connector trains: the model runs
them on a stand-in image weighted 0 (``VLM.stand_in_zero``), so every trainable tower / connector parameter gets a
zero gradient (not ``None``: what DDP's reducer and FSDP's reduce-scatter need on every process), and the loss, the
LLM's gradients, the modes and BatchNorm statistics are exactly those of the same batch without it. The 2-process
runs on mixed data are in ``test_train_distributed.py``."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_cfg

import vlm
from vlm.objectives import build as build_objective
from vlm.train.policy import freeze_unused_encoder_layers

CONNECTORS = {
    "mlp": {"name": "mlp", "depth": 2},
    "linear": {"name": "linear"},
    "identity": {"name": "identity"},
    "pixel_shuffle_mlp": {"name": "pixel_shuffle_mlp", "scale": 0.5},
    "qformer": {"name": "qformer", "num_queries": 4, "hidden_size": 16, "num_layers": 2, "num_heads": 2,
                "intermediate_size": 32, "cross_attention_frequency": 1, "dropout": 0.1},
    "resampler": {"name": "resampler", "num_queries": 4, "num_heads": 2},
    "perceiver": {"name": "perceiver", "num_latents": 4, "depth": 2, "heads": 2, "head_dim": 4, "ff_mult": 2},
    "xattn": {"name": "xattn", "heads": 2, "head_dim": 8, "ff_mult": 2},
    "xattn_perceiver": {"name": "xattn", "heads": 2, "head_dim": 8, "ff_mult": 2,
                        "reducer": {"name": "perceiver", "num_latents": 4, "depth": 1, "heads": 2, "head_dim": 4}},
}
TIMM_CNN = {"name": "timm", "model_name": "resnet10t", "image_size": 32, "feature_layer": 3,
            "model_kwargs": {"channels": [8, 16, 32, 32], "stem_width": 8}}


def build(connector: str, encoder: str = "clip") -> vlm.VLM:
    torch.manual_seed(0)
    cfg = tiny_cfg("clip" if encoder == "timm" else encoder, connector=CONNECTORS[connector])
    if encoder == "timm":
        cfg["encoder"] = dict(TIMM_CNN)
    model = vlm.build(cfg)
    freeze_unused_encoder_layers(model)  # as every stage does (CLIP's post_layernorm is not in its features)
    return model.train()


def text_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (2, 20), generator=g)
    labels = ids.clone()
    labels[:, :6] = -100
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    labels[1, 15:] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def image_path(model: vlm.VLM) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if n.startswith(("encoder.", "connector.")) and p.requires_grad]


def loss_and_grads(model, objective, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    model.zero_grad(set_to_none=True)
    loss = objective(model, batch, weight=objective.weight(batch), total=objective.weight(batch) * 3).loss
    loss.backward()
    return loss.detach(), {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("connector", list(CONNECTORS))
@pytest.mark.parametrize("objective", [{"name": "lm"}, {"name": "lm", "label_only_head": False,
                                                       "loss_weighting": "square"}],
                         ids=["hidden_states", "forward"])  # VLM.hidden_states (label-only head), VLM.forward
def test_text_only_batch_gives_every_trainable_image_parameter_a_zero_gradient(connector, objective, monkeypatch):
    """Against the same batch without the stand-in: the same loss (bit for bit), the same gradients wherever there
    was one (the LLM's; an xattn block's feed-forward, which runs on text too), and a zero gradient (not ``None``)
    for every other trainable tower and connector parameter."""
    model = build(connector)
    obj = build_objective(objective, model=model)
    batch = text_batch()
    trainable = image_path(model)
    assert trainable or connector == "identity"
    loss, grads = loss_and_grads(model, obj, batch)
    with torch.no_grad():  # no gradient wanted: no stand-in
        assert torch.equal(obj(model, batch, weight=obj.weight(batch), total=obj.weight(batch) * 3).loss, loss)
    with monkeypatch.context() as m:
        m.setattr(model, "stand_in_zero", lambda device: None)
        ref_loss, ref = loss_and_grads(model, obj, batch)
    assert torch.equal(loss, ref_loss)
    for n, _ in trainable:
        assert grads[n] is not None, n
    for n, g in grads.items():
        if ref[n] is not None:
            assert torch.equal(g, ref[n]), n
        elif g is not None:
            assert not g.any(), n
    assert sum(ref[n] is None for n, _ in trainable) > 0 or connector == "identity"  # it did stand in for some
    assert all(m.training for m in model.modules())  # eval mode for the stand-in only


@pytest.mark.parametrize("policy", ["encoder_frozen", "all_frozen"])
@pytest.mark.parametrize("connector", ["mlp", "qformer", "xattn"])
def test_frozen_tower_is_not_run_and_a_frozen_image_path_adds_nothing(policy, connector, monkeypatch):
    """A frozen tower is not run for the stand-in (its tokens are zeros) unless the strategy runs the image path in
    lockstep (FSDP); with the connector frozen too nothing is added and no gradient appears."""
    model = build(connector)
    model.encoder.requires_grad_(False)
    if policy == "all_frozen":
        model.connector.requires_grad_(False)
    calls = []
    monkeypatch.setattr(model.encoder, "forward", lambda px: calls.append(px.shape) or type(model.encoder).forward(
        model.encoder, px))
    obj = build_objective({"name": "lm"}, model=model)
    batch = text_batch()
    loss, grads = loss_and_grads(model, obj, batch)
    assert calls == []
    assert all(grads[n] is None for n, _ in model.named_parameters() if n.startswith("encoder."))
    if policy == "all_frozen":
        assert model.stand_in_zero(torch.device("cpu")) is None
        assert all(grads[n] is None for n, _ in model.named_parameters() if n.startswith("connector."))
    else:
        assert all(grads[n] is not None for n, _ in image_path(model))  # (xattn's feed-forward runs on text)
    model.image_path_in_lockstep = True  # FSDP: the (sharded) tower runs on every process, even frozen
    loss2, _ = loss_and_grads(model, obj, batch)
    assert calls == [(1, 3, 32, 32)] and torch.equal(loss, loss2)
    with torch.no_grad():  # generation under FSDP too
        model.generate(batch["input_ids"][:1], max_new_tokens=1)
    assert len(calls) == 2


def test_stand_in_leaves_batchnorm_statistics_and_modes_alone():
    """A CNN tower in training mode: the stand-in runs in eval mode, so its BatchNorm running statistics (and
    num_batches_tracked) are those before the text-only batch, and every module's mode is restored."""
    model = build("mlp", encoder="timm")
    before = {k: v.clone() for k, v in model.encoder.state_dict().items() if "running" in k or "num_batches" in k}
    assert before
    obj = build_objective({"name": "lm"}, model=model)
    _, grads = loss_and_grads(model, obj, text_batch())
    assert all(grads[n] is not None and not grads[n].any() for n, _ in image_path(model))
    after = model.encoder.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert all(m.training for m in model.modules())


def test_images_in_the_batch_need_no_stand_in(monkeypatch):
    """With images the real features reach every parameter: the stand-in is never built."""
    model = build("mlp")
    monkeypatch.setattr(model, "stand_in_zero", lambda device: pytest.fail("stand-in built for a batch with images"))
    K = model.num_image_tokens()
    batch = text_batch()
    batch["input_ids"][0, 2:2 + K] = model.image_token_id
    batch["pixel_values"] = torch.randn(1, 3, 32, 32)
    obj = build_objective({"name": "lm"}, model=model)
    _, grads = loss_and_grads(model, obj, batch)
    assert all(grads[n] is not None and grads[n].any() for n, _ in image_path(model)
               if "bias" not in n or "connector" in n)
