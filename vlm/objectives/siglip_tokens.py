"""``siglip_tokens``: SigLIP alignment with late interaction, so that each image *token* learns what the text names.

``siglip`` compares the mean-pooled image with the mean text embedding: the image as a whole learns what its caption
says. When the text names a small part of the image (a two-digit number among a few others on a 96 px image, one
object of many), the mean over all image tokens dilutes it, and the tokens that show it are what the LLM will read.
Here (FILIP-style, Yao et al., 2021, "FILIP: Fine-grained Interactive Language-Image Pre-Training") the similarity of
an image and a text is, for each text token, the cosine similarity of its best-matching image token, averaged over
the text's tokens; the sigmoid loss over the micro-batch's image-text pairs is SigLIP's (``vlm.objectives.siglip``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlm.objectives.registry import OBJECTIVES
from vlm.objectives.siglip import SigLIP


@OBJECTIVES.register("siglip_tokens")
class SigLIPTokens(SigLIP):
    """SigLIP's loss on token-level (late-interaction) similarities; the options are ``siglip``'s."""

    def similarity(self, model: nn.Module, pixel_values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``(B_images, B_texts)``: ``mean_l max_t <img_t, txt_l>`` over the text's labelled tokens ``l`` and the
        image's tokens ``t`` (both projected to ``dim`` and L2-normalized)."""
        mask = self.check_texts(labels).to(self.image_proj.weight.dtype)                   # (B, L)
        feats = model.encoder(pixel_values).to(self.image_proj.weight.dtype)              # (B, T, C)
        zi = F.normalize(self.image_proj(feats), dim=-1)                                   # (B, T, dim)
        zt = F.normalize(self.text_embed(labels.clamp(min=0)), dim=-1)                    # (B, L, dim)
        best = torch.einsum("itd,jld->ijtl", zi, zt).amax(dim=2)                          # (B_i, B_t, L)
        return (best * mask[None]).sum(-1) / mask.sum(-1)[None]
