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

The objective ``dpo`` (class ``DPO``) computes the answers' log-probabilities (``vlm.objectives.pair_logps``), the
reference's (``vlm.objectives.reference``) and these losses.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlm.objectives.base import Objective, ObjectiveOutput
from vlm.objectives.pair_logps import AnswerLogps, separate_logps, shared_logps
from vlm.objectives.reference import REFERENCES
from vlm.objectives.registry import OBJECTIVES

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


# ------------------------------------------------------------------------------------------------- the objective


@OBJECTIVES.register("dpo")
class DPO(Objective):
    """Preference tuning on pairs (``vlm.data.preference``): ``dpo_weight`` x ``dpo_loss`` (``loss_type``,
    ``beta``, ``label_smoothing``) + ``bco_weight`` x ``bco_loss`` (MPO's quality term, shift ``bco_delta``) +
    ``sft_weight`` x the mean NLL of the chosen answers' tokens (RPO / MPO's generation term).

    ``reference``: ``copy`` | ``adapters`` | ``precomputed`` (``vlm.objectives.reference``). ``shared_prompt``: one
    forward per pair (``shared_logps``) or two (``separate_logps``, the naive form). ``eval_data``: a key of
    ``data`` naming held-out pairs, scored in every evaluation (``preference_accuracy``, rewards, margin).
    The step's loss is the mean over its pairs. Metrics: ``rewards_chosen``, ``rewards_rejected``,
    ``reward_margin``, ``preference_accuracy`` (share of pairs whose chosen reward is higher).
    """

    supports_packing = False  # a row is a pair (the collator of preference data builds it)

    def __init__(self, model: nn.Module, beta: float = 0.1, loss_type: str = "sigmoid",
                 label_smoothing: float = 0.0, dpo_weight: float = 1.0, bco_weight: float = 0.0,
                 bco_delta: float = 0.0, sft_weight: float = 0.0, reference: str = "copy",
                 shared_prompt: bool = True, head_chunk_size: int = 4096, eval_data: str | None = None) -> None:
        super().__init__()
        check_options(loss_type, beta, label_smoothing)
        if reference not in REFERENCES:
            raise ValueError(f"objective 'dpo': reference={reference!r}; expected one of {REFERENCES.names()}")
        self.beta, self.loss_type, self.label_smoothing = float(beta), loss_type, float(label_smoothing)
        self.dpo_weight, self.bco_weight, self.bco_delta = float(dpo_weight), float(bco_weight), float(bco_delta)
        self.sft_weight, self.shared_prompt, self.chunk = float(sft_weight), bool(shared_prompt), int(head_chunk_size)
        self.eval_data = eval_data
        self.pad_token_id = int(getattr(getattr(model, "tokenizer", None), "pad_token_id", None) or 0)
        self.reference_name = reference
        self.reference = REFERENCES.get(reference)(model)  # a plain object: no parameter of the stage

    @property
    def precomputes(self) -> bool:
        """Whether the stage must compute the reference log-probs before training (``reference_table``)."""
        return bool(getattr(self.reference, "precomputes", False))

    def policy_logps(self, model: nn.Module, batch: dict[str, Any]) -> AnswerLogps:
        """Summed answer log-probs ``(B,)`` of ``model`` on pair rows, one or two forwards per pair."""
        if batch.get("part") is None:
            raise ValueError("objective 'dpo' needs preference pairs (a data set such as 'preference' or "
                             "'shapes_preference': rows prompt + chosen + rejected with 'part'); this batch has none")
        if self.shared_prompt:
            return shared_logps(model, batch, self.chunk)
        return separate_logps(model, batch, self.pad_token_id, self.chunk)

    def reference_table(self, model: nn.Module, dataset: Any, collator: Any, device: torch.device,
                        precision: torch.dtype) -> dict[int, tuple[float, float]]:
        """The ``precomputed`` reference's log-probs of every pair of ``dataset`` under ``model`` (its start)."""
        return self.reference.table(model, dataset, collator, self.policy_logps, device, precision)

    def weight(self, batch: dict[str, Any]) -> float:
        """Pairs in the batch (the step's loss is the mean over its pairs)."""
        return float(batch["input_ids"].shape[0])

    def losses(self, model: nn.Module, batch: dict[str, Any], with_margins: bool = False) -> Any:
        """The batch's mean loss and its metrics (and, ``with_margins``, the reward margins ``(B,)``, detached)."""
        policy = self.policy_logps(model, batch)
        ref = self.reference.logps(model, batch, self.policy_logps)
        p, r = (policy.averaged(), ref.averaged()) if self.loss_type in AVERAGED else (policy, ref)
        losses, chosen_r, rejected_r = dpo_loss(p.chosen, p.rejected, r.chosen.to(p.chosen), r.rejected.to(p.chosen),
                                                self.beta, self.loss_type, self.label_smoothing)
        loss = self.dpo_weight * losses.mean()
        if self.bco_weight:
            loss = loss + self.bco_weight * bco_loss(policy.chosen, policy.rejected, ref.chosen.to(p.chosen),
                                                     ref.rejected.to(p.chosen), self.beta, self.bco_delta).mean()
        if self.sft_weight:
            loss = loss - self.sft_weight * policy.chosen.sum() / policy.chosen_tokens.sum().clamp(min=1)
        metrics = {"rewards_chosen": chosen_r.mean().item(), "rewards_rejected": rejected_r.mean().item(),
                   "reward_margin": (chosen_r - rejected_r).mean().item(),
                   "preference_accuracy": (chosen_r > rejected_r).float().mean().item()}
        return (loss, metrics, chosen_r - rejected_r) if with_margins else (loss, metrics)

    def forward(self, model: nn.Module, batch: dict[str, Any], weight: float | None = None,
                total: float | None = None) -> ObjectiveOutput:
        """The batch's loss and metrics; ``logits (B,)``: each pair's reward margin ``r_chosen - r_rejected`` (the
        logit of the Bradley-Terry preference probability; > 0: the pair is ranked right)."""
        loss, metrics, margins = self.losses(model, batch, with_margins=True)
        if total is not None:
            loss = loss * ((self.weight(batch) if weight is None else weight) / max(total, 1e-12))
        return ObjectiveOutput(loss=loss, metrics=metrics, logits=margins)

    @staticmethod
    @torch.no_grad()
    def evaluate_pairs(module: nn.Module, batches: Any, precision: torch.dtype) -> dict[str, float]:
        """Held-out preference metrics over ``batches`` (``(batch, kinds)``: collated pair rows on the model's
        device and each pair's kind or ``None``), computed by ``module(batch)`` (the stage's wrapped
        ``TrainModule``: DDP / FSDP see an ordinary forward) in eval mode: the means over pairs of the rewards, the
        margin and ``preference_accuracy``, keyed ``pairs/<metric>``, and the accuracy over the pairs of each kind
        (``pairs/preference_accuracy/<kind>``; shapes pairs: their task)."""
        sums: dict[str, float] = {}
        right: dict[str, list[int]] = {}
        n = 0
        was = module.training
        module.eval()
        try:
            for batch, kinds in batches:
                device = batch["input_ids"].device
                with torch.autocast(device.type, dtype=precision, enabled=precision != torch.float32):
                    out = module(batch)
                k = batch["input_ids"].shape[0]
                for key, v in out.metrics.items():
                    sums[key] = sums.get(key, 0.0) + v * k
                if out.logits is not None:
                    for kind, ok in zip(kinds or [None] * k, (out.logits > 0).tolist()):
                        if kind is not None:
                            right.setdefault(str(kind), []).append(int(ok))
                n += k
        finally:
            module.train(was)
        return {**{f"pairs/{k}": v / max(n, 1) for k, v in sums.items()},
                **{f"pairs/preference_accuracy/{k}": sum(v) / len(v) for k, v in sorted(right.items())}}
