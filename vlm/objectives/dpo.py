"""Preference losses on sequence log-probabilities: DPO (sigmoid / conservative), IPO, hinge, and MPO's BCO term.

Plain functions of per-pair tensors ``(B,)``, so that they can be checked against their formulas and another
implementation (TRL's ``DPOTrainer``) without a model. ``vlm.objectives.dpo`` computes the log-probabilities and
calls them. With ``d = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)``:

- ``sigmoid``: ``-(1 - e) log sigma(beta d) - e log sigma(-beta d)`` (Rafailov et al., 2023; with label smoothing
  ``e`` > 0 the conservative DPO of Mitchell, 2023);
- ``ipo``: ``(d - 1 / (2 beta))^2`` (Azar et al., 2023; its caller passes per-token averaged log-probs, as TRL does);
- ``hinge``: ``relu(1 - beta d)`` (SLiC, Zhao et al., 2023).

Rewards are ``beta (policy - ref)`` per answer (detached: they are metrics). ``bco_loss`` is MPO's quality term
(Wang et al., 2024, "Enhancing the Reasoning Ability of Multimodal LLMs via Mixed Preference Optimization"):
each answer judged on its own, ``-log sigma(r_chosen - delta) - log sigma(-(r_rejected - delta))``.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

#: ``loss_type`` -> ``(d, beta, label_smoothing) -> losses (B,)``
LOSSES: dict[str, Callable[[torch.Tensor, float, float], torch.Tensor]] = {
    "sigmoid": lambda d, beta, e: -(1 - e) * F.logsigmoid(beta * d) - e * F.logsigmoid(-beta * d),
    "ipo": lambda d, beta, e: (d - 1 / (2 * beta)) ** 2,
    "hinge": lambda d, beta, e: torch.relu(1 - beta * d),
}
#: loss types whose caller passes per-token averaged log-probs (IPO's length normalization)
AVERAGED = frozenset({"ipo"})


def check_options(loss_type: str, beta: float, label_smoothing: float) -> None:
    """``ValueError`` naming the option: an unknown ``loss_type``, ``beta <= 0``, ``label_smoothing`` outside
    ``[0, 0.5)``."""
    if loss_type not in LOSSES:
        raise ValueError(f"loss_type={loss_type!r}; expected one of {sorted(LOSSES)}")
    if not float(beta) > 0:
        raise ValueError(f"beta={beta!r}; expected a positive number (the KL penalty's inverse temperature)")
    if not 0 <= float(label_smoothing) < 0.5:
        raise ValueError(f"label_smoothing={label_smoothing!r}; expected a probability in [0, 0.5) that a pair's "
                         f"preference is flipped")


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair preference losses and rewards.

    Args: four ``(B,)`` log-probabilities of the answers (nats; summed over the answer's tokens, or averaged for
    ``ipo``), ``beta``, ``loss_type`` (a ``LOSSES`` key), ``label_smoothing`` (``sigmoid`` only).
    Returns: ``(losses (B,), chosen_rewards (B,), rejected_rewards (B,))``; the rewards are detached.
    """
    check_options(loss_type, beta, label_smoothing)
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    losses = LOSSES[loss_type](chosen - rejected, float(beta), float(label_smoothing))
    return losses, (beta * chosen).detach(), (beta * rejected).detach()


def bco_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1,
             delta: float = 0.0) -> torch.Tensor:
    """MPO's quality loss (binary classifier optimization): ``(B,)`` =
    ``-log sigma(beta (pc - rc) - delta) - log sigma(-(beta (pr - rr) - delta))``; ``delta``: the reward shift
    (MPO: a running mean of the rewards; 0 here by default, as TRL's ``bco_pair``)."""
    chosen = beta * (policy_chosen_logps - ref_chosen_logps) - delta
    rejected = beta * (policy_rejected_logps - ref_rejected_logps) - delta
    return -F.logsigmoid(chosen) - F.logsigmoid(-rejected)
