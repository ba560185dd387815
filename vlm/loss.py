"""Next-token loss with a choice of how samples of different answer lengths are weighted.

- ``token`` (LLaVA, transformers' default): every target token counts the same, so a 30-token grounding answer
  outweighs a 1-token VQA answer 30 to 1.
- ``sample``: each sample's tokens share one unit of weight (``1 / n_i``): every sample counts the same.
- ``square`` (InternVL 2.5's "square averaging"): ``1 / sqrt(n_i)``, between the two.

The result is normalized by the total weight of the (micro-)batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vlm.labels import IGNORE_INDEX
LOSS_WEIGHTINGS = ("token", "sample", "square")


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, weighting: str = "token",
            segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``logits (B, L, V)``, ``labels (B, L)`` (-100 ignored) -> scalar loss of predicting ``labels[:, t+1]`` at ``t``.

    With ``segment_ids`` (packed rows) a "sample" is a segment, not a row.
    """
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"loss weighting {weighting!r}; expected one of {LOSS_WEIGHTINGS}")
    target = labels[:, 1:]
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                         ignore_index=IGNORE_INDEX, reduction="none").view(target.shape)
    valid = (target != IGNORE_INDEX).float()
    if weighting == "token":
        return (ce * valid).sum() / valid.sum().clamp_min(1.0)
    groups = (segment_ids[:, 1:] if segment_ids is not None else torch.ones_like(target)).long()
    B, n_groups = target.shape[0], int(groups.max()) + 1
    flat = (groups + torch.arange(B, device=groups.device)[:, None] * n_groups).reshape(-1)
    counts = torch.zeros(B * n_groups, device=ce.device).index_add_(0, flat, valid.reshape(-1))
    n = counts[flat].view(target.shape).clamp_min(1.0)
    weights = valid / (n if weighting == "sample" else n.sqrt())
    return (ce * weights).sum() / weights.sum().clamp_min(1e-12)
