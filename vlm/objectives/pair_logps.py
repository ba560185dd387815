"""Log-probabilities of both answers of preference pairs, in one forward per pair (or, to compare, two).

A pair row (``vlm.data.preference``) is ``prompt + chosen + rejected`` with ``part (B, L)``: 1 prompt, 2 chosen,
3 rejected, 0 padding. ``shared_logps`` runs the row once: the images are encoded once and the prompt is computed
once; a 4D mask keeps causal attention except from rejected tokens to chosen ones, and the rejected tokens' positions
continue from the prompt's end (the row's positions minus the chosen answer's length), so each answer sees exactly
what it would see alone. The rejected answer's first token is predicted from the prompt's last hidden state. It is
the packing machinery's segment isolation (``vlm.llm.masks``) with a shared prefix: the two answers are two
segments that both attend to the prompt.

``separate_logps`` is the naive form: prompt + chosen and prompt + rejected as two sequences (a ``2B`` batch, the
images encoded twice). Both return ``AnswerLogps``: per pair, the summed log-probs (nats) of each answer's target
tokens and their counts. Only the target positions are projected onto the vocabulary (``chunk`` at a time).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from vlm.labels import IGNORE_INDEX

PROMPT, CHOSEN, REJECTED = 1, 2, 3
MEDIA = ("pixel_values", "image_grid_thw")


@dataclass
class AnswerLogps:
    """Per pair ``(B,)``: summed target log-probs of the chosen / rejected answer and their target counts."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    def averaged(self) -> "AnswerLogps":
        """Per-token means (IPO's length normalization)."""
        return AnswerLogps(self.chosen / self.chosen_tokens.clamp(min=1), self.rejected / self.rejected_tokens.clamp(min=1),
                           self.chosen_tokens, self.rejected_tokens)


def pair_mask(part: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """``part (B, L)`` -> the 4D mask ``(B, 1, L, L)`` of a shared-prompt row: causal, padding keys masked, rejected
    queries never see chosen keys (padding queries see themselves: no fully masked row). Boolean for SDPA, additive
    (0 / ``finfo.min``) for eager attention."""
    if attn_implementation.startswith("flash"):
        raise ValueError("objective 'dpo' with shared_prompt=true needs a 4D attention mask (attn_implementation sdpa "
                         "or eager); with flash attention set stage.<name>.objective.shared_prompt=false")
    L = part.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=part.device).tril()
    eye = torch.eye(L, dtype=torch.bool, device=part.device)
    crossed = (part[:, :, None] == REJECTED) & (part[:, None, :] == CHOSEN)
    allowed = ((causal & (part[:, None, :] > 0) & ~crossed) | eye)[:, None]
    if attn_implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=part.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def target_logps(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, source: torch.Tensor,
                 chunk: int = 4096) -> torch.Tensor:
    """``(B, L)`` log-prob of ``labels`` at each target position (0 elsewhere), predicted from the hidden state at
    ``source (B, L)`` (``hidden (B, L, D)``; ``head``: ``(N, D) -> (N, V)``); float32 or wider."""
    dtype = torch.promote_types(hidden.dtype, torch.float32)  # float32 at least (bf16 / fp16 hidden states)
    out = torch.zeros(labels.shape, dtype=dtype, device=labels.device)
    b, t = (labels != IGNORE_INDEX).nonzero(as_tuple=True)
    for s in range(0, len(b), chunk):
        bb, tt = b[s:s + chunk], t[s:s + chunk]
        logits = head(hidden[bb, source[bb, tt]]).to(dtype)
        lp = torch.log_softmax(logits, -1).gather(1, labels[bb, tt][:, None]).squeeze(1)
        out = out.index_put((bb, tt), lp)
    return out


def _sums(lp: torch.Tensor, labels: torch.Tensor, part: torch.Tensor) -> AnswerLogps:
    target = labels != IGNORE_INDEX
    c, r = target & (part == CHOSEN), target & (part == REJECTED)
    return AnswerLogps((lp * c).sum(1), (lp * r).sum(1), c.sum(1), r.sum(1))


def _hidden(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """The LM's last hidden states of ``inputs`` (``lm_inputs``' keys), in the connector's fusion context."""
    return model.llm.hidden_states(**inputs)


def shared_logps(model: nn.Module, batch: dict[str, Any], chunk: int = 4096) -> AnswerLogps:
    """One forward of the pair rows (``input_ids``/``labels``/``part``/``attention_mask (B, L)``, the prompts'
    images); see the module docstring."""
    input_ids, labels, part = batch["input_ids"], batch["labels"], batch["part"]
    media = {k: batch.get(k) for k in MEDIA}
    lm = model.lm_inputs(input_ids, media["pixel_values"], batch.get("attention_mask"), None, None,
                         media["image_grid_thw"])
    B, L = input_ids.shape
    pos = lm["position_ids"]
    if pos is None:
        pos = torch.arange(L, device=input_ids.device).expand(B, L)
    n_chosen = (part == CHOSEN).sum(1, keepdim=True)
    lm["position_ids"] = pos - torch.where(part == REJECTED, n_chosen, 0).to(pos.dtype)  # (B, L) or (k, B, L)
    lm["attention_mask"] = pair_mask(part, model.llm.attn_implementation, lm["inputs_embeds"].dtype)
    with model.fusion(input_ids, media["pixel_values"]):
        hidden = _hidden(model, lm)
    source = torch.arange(L, device=input_ids.device).expand(B, L) - 1
    first_rejected = (part == REJECTED) & (torch.nn.functional.pad(part, (1, 0))[:, :-1] != REJECTED)
    prompt_end = (part == PROMPT).sum(1, keepdim=True) - 1
    source = torch.where(first_rejected, prompt_end, source).clamp(min=0)
    return _sums(target_logps(hidden, model.output_head, labels, source, chunk), labels, part)


def split_rows(batch: dict[str, Any], pad_token_id: int) -> dict[str, Any]:
    """Pair rows -> the ``2B`` batch ``[prompt + chosen; prompt + rejected]`` (right padded), images repeated."""
    part = batch["part"]
    ids, labels, parts = [], [], []
    for keep in (CHOSEN, REJECTED):
        for b in range(part.shape[0]):
            m = (part[b] == PROMPT) | (part[b] == keep)
            ids.append(batch["input_ids"][b][m])
            labels.append(batch["labels"][b][m])
            parts.append(part[b][m])
    out = {"input_ids": pad_sequence(ids, batch_first=True, padding_value=pad_token_id),
           "labels": pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX),
           "part": pad_sequence(parts, batch_first=True, padding_value=0)}
    out["attention_mask"] = (out["part"] > 0).long()
    for k in MEDIA:
        if batch.get(k) is not None:
            out[k] = torch.cat([batch[k], batch[k]])
    return out


def separate_logps(model: nn.Module, batch: dict[str, Any], pad_token_id: int = 0, chunk: int = 4096) -> AnswerLogps:
    """The naive form: two sequences per pair in one ``2B`` batch (images and prompt computed twice)."""
    two = split_rows(batch, pad_token_id)
    lm = model.lm_inputs(two["input_ids"], two.get("pixel_values"), two["attention_mask"], None, None,
                         two.get("image_grid_thw"))
    with model.fusion(two["input_ids"], two.get("pixel_values")):
        hidden = _hidden(model, lm)
    B2, L = two["input_ids"].shape
    source = (torch.arange(L, device=hidden.device).expand(B2, L) - 1).clamp(min=0)
    lp = target_logps(hidden, model.output_head, two["labels"], source, chunk)
    sums = _sums(lp, two["labels"], two["part"])
    B = B2 // 2
    return AnswerLogps(sums.chosen[:B], sums.rejected[B:], sums.chosen_tokens[:B], sums.rejected_tokens[B:])
