"""Language-model backbones: ``build(cfg)`` with ``cfg = {"name": "hf_causal_lm", ...}``."""
from typing import Any

from vlm.llm.registry import LLMS
from vlm.llm import hf_causal_lm, mrope  # noqa: F401  (registration)
from vlm.llm.hf_causal_lm import HFCausalLM


def build(cfg: Any) -> HFCausalLM:
    return LLMS.build(cfg)


__all__ = ["LLMS", "HFCausalLM", "build"]
