"""Exact interop with other model formats.

``from_hf(path)`` imports a local transformers ``LlavaForConditionalGeneration`` directory as a ``vlm.VLM``;
``to_hf(model, path)`` exports a ``VLM`` (CLIP/SigLIP tower + ``mlp`` depth-2 connector + transformers causal LM) to a
directory that ``LlavaForConditionalGeneration.from_pretrained`` (and LLaVA-serving engines) load. Both directions
keep logits identical for identical ``input_ids`` / ``pixel_values``. CLI: ``python -m vlm.convert SRC DST``.
"""
from vlm.interop.llava import from_hf, to_hf

__all__ = ["from_hf", "to_hf"]
