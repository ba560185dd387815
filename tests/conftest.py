"""Shared tiny configs: every model in the test-suite is built from these, random init, no network."""
from __future__ import annotations

import copy
import os
import sys
import types
from typing import Any

import pytest
import torch

# ``from tests.conftest import ...`` must read this folder even where a dependency installed a top-level ``tests``
# package (lmms-eval's dependency latex2sympy2 does), which would otherwise win over this folder (no __init__.py).
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in list(getattr(sys.modules.get("tests"), "__path__", [])):
    sys.modules["tests"] = types.ModuleType("tests")
    sys.modules["tests"].__path__ = [_HERE]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TINY_TEXT = {
    "llama": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128},
    "qwen2": {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128, "tie_word_embeddings": True},
    "qwen3": {"model_type": "qwen3", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 128},
    "gemma": {"model_type": "gemma", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 8, "vocab_size": 128},
    "gpt2": {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 128, "vocab_size": 128},
}

TINY_VISION = {
    "clip": {"name": "clip", "image_size": 32, "patch_size": 8, "hidden_size": 32, "num_layers": 2, "num_heads": 4,
             "intermediate_size": 64},
    "siglip": {"name": "siglip", "image_size": 32, "patch_size": 8, "hidden_size": 32, "num_layers": 2,
               "num_heads": 4, "intermediate_size": 64},
    "internvit": {"name": "internvit", "image_size": 32, "patch_size": 8, "hidden_size": 32, "num_layers": 2,
                  "num_heads": 4, "intermediate_size": 64},
}


def tiny_cfg(encoder: str = "clip", text: str = "llama", connector: dict | None = None, **enc_kw) -> dict:
    """A ``vlm.build`` config of a tiny random model."""
    enc = {**copy.deepcopy(TINY_VISION[encoder]), **enc_kw}
    return {"encoder": enc, "connector": connector or {"name": "mlp", "depth": 2},
            "llm": {"name": "hf_causal_lm", "config": copy.deepcopy(TINY_TEXT[text])}}


def image_batch_ids(model, n_images_per_row: list[int], length: int = 48, seed: int = 0) -> torch.Tensor:
    """Random text ids with each row's images' placeholders expanded at distinct places."""
    g = torch.Generator().manual_seed(seed)
    K = model.num_image_tokens()
    ids = torch.randint(0, 100, (len(n_images_per_row), length), generator=g)
    for r, n in enumerate(n_images_per_row):
        for i in range(n):
            start = 2 + i * (K + 3)
            ids[r, start:start + K] = model.image_token_id
    return ids


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A folder of real image files (``data_fixtures.write_images``) shared by a test module."""
    from data_fixtures import write_images

    return write_images(tmp_path_factory.mktemp("imgs"))


@pytest.fixture(scope="module")
def tok():
    """The file-free byte-level tokenizer (a module may override it)."""
    from vlm.data.tokenizer import byte_tokenizer

    return byte_tokenizer()


def chat_model(seed: int = 0):
    """A tiny random clip + llama ``VLM`` with the byte tokenizer, serving the ``chatml`` template (its tokenizer
    carries chatml's Jinja, so chat's default template renders it), in eval mode."""
    import vlm
    from vlm.data.tokenizer import byte_tokenizer

    torch.manual_seed(seed)
    model = vlm.build(tiny_cfg("clip", "llama"), tokenizer=byte_tokenizer("chatml"))
    model.set_template("chatml")
    return model.eval()


def picture(seed: int, size: tuple[int, int]) -> Any:
    """A random RGB picture of ``size`` = (width, height) pixels, the same for the same ``seed``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def user(n_images: int, text: str) -> list[dict]:
    """A transformers chat-template conversation: one user turn with ``n_images`` images, then ``text``."""
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]
