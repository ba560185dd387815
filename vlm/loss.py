"""Next-token loss with a choice of how samples of different answer lengths are weighted (registry ``WEIGHTINGS``).

- ``token`` (LLaVA, transformers' default): every target token counts the same, so a 30-token grounding answer
  outweighs a 1-token VQA answer 30 to 1.
- ``sample``: each sample's tokens share one unit of weight (``1 / n_i``): every sample counts the same.
- ``square`` (InternVL 2.5's "square averaging"): ``1 / sqrt(n_i)``, between the two.

The result is normalized by the total weight of the (micro-)batch. A weighting is a registered component
(``WEIGHTINGS``) stating what it is: the per-token divisor of a sample with ``n`` targets, the total weight of a
batch's samples, and whether every target token weighs the same (``per_token``: the LM's own loss is then exact).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vlm.labels import IGNORE_INDEX
from vlm.llm.masks import segment_starts
from vlm.registry import Registry


class Weighting:
    """How the ``n`` target tokens of one sample share its weight."""

    per_token = False   # every target token weighs 1: the mean over the batch's tokens (the LM's own loss)

    def divisor(self, n: torch.Tensor) -> torch.Tensor:
        """``n`` (target count of each token's sample, any shape, float) -> what each token's loss is divided by."""
        raise NotImplementedError

    def total(self, counts: torch.Tensor) -> float:
        """``counts (S,)``: the target counts (> 0) of a batch's samples -> the batch's total weight."""
        raise NotImplementedError


WEIGHTINGS: Registry[Weighting] = Registry("loss weighting")


@WEIGHTINGS.register("token")
class TokenWeighting(Weighting):
    per_token = True

    def divisor(self, n: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(n)

    def total(self, counts: torch.Tensor) -> float:
        return float(counts.sum())


@WEIGHTINGS.register("sample")
class SampleWeighting(Weighting):
    def divisor(self, n: torch.Tensor) -> torch.Tensor:
        return n

    def total(self, counts: torch.Tensor) -> float:
        return float(counts.numel())


@WEIGHTINGS.register("square")
class SquareWeighting(Weighting):
    def divisor(self, n: torch.Tensor) -> torch.Tensor:
        return n.sqrt()

    def total(self, counts: torch.Tensor) -> float:
        return float(counts.sqrt().sum())



def weighting_of(weighting: str | Weighting) -> Weighting:
    """A registered weighting by name (``ValueError`` naming the known ones), or ``weighting`` itself."""
    if isinstance(weighting, Weighting):
        return weighting
    if weighting not in WEIGHTINGS:
        raise ValueError(f"loss weighting {weighting!r}; expected one of {WEIGHTINGS.names()}")
    return WEIGHTINGS.get(weighting)()


def mask_segment_starts(labels: torch.Tensor, segment_ids: torch.Tensor | None) -> torch.Tensor:
    """``labels (B, L)`` with the first token of every packed segment ignored (it is not a target of the previous
    segment); unchanged without ``segment_ids``."""
    return labels if segment_ids is None else labels.masked_fill(segment_starts(segment_ids), IGNORE_INDEX)


def shifted_targets(labels: torch.Tensor, segment_ids: torch.Tensor | None = None) \
        -> tuple[torch.Tensor, torch.Tensor]:
    """``(valid (B, L-1) bool, groups (B, L-1) long)``: which shifted labels are targets (segment starts excluded)
    and which sample of its row (1 for a plain row, the segment id in a packed row) each belongs to."""
    labels = mask_segment_starts(labels, segment_ids)
    groups = torch.ones_like(labels) if segment_ids is None else segment_ids
    return labels[:, 1:] != IGNORE_INDEX, groups[:, 1:].long()


def sample_counts(valid: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``valid``/``groups (B, T)`` -> ``(counts (B * G,) float, index (B * T,))``: the target count of every
    (row, group) slot and each token's slot (``G`` = the largest group id + 1)."""
    B = groups.shape[0]
    n_groups = int(groups.max()) + 1 if groups.numel() else 1
    flat = (groups + torch.arange(B, device=groups.device)[:, None] * n_groups).reshape(-1)
    counts = torch.zeros(B * n_groups, device=valid.device).index_add_(0, flat, valid.reshape(-1).float())
    return counts, flat


def batch_weight(labels: torch.Tensor, weighting: str | Weighting,
                 segment_ids: torch.Tensor | None = None) -> float:
    """The total weight ``lm_loss`` gives a batch's targets: the number of target tokens (``token``), of samples
    with a target (``sample``) or the sum of their square roots (``square``)."""
    counts, _ = sample_counts(*shifted_targets(labels, segment_ids))
    return weighting_of(weighting).total(counts[counts > 0])


def token_weights(valid: torch.Tensor, groups: torch.Tensor, weighting: Weighting) -> torch.Tensor:
    """``valid``/``groups (B, T)`` (``shifted_targets``) -> ``(B, T)`` float weight of every target (0 elsewhere):
    ``1 / divisor(n)`` of its sample's target count ``n``."""
    valid = valid.float()
    if weighting.per_token:
        return valid
    counts, flat = sample_counts(valid, groups)
    return valid / weighting.divisor(counts[flat].view(valid.shape).clamp_min(1.0))


def _weighted_ce(hidden: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                 head: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``sum(weight * cross_entropy(head(hidden), target))`` for ``hidden (N, D)``, in fp32 like ``lm_loss``."""
    return (F.cross_entropy(head(hidden).float(), target, reduction="none") * weight).sum()


def label_only_lm_loss(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], labels: torch.Tensor,
                       weighting: str | Weighting = "token", segment_ids: torch.Tensor | None = None,
                       num_items_in_batch: float | torch.Tensor | None = None,
                       chunk_size: int = 4096) -> torch.Tensor:
    """``lm_loss(head(hidden), labels, ...)`` computing the LM head and the cross-entropy only at the positions
    that have a target, ``chunk_size`` of them at a time.

    ``hidden (B, L, D)``: the LM's last hidden states (after its final norm); ``head``: ``(N, D) -> (N, V)`` (the
    output embeddings); ``labels (B, L)`` (-100 ignored). Packed rows (``segment_ids``): segment starts are masked
    here (no need to call ``mask_segment_starts`` first). The result equals ``lm_loss`` of the full logits up to
    float summation order; ``token`` weighting divides the summed loss by ``num_items_in_batch`` when given (the
    step's target count, as transformers' loss does), else by the batch's target count. With several chunks and
    gradients on, each chunk's logits are recomputed in the backward pass, so only one ``(chunk_size, V)`` block
    of logits is ever alive. Image and prompt positions never reach the vocabulary projection.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    w = weighting_of(weighting)
    valid, groups = shifted_targets(labels, segment_ids)
    weights = token_weights(valid, groups, w)
    target = labels[:, 1:][valid]
    picked, picked_w = hidden[:, :-1][valid], weights[valid]
    recompute = torch.is_grad_enabled() and picked.shape[0] > chunk_size
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, max(picked.shape[0], 1), chunk_size):  # no target: one empty chunk keeps the graph
        part = slice(start, start + chunk_size)
        args = (picked[part], target[part], picked_w[part], head)
        total = total + (checkpoint(_weighted_ce, *args, use_reentrant=False) if recompute else _weighted_ce(*args))
    if w.per_token and num_items_in_batch is not None:
        return total / num_items_in_batch
    return total / weights.sum().clamp_min(1.0 if w.per_token else 1e-12)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, weighting: str | Weighting = "token",
            segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``logits (B, L, V)``, ``labels (B, L)`` (-100 ignored) -> scalar loss of predicting ``labels[:, t+1]`` at ``t``.

    With ``segment_ids`` (packed rows) a "sample" is a segment, not a row. ``labels`` are used as given: mask the
    segment starts first (``mask_segment_starts``).
    """
    w = weighting_of(weighting)
    target = labels[:, 1:]
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                         ignore_index=IGNORE_INDEX, reduction="none").view(target.shape)
    valid = target != IGNORE_INDEX
    groups = (segment_ids[:, 1:] if segment_ids is not None else torch.ones_like(target)).long()
    weights = token_weights(valid, groups, w)
    return (ce * weights).sum() / weights.sum().clamp_min(1.0 if w.per_token else 1e-12)
