"""``vlm.objectives.dpo.dpo_loss`` / ``bco_loss``: values and gradients equal the formulas and TRL's DPOTrainer loss
(its ``_compute_loss``, driven with the same per-token log-probs through a stand-in model) for every loss type."""
from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from vlm.objectives.dpo import AVERAGED, LOSSES, bco_loss, dpo_loss

B, T = 5, 7
TOL = dict(rtol=1e-6, atol=1e-6)


def token_logps(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs ``(2B, T)`` of [chosen; rejected] answers and their completion masks (lengths 2..T)."""
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(2 * B, T, generator=g, dtype=torch.float32) * 3
    lengths = torch.randint(2, T + 1, (2 * B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    return logps * mask, mask


def trl_loss(loss_types: list[str], weights: list[float], beta: float, per_token: torch.Tensor, mask: torch.Tensor,
             ref: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """TRL 1.x's DPO loss: ``DPOTrainer._compute_loss`` on a stand-in trainer whose model returns ``per_token``
    log-probs ``(2B, T)`` (the completion mask: ``mask``, shifted by one as TRL shifts it) and precomputed reference
    log-probs ``ref (2B,)``."""
    from trl.trainer.dpo_trainer import DPOTrainer

    n = per_token.shape[0]
    # the model's fused head gives 0 where the label is -100 (outside the completion)
    stub_out = SimpleNamespace(log_probs=per_token * mask, entropy=torch.zeros_like(per_token),
                               mean_logits=torch.zeros_like(per_token), is_top1=torch.zeros_like(per_token).bool())
    accel = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)
    trainer = SimpleNamespace(model=SimpleNamespace(training=True), accelerator=accel, aux_loss_enabled=False,
                              ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                              loss_types=loss_types, loss_weights=weights, beta=beta,
                              label_smoothing=label_smoothing, use_weighting=False,
                              _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    completion_mask = torch.cat([torch.zeros(n, 1), mask], dim=1).long()  # (2B, T + 1): TRL drops the first
    inputs = {"input_ids": torch.zeros(n, T + 1, dtype=torch.long), "attention_mask": torch.ones(n, T + 1),
              "completion_mask": completion_mask, "ref_chosen_logps": ref[:n // 2], "ref_rejected_logps": ref[n // 2:]}
    return DPOTrainer._compute_loss(trainer, lambda **kw: stub_out, inputs, False)


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_equals_trl_and_formula(loss_type, beta):
    per_token, mask = token_logps(hash((loss_type, beta)) % 1000)
    ref = -torch.rand(2 * B, generator=torch.Generator().manual_seed(1)) * 10
    # TRL: the mean over pairs and its gradient w.r.t. the per-token log-probs
    theirs_in = per_token.clone().requires_grad_(True)
    theirs = trl_loss([loss_type], [1.0], beta, theirs_in, mask, ref)
    theirs.backward()
    # ours: the sums (IPO: the per-token means, as the objective passes them), then dpo_loss
    ours_in = per_token.clone().requires_grad_(True)
    seq = (ours_in * mask).sum(1)
    ref_seq = ref
    if loss_type in AVERAGED:
        seq, ref_seq = seq / mask.sum(1), ref / mask.sum(1)
    losses, rc, rr = dpo_loss(seq[:B], seq[B:], ref_seq[:B], ref_seq[B:], beta=beta, loss_type=loss_type)
    losses.mean().backward()
    torch.testing.assert_close(losses.mean(), theirs.detach(), **TOL)
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, **TOL)
    # the formula, by hand
    d = (seq[:B] - ref_seq[:B]) - (seq[B:] - ref_seq[B:])
    by_hand = {"sigmoid": -F.logsigmoid(beta * d), "ipo": (d - 1 / (2 * beta)) ** 2,
               "hinge": torch.clamp(1 - beta * d, min=0)}[loss_type]
    torch.testing.assert_close(losses, by_hand.detach(), **TOL)
    torch.testing.assert_close(rc, beta * (seq[:B] - ref_seq[:B]).detach(), **TOL)
    torch.testing.assert_close(rr, beta * (seq[B:] - ref_seq[B:]).detach(), **TOL)
    assert not rc.requires_grad and not rr.requires_grad


def test_conservative_dpo_label_smoothing_formula_and_gradient():
    """Label smoothing e: -(1-e) log s(b d) - e log s(-b d); gradient d loss / d d = -b ((1-e) s(-b d) - e s(b d))."""
    g = torch.Generator().manual_seed(3)
    pc, pr, rc, rr = (torch.randn(B, generator=g) * 5 for _ in range(4))
    pc.requires_grad_(True)
    beta, e = 0.3, 0.2
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="sigmoid", label_smoothing=e)
    losses.sum().backward()
    d = ((pc - rc) - (pr - rr)).detach()
    want = -(1 - e) * torch.log(torch.sigmoid(beta * d)) - e * torch.log(torch.sigmoid(-beta * d))
    torch.testing.assert_close(losses.detach(), want, **TOL)
    torch.testing.assert_close(pc.grad, -beta * ((1 - e) * torch.sigmoid(-beta * d) - e * torch.sigmoid(beta * d)),
                               **TOL)


def test_mpo_mix_equals_trl_sigmoid_bco_sft():
    """MPO = w_p DPO(sigmoid) + w_q BCO + w_g SFT (mean NLL of the chosen tokens): TRL's loss_types mix."""
    per_token, mask = token_logps(11)
    ref = -torch.rand(2 * B, generator=torch.Generator().manual_seed(2)) * 10
    beta, w = 0.1, (0.8, 0.2, 1.0)
    theirs_in = per_token.clone().requires_grad_(True)
    theirs = trl_loss(["sigmoid", "bco_pair", "sft"], list(w), beta, theirs_in, mask, ref)
    theirs.backward()
    ours_in = per_token.clone().requires_grad_(True)
    seq = (ours_in * mask).sum(1)
    dpo, _, _ = dpo_loss(seq[:B], seq[B:], ref[:B], ref[B:], beta=beta)
    bco = bco_loss(seq[:B], seq[B:], ref[:B], ref[B:], beta=beta)
    sft = -(ours_in[:B] * mask[:B]).sum() / mask[:B].sum()
    ours = w[0] * dpo.mean() + w[1] * bco.mean() + w[2] * sft
    ours.backward()
    torch.testing.assert_close(ours.detach(), theirs.detach(), **TOL)
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, **TOL)


@pytest.mark.parametrize("bad, match", [(dict(loss_type="kto"), "loss_type='kto'"), (dict(beta=0.0), "beta=0.0"),
                                        (dict(label_smoothing=0.5), "label_smoothing=0.5")])
def test_bad_options_are_named(bad, match):
    x = torch.zeros(2)
    with pytest.raises(ValueError, match=match):
        dpo_loss(x, x, x, x, **bad)
