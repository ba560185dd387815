"""The bench models: ours built from configs, and transformers' LLaVA on identical weights (``vlm.interop.to_hf``).

``full``: a CLIP-style tower of 6 layers x 384 at 224 px / 16 (196 patch tokens, CLS dropped), a 2-layer MLP
connector and a Llama-style LLM of 6 layers x 512 with a 32k vocabulary. ``quick``: the same shapes scaled down to
seconds (what the tests run).
"""
from __future__ import annotations

import tempfile
import warnings
from typing import Any

import torch

SIZES: dict[str, dict[str, Any]] = {
    "full": {"encoder": {"name": "clip", "image_size": 224, "patch_size": 16, "hidden_size": 384, "num_layers": 6,
                         "num_heads": 6, "intermediate_size": 1536, "select": "patch"},
             "llm": {"model_type": "llama", "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 6,
                     "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": 32000,
                     "max_position_embeddings": 2048},
             "batch": 8, "text_tokens": 128, "answer_tokens": 64},
    "quick": {"encoder": {"name": "clip", "image_size": 32, "patch_size": 8, "hidden_size": 32, "num_layers": 2,
                          "num_heads": 4, "intermediate_size": 64, "select": "patch"},
              "llm": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                      "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 512,
                      "max_position_embeddings": 256},
              "batch": 2, "text_tokens": 16, "answer_tokens": 8},
    # for a GPU (``--size gpu_1b --device cuda --dtype bfloat16``): ~0.3B tower + ~1B LLM; not measured here
    "gpu_1b": {"encoder": {"name": "clip", "image_size": 336, "patch_size": 14, "hidden_size": 1024,
                           "num_layers": 24, "num_heads": 16, "intermediate_size": 4096, "select": "patch"},
               "llm": {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 16,
                       "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
                       "max_position_embeddings": 4096},
               "batch": 16, "text_tokens": 448, "answer_tokens": 224},
}


def size(quick: bool, name: str | None = None) -> dict[str, Any]:
    """The ``SIZES`` entry: ``name`` when given, else ``quick`` or ``full``."""
    if name is not None:
        if name not in SIZES:
            raise ValueError(f"--size {name!r}; expected one of {sorted(SIZES)}")
        return SIZES[name]
    return SIZES["quick" if quick else "full"]


def model_config(spec: dict[str, Any], attn_implementation: str = "sdpa") -> dict[str, Any]:
    """A ``vlm.build`` config for a ``SIZES`` entry."""
    return {"encoder": dict(spec["encoder"]), "connector": {"name": "mlp", "depth": 2},
            "llm": {"name": "hf_causal_lm", "config": dict(spec["llm"]), "attn_implementation": attn_implementation}}


def build_pair(spec: dict[str, Any], device: torch.device, dtype: torch.dtype = torch.float32,
               seed: int = 0) -> tuple[Any, Any]:
    """``(ours, theirs)``: a random ``VLM`` and transformers' ``LlavaForConditionalGeneration`` loaded from its
    ``to_hf`` export, both on ``device`` in ``dtype``, in training mode."""
    import vlm
    from transformers import LlavaForConditionalGeneration

    from vlm.interop import to_hf

    torch.manual_seed(seed)
    ours = vlm.build(model_config(spec))
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        to_hf(ours, tmp)
        theirs = LlavaForConditionalGeneration.from_pretrained(tmp, dtype=torch.float32,
                                                               attn_implementation="sdpa")
    return ours.to(device, dtype).train(), theirs.to(device, dtype).train()


def batch(model: Any, spec: dict[str, Any], device: torch.device, dtype: torch.dtype = torch.float32,
          seed: int = 0, rows: int | None = None) -> dict[str, torch.Tensor]:
    """``rows`` (default ``spec["batch"]``) rows of one image's placeholders then ``text_tokens`` random ids, the
    last ``answer_tokens`` of them labelled (the answer), plus random pixels."""
    g = torch.Generator().manual_seed(seed)
    rows = rows or spec["batch"]
    k = model.num_image_tokens()
    text = torch.randint(3, spec["llm"]["vocab_size"], (rows, spec["text_tokens"]), generator=g)
    ids = torch.cat([torch.full((rows, k), model.image_token_id), text], dim=1)
    labels = torch.full_like(ids, -100)
    labels[:, -spec["answer_tokens"]:] = ids[:, -spec["answer_tokens"]:]
    size = spec["encoder"]["image_size"]
    pixels = torch.randn(rows, 3, size, size, generator=g)
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": pixels.to(device, dtype)}
