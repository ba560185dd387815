"""The correspondence tables between transformers LLaVA and vlm components (data, not branches)."""
from __future__ import annotations

# weight files a transformers directory may hold, in the order from_pretrained prefers them
from vlm.pretrained import WEIGHT_FILES  # noqa: F401  (re-exported)

# LLaVA ``vision_config.model_type`` -> our encoder registry name (each a transformers vision model we wrap as-is)
VISION_MODEL_TYPES: dict[str, str] = {
    "clip_vision_model": "clip",
    "siglip_vision_model": "siglip",
}
ENCODER_MODEL_TYPES: dict[str, str] = {v: k for k, v in VISION_MODEL_TYPES.items()}

# ``projector_hidden_act`` (a transformers ACT2FN name) -> our ``mlp`` connector ``act``. The tanh-approximation
# variants are the same function written differently (they agree to float rounding).
ACT_FROM_HF: dict[str, str] = {
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}
# our ``act`` -> the ACT2FN name written on export (the exact PyTorch op)
ACT_TO_HF: dict[str, str] = {
    "gelu": "gelu",
    "gelu_tanh": "gelu_pytorch_tanh",
    "relu": "relu",
    "silu": "silu",
}

# (``vision_feature_select_strategy``, tower has a CLS token) -> our encoder ``select``.
# LLaVA's "default" always drops token 0: the CLS token on CLIP, but a real patch on SigLIP (-> ``llava_default``).
# "full" keeps every token: ``all`` on CLIP; on SigLIP that is exactly our ``patch`` (no CLS to drop).
SELECT_FROM_LLAVA: dict[tuple[str, bool], str] = {
    ("default", True): "patch",
    ("default", False): "llava_default",
    ("full", True): "all",
    ("full", False): "patch",
}
# Export: whether our ``select`` drops token 0 (``VisionEncoder.drops_first``) -> LLaVA strategy.
SELECT_TO_LLAVA: dict[bool, str] = {True: "default", False: "full"}

# Vision-tower submodules LLaVA never runs (it reads hidden states): a checkpoint may omit them, and import always
# leaves them out of our encoder. Prefix inside the tower -> the vision_config change that removes the module.
UNUSED_VISION_MODULES: dict[str, dict[str, object]] = {
    "head.": {"vision_use_head": False},  # SigLIP's attention-pooling head
}
