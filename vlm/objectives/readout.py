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
  tokens decoded by the model's tokenizer, special tokens skipped), then an end marker; longer answers are cut;
- with ``regions`` (default), every Qwen-VL ``<ref>text</ref><box>(x1,y1),(x2,y2)</box>`` in an answer also trains
  a region read-out: the token map is sampled bilinearly at a ``region_grid`` of points spread over the box
  (``[0, 1000)`` coordinates of the processed image; RoIAlign-style, Mask R-CNN), the samples are concatenated in
  row-major order (so left-to-right order survives) and a second MLP spells ``text``. The box says where to look, so
  the tower learns what the text there is without first having to learn where it is (region-level supervision
  from grounding data, as in GLIP / LocCa). The loss is the mean of the two terms.

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

from vlm.data.boxes import parse as parse_boxes
from vlm.labels import IGNORE_INDEX
from vlm.objectives.base import Objective, ObjectiveOutput
from vlm.objectives.registry import OBJECTIVES

END = 256  # the class after the last byte


@OBJECTIVES.register("readout")
class ReadOut(Objective):
    """Question-conditioned attention read-out of the tower's tokens, trained to spell the answer.

    ``dim``: width of the question embedding and of each read-out; ``heads``: read-outs (each its own query);
    ``hidden``: width of the MLP; ``max_chars``: answer bytes predicted (the end marker included); ``regions``: also
    train the region read-out on ``<ref>``/``<box>`` answers (needs a tower without kept prefix tokens);
    ``region_grid``: ``(rows, columns)`` of points sampled in each box. ``model``: the VLM
    (its encoder's width and token count at its ``image_size`` and its tokenizer, which decodes the targets).

    The loss is the cross-entropy over each sample's answer bytes and its end marker, averaged per sample, then over
    the micro-batch (a two-byte answer weighs as much as a forty-byte one); ``metrics["exact"]``: the share of samples whose whole answer (up to ``max_chars``) is
    spelled right; ``metrics["region_exact"]`` the same for the region read-out's ref texts. Raises ``ValueError``
    for a size < 1, without a tokenizer, for a batch without exactly one image per sample or
    with a sample that has no answer.
    """

    supports_packing = False
    shardable = False
    images_per_sample = 1

    def __init__(self, model: nn.Module, dim: int = 256, heads: int = 4, hidden: int = 512,
                 max_chars: int = 48, regions: bool = True, region_grid: tuple[int, int] = (2, 4)) -> None:
        super().__init__()
        if getattr(model, "tokenizer", None) is None:
            raise ValueError("objective 'readout' decodes the answers with the model's tokenizer; the model has none")
        for key, value in {"dim": dim, "heads": heads, "hidden": hidden, "max_chars": max_chars}.items():
            if int(value) < 1:
                raise ValueError(f"objective 'readout': {key}={value}; expected an integer >= 1")
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
        self.grid = enc.grid()
        self.regions = bool(regions) and self.grid[0] * self.grid[1] == self.num_tokens  # no prefix tokens kept
        self.region_grid = (int(region_grid[0]), int(region_grid[1]))
        if self.regions:
            points = self.region_grid[0] * self.region_grid[1]
            self.region_mlp = nn.Sequential(nn.Linear(points * dim, hidden), nn.GELU(),
                                            nn.Linear(hidden, max_chars * 257))

    def spell(self, texts: list[str], device: torch.device) -> torch.Tensor:
        """``(N, max_chars)`` byte classes of ``texts`` then ``END``, ``IGNORE_INDEX`` after it (cut at
        ``max_chars - 1`` bytes)."""
        out = torch.full((len(texts), self.max_chars), IGNORE_INDEX, dtype=torch.long)
        for i, text in enumerate(texts):
            row = list(text.encode("utf-8")[: self.max_chars - 1]) + [END]
            out[i, : len(row)] = torch.tensor(row)
        return out.to(device)

    def region_features(self, values: torch.Tensor, index: list[int], boxes: list[tuple[int, int, int, int]]) \
            -> torch.Tensor:
        """``values (B, T, d)`` (row-major token map) sampled bilinearly at ``region_grid`` points evenly spread over
        each ``[0, 1000)`` box of image ``index[i]``: ``(N, gh * gw * d)``."""
        h, w = self.grid
        gh, gw = self.region_grid
        fmap = values[index].transpose(1, 2).reshape(len(index), -1, h, w)                  # (N, d, h, w)
        box = torch.tensor(boxes, dtype=values.dtype, device=values.device) / 500 - 1       # to [-1, 1]
        fy = (torch.arange(gh, dtype=values.dtype, device=values.device) + 0.5) / gh
        fx = (torch.arange(gw, dtype=values.dtype, device=values.device) + 0.5) / gw
        ys = box[:, 1, None] + (box[:, 3] - box[:, 1])[:, None] * fy                          # (N, gh)
        xs = box[:, 0, None] + (box[:, 2] - box[:, 0])[:, None] * fx                          # (N, gw)
        grid = torch.stack([xs[:, None, :].expand(-1, gh, -1), ys[:, :, None].expand(-1, -1, gw)], dim=-1)
        sampled = F.grid_sample(fmap, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return sampled.permute(0, 2, 3, 1).flatten(1)                                       # (N, gh*gw*d)

    def answers(self, tokenizer: Any, input_ids: torch.Tensor, labels: torch.Tensor) -> list[str]:
        """Each sample's answer: its labelled tokens decoded (special tokens skipped)."""
        out = []
        for b, (ids, target) in enumerate(zip(input_ids, labels != IGNORE_INDEX)):
            answer = ids[target].tolist()
            if not answer:
                raise ValueError(f"objective 'readout': sample {b} of the batch has no answer (every label is "
                                 f"{IGNORE_INDEX}); expected question/answer data (a template with an assistant turn)")
            out.append(tokenizer.decode(answer, skip_special_tokens=True).strip())
        return out

    def targets(self, tokenizer: Any, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``(B, max_chars)`` byte classes of each sample's answer then ``END``, ``IGNORE_INDEX`` after it."""
        return self.spell(self.answers(tokenizer, input_ids, labels), labels.device)

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
        input_ids, labels, pixel_values = self.image_text_batch(batch, "the answers", model)
        feats = model.encoder(pixel_values)                                          # (B, T, C)
        if feats.shape[1] != self.num_tokens:
            raise ValueError(f"objective 'readout': the encoder gave {feats.shape[1]} tokens per image; its "
                             f"position table has {self.num_tokens} (images must be the encoder's image_size)")
        feats = self.norm(feats.to(self.key.weight.dtype) + self.position)
        question = self.embed_question(input_ids, labels, batch.get("attention_mask"), model.image_token_id)
        B, dim = question.shape
        q = self.query(question).view(B, self.heads, dim)                          # (B, h, d)
        att = torch.einsum("bhd,btd->bht", q, self.key(feats)) / dim ** 0.5
        values = self.value(feats)                                                 # (B, T, d)
        read = torch.einsum("bht,btd->bhd", att.softmax(-1), values)               # (B, h, d)
        logits = self.mlp(torch.cat([read.flatten(1), question], dim=1)).view(B, self.max_chars, 257)
        texts = self.answers(model.tokenizer, input_ids, labels)
        target = self.spell(texts, labels.device)
        loss, exact = self.spelling_loss(logits, target)
        metrics = {"exact": exact}
        if self.regions:
            found = [(b, ref, box) for b, text in enumerate(texts)
                     for ref, box in parse_boxes(text, strict=False) if ref]
            if found:
                pooled = self.region_features(values, [b for b, _, _ in found], [box for _, _, box in found])
                region_logits = self.region_mlp(pooled).view(len(found), self.max_chars, 257)
                region_loss, metrics["region_exact"] = self.spelling_loss(
                    region_logits, self.spell([ref for _, ref, _ in found], labels.device))
                loss = (loss + region_loss) / 2
        return ObjectiveOutput(loss=self.share(loss, weight, total), metrics=metrics, logits=logits)

    @staticmethod
    def spelling_loss(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Per-sample mean cross-entropy over the target bytes (every sample weighs the same), and the share of
        samples spelled exactly."""
        valid = target != IGNORE_INDEX
        per_byte = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX,
                                   reduction="none").view_as(target)
        loss = ((per_byte * valid).sum(1) / valid.sum(1)).mean()
        with torch.no_grad():
            exact = ((logits.argmax(-1) == target) | ~valid).all(1).float().mean().item()
        return loss, exact
