"""``readout``: train the vision tower to answer the data's questions directly, spelling each answer byte by byte.

For a tower trained from scratch on question/answer data whose answers name a small part of the image (text drawn in
it, a value, a position): a caption-style contrastive loss (``siglip``) pools the whole image and never has to
recognise the few pixels that hold the answer, and the gradient through an untrained decoder (SFT) is too weak to
teach the tower that (docs/recipes.md, "Where reading stalls"). This objective gives the tower a short, direct path
from the question to the pixels:

- the question: a bag-of-tokens embedding of the prompt (the tokens without a label, image and padding excluded),
  ``(B, dim)``;
- ``heads`` attention read-outs over the tower's tokens ``(B, T, C)`` (plus a learned position per token), queried
  by the question: ``(B, dim)``;
- an MLP from ``[read-out, question]`` to ``max_chars`` positions x 257 classes: the answer's UTF-8 bytes (the target
  tokens decoded by the model's tokenizer, special tokens skipped), then an end marker; longer answers are cut.

Targets are bytes, not the LLM's tokens, so they are compositional whatever the tokenizer: a two-digit number is
two digit classes (as ten-way classes per digit this taught the tiny stem to read where 90 whole-number classes
did not move in 600 steps; docs/recipes.md). The idea is that of training a tower by captioning with a light decoder
(CapPa: Tschannen et al., 2023, "Image Captioners Are Scalable Vision Learners Too"), made shallower and conditioned
on the question. The read-out exists for the stage only and is never exported; connector and LLM are unused.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlm.labels import IGNORE_INDEX
from vlm.objectives import OBJECTIVES
from vlm.objectives.base import Objective, ObjectiveOutput

END = 256  # the class after the last byte


@OBJECTIVES.register("readout")
class ReadOut(Objective):
    """Question-conditioned attention read-out of the tower's tokens, trained to spell the answer.

    ``dim``: width of the question embedding and of each read-out; ``heads``: read-outs (each its own query);
    ``hidden``: width of the MLP; ``max_chars``: answer bytes predicted (the end marker included). ``model``: the VLM
    (its encoder's width and token count at its ``image_size`` and its tokenizer, which decodes the targets).

    The loss is the cross-entropy over each sample's answer bytes and its end marker, averaged per sample, then over
    the micro-batch (a two-byte answer weighs as much as a forty-byte one); ``metrics["exact"]``: the share of samples whose whole answer (up to ``max_chars``) is
    spelled right. Raises ``ValueError`` without a tokenizer, for a batch without exactly one image per sample or
    with a sample that has no answer.
    """

    supports_packing = False
    shardable = False

    def __init__(self, model: nn.Module, dim: int = 256, heads: int = 4, hidden: int = 512,
                 max_chars: int = 48) -> None:
        super().__init__()
        if getattr(model, "tokenizer", None) is None:
            raise ValueError("objective 'readout' decodes the answers with the model's tokenizer; the model has none")
        enc = model.encoder
        self.max_chars, self.heads = int(max_chars), int(heads)
        self.num_tokens = enc.num_tokens()
        self.question = nn.Embedding(model.llm.vocab_size, dim)
        self.position = nn.Parameter(torch.zeros(self.num_tokens, enc.hidden_size))
        self.norm = nn.LayerNorm(enc.hidden_size)
        self.key = nn.Linear(enc.hidden_size, dim)
        self.value = nn.Linear(enc.hidden_size, dim)
        self.query = nn.Linear(dim, heads * dim)
        self.mlp = nn.Sequential(nn.Linear(heads * dim + dim, hidden), nn.GELU(), nn.Linear(hidden, max_chars * 257))

    def targets(self, tokenizer: Any, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``(B, max_chars)`` byte classes of each sample's answer then ``END``, ``IGNORE_INDEX`` after it."""
        out = torch.full((len(labels), self.max_chars), IGNORE_INDEX, dtype=torch.long)
        for b, (ids, lab) in enumerate(zip(input_ids.tolist(), labels.tolist())):
            answer = [i for i, y in zip(ids, lab) if y != IGNORE_INDEX]
            if not answer:
                raise ValueError(f"objective 'readout': sample {b} of the batch has no answer (every label is "
                                 f"{IGNORE_INDEX}); expected question/answer data (a template with an assistant turn)")
            text = tokenizer.decode(answer, skip_special_tokens=True).strip().encode("utf-8")
            row = list(text[: self.max_chars - 1]) + [END]
            out[b, : len(row)] = torch.tensor(row)
        return out.to(labels.device)

    def embed_question(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None,
                       image_token_id: int) -> torch.Tensor:
        """``(B, dim)``: mean embedding of the prompt's tokens (no label, not an image placeholder, not padding)."""
        mask = (labels == IGNORE_INDEX) & (input_ids != image_token_id)
        if attention_mask is not None:
            mask &= attention_mask.bool()
        emb = self.question(input_ids) * mask[..., None]
        return emb.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)

    def forward(self, model: nn.Module, batch: dict[str, Any], weight: float | None = None,
                total: float | None = None) -> ObjectiveOutput:
        """``batch``: ``input_ids``/``labels (B, L)`` (the chat template's prompt and answer), ``pixel_values
        (B, 3, H, W)``: one image per sample. ``logits`` of the output: ``(B, max_chars, 257)``."""
        input_ids, labels, pixel_values = self.image_text_batch(batch, "the answers")
        feats = model.encoder(pixel_values)                                          # (B, T, C)
        if feats.shape[1] != self.num_tokens:
            raise ValueError(f"objective 'readout': the encoder gave {feats.shape[1]} tokens per image; its "
                             f"position table has {self.num_tokens} (images must be the encoder's image_size)")
        feats = self.norm(feats.to(self.key.weight.dtype) + self.position)
        question = self.embed_question(input_ids, labels, batch.get("attention_mask"), model.image_token_id)
        B, dim = question.shape
        q = self.query(question).view(B, self.heads, dim)                          # (B, h, d)
        att = torch.einsum("bhd,btd->bht", q, self.key(feats)) / dim ** 0.5
        read = torch.einsum("bht,btd->bhd", att.softmax(-1), self.value(feats))   # (B, h, d)
        logits = self.mlp(torch.cat([read.flatten(1), question], dim=1)).view(B, self.max_chars, 257)
        target = self.targets(model.tokenizer, input_ids, labels)
        valid = target != IGNORE_INDEX
        per_byte = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX,
                                   reduction="none").view_as(target)
        loss = ((per_byte * valid).sum(1) / valid.sum(1)).mean()   # every sample weighs the same
        with torch.no_grad():
            exact = ((logits.argmax(-1) == target) | ~valid).all(1).float().mean().item()
        return ObjectiveOutput(loss=self.share(loss, weight, total), metrics={"exact": exact}, logits=logits)
