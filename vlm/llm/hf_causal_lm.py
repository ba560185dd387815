"""``hf_causal_lm``: any transformers causal LM, with image features injected into its input embeddings.

No per-family subclass: the model's own ``get_input_embeddings`` embeds the ids, image features are scattered into
the image-placeholder positions, and the model is called with ``inputs_embeds``. A transformers text model with a
base model (``AutoModel``) but no causal-LM class (Qwen2-VL's ``qwen2_vl_text``, Qwen2.5-VL's ``qwen2_5_vl_text``)
becomes one through ``vlm.llm.base_lm.CausalLMFromBase`` (base model + ``lm_head``).
"""
from __future__ import annotations

import importlib.util
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from vlm.dtypes import resolve_dtype
from vlm.hf_config import check_config_keys, config_class_for
from vlm.llm.base_lm import CausalLMFromBase, causal_lm_kind, language_model_keys
from vlm.llm.keywords import accepted_keywords
from vlm.llm.registry import LLMS
from vlm.pretrained import FILE_KEYS, check_pretrained_dir
from vlm.recompute import enable_for_transformers

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
# transformers config attributes that change the logits after the output embeddings (Gemma 2's soft-capping,
# Cohere's scale): when one is set, the LM's own forward computes the logits and the label-only head is off
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale")


def check_attn_implementation(name: str) -> None:
    if name not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation={name!r}; expected one of {ATTN_IMPLEMENTATIONS}")
    if name == "flash_attention_2":
        if not torch.cuda.is_available():
            raise RuntimeError("attn_implementation='flash_attention_2' needs CUDA; use 'sdpa' on this machine")
        if importlib.util.find_spec("flash_attn") is None:
            raise RuntimeError("attn_implementation='flash_attention_2' needs the flash-attn package: "
                               "pip install -e '.[flash]'")


@LLMS.register("hf_causal_lm")
class HFCausalLM(nn.Module):
    """Wraps ``AutoModelForCausalLM`` in ``self.model``.

    Build from ``pretrained`` (a local directory) or ``config`` (a dict with ``model_type`` plus that family's config
    keys, random init). ``trust_remote_code`` stays off unless the user opts in.

    A ``config`` key the family's transformers config class does not accept (a typo such as ``num_hiden_layers``,
    which transformers would silently ignore) is a ``TypeError`` naming it and the closest accepted keys;
    ``strict_config=False`` skips that check for exotic keys. A ``pretrained`` directory's own ``config.json`` is
    trusted and not checked.
    """

    @staticmethod
    def check_options(config: dict[str, Any] | None = None, pretrained: str | None = None, strict_config: bool = True,
                      **_: Any) -> None:
        """Check a ``config`` dict's keys against its transformers config class without building the model (what
        ``vlm.train`` runs before anything is built). Raises ``TypeError`` / ``ValueError`` / ``KeyError``."""
        if config is not None and pretrained is None and strict_config:
            make_config(config, strict=True)

    #: the LoRA policies inject adapters into the wrapped transformers model (``self.model``)
    supports_lora = True

    def __init__(self, pretrained: str | None = None, config: dict[str, Any] | None = None,
                 attn_implementation: str = "sdpa", gradient_checkpointing: bool | str = False,
                 dtype: str | None = None, trust_remote_code: bool = False, strict_config: bool = True) -> None:
        super().__init__()
        check_attn_implementation(attn_implementation)
        if (pretrained is None) == (config is None):
            raise ValueError("hf_causal_lm needs exactly one of 'pretrained' (a local directory) or 'config' "
                             "(a dict with 'model_type')")
        torch_dtype = resolve_dtype(dtype)
        if pretrained is not None:
            path = check_pretrained_dir(pretrained, "hf_causal_lm")
            self.model = load_pretrained(str(path), attn_implementation=attn_implementation,
                                         dtype=torch_dtype or torch.float32, trust_remote_code=trust_remote_code)
        else:
            hf_config = make_config(config, strict=strict_config)
            if causal_lm_kind(hf_config, trust_remote_code) == "base":
                self.model = CausalLMFromBase._from_config(hf_config, attn_implementation=attn_implementation)
            else:
                self.model = AutoModelForCausalLM.from_config(
                    hf_config, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code)
            if torch_dtype is not None:
                self.model.to(torch_dtype)
        self.trust_remote_code = trust_remote_code
        self.strict_config = bool(strict_config)
        if gradient_checkpointing:
            self.enable_gradient_checkpointing(gradient_checkpointing)

    def enable_gradient_checkpointing(self, mode: bool | str = "full") -> bool:
        """Recompute decoder-layer activations in the backward pass (non-reentrant), ``"full"`` or ``"selective"``
        (``vlm.recompute``); ``False`` when the model does not support it."""
        return enable_for_transformers(self.model, mode)

    @property
    def hf_config(self) -> PretrainedConfig:
        return self.model.config

    @property
    def text_config(self) -> PretrainedConfig:
        cfg = self.model.config
        return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg

    @property
    def position_scheme(self) -> str:
        """How positions are numbered (``vlm.llm.positions.POSITION_SCHEMES``), read from the transformers config:
        ``"mrope"`` when its rope parameters hold an ``mrope_section`` (Qwen2-VL's text model; a rotary embedding
        module stating ``mrope_section`` counts too, as transformers defaults it when the config omits it), else
        ``"rope_1d"``."""
        cfg = self.text_config
        for params in (getattr(cfg, "rope_parameters", None), getattr(cfg, "rope_scaling", None)):
            if isinstance(params, dict) and params.get("mrope_section") is not None:
                return "mrope"
        if any(getattr(m, "mrope_section", None) is not None for m in self.model.modules()):
            return "mrope"
        return "rope_1d"

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[0]

    @property
    def attn_implementation(self) -> str:
        return self.model.config._attn_implementation or "sdpa"

    def decoder_layers(self) -> nn.ModuleList:
        """The decoder layer stack (``model.layers``, GPT-2's ``transformer.h``, OPT's ``model.decoder.layers``, ...).

        Found generically: the one ``ModuleList`` whose blocks are all of the classes the model states in
        ``_no_split_modules`` (transformers' "never split this block across devices" list, i.e. its layer classes).
        Raises ``ValueError`` when the model states none or the stack is ambiguous."""
        classes = set(getattr(self.model, "_no_split_modules", None) or ())
        stacks = [(name, m) for name, m in self.model.named_modules()
                  if isinstance(m, nn.ModuleList) and len(m) and all(type(c).__name__ in classes for c in m)]
        if len(stacks) != 1:
            raise ValueError(f"{type(self.model).__name__}: cannot find its decoder layers: expected one ModuleList "
                             f"of its _no_split_modules classes {sorted(classes)}; found "
                             f"{[name for name, _ in stacks] or 'none'}")
        return stacks[0][1]

    def resize_token_embeddings(self, n: int) -> None:
        """Grow (or shrink) the embedding table to ``n`` rows. New rows are initialized as transformers does (from the
        old rows' mean and covariance), except on the ``meta`` device (a model built to count or shard parameters),
        where there are no values to take statistics of."""
        on_meta = self.model.get_input_embeddings().weight.is_meta
        self.model.resize_token_embeddings(n, **({"mean_resizing": False} if on_meta else {}))

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(B, L) -> (B, L, D)``."""
        return self.model.get_input_embeddings()(input_ids)

    @property
    def supports_label_only_head(self) -> bool:
        """Whether the logits are ``output_head(hidden_states(...))`` exactly: the model exposes its decoder and
        output embeddings and applies no transform after them (``LOGIT_TRANSFORMS``)."""
        cfg = self.text_config
        return (self.model.get_decoder() is not self.model and self.model.get_output_embeddings() is not None
                and all(getattr(cfg, key, None) is None for key in LOGIT_TRANSFORMS))

    def hidden_states(self, **kwargs: Any) -> torch.Tensor:
        """The decoder's last hidden states ``(B, L, D)`` (after its final norm): what the output embeddings turn
        into logits. ``kwargs``: the LM's forward arguments (``inputs_embeds``, ``attention_mask``, ...)."""
        return self.model.get_decoder()(**kwargs).last_hidden_state

    @property
    def output_head(self) -> nn.Module:
        """The output embeddings: ``(N, D) -> (N, V)`` logits."""
        return self.model.get_output_embeddings()

    @staticmethod
    def inject(embeds: torch.Tensor, input_ids: torch.Tensor, features: torch.Tensor,
               image_token_id: int, kind: str = "image") -> torch.Tensor:
        """Scatter ``features (M, D)`` into the ``M`` placeholder positions of ``embeds (B, L, D)``, in row-major order.
        ``kind``: what the placeholders stand for (``image`` / ``video``), for the count error.

        Writes into ``embeds`` in place (the embedding lookup's output, which its backward does not need), so no
        second ``(B, L, D)`` copy is made, and returns it. Autograd forbids writing into a leaf that requires grad
        (what a frozen embedding's output becomes under a hook such as transformers' / peft's
        ``enable_input_require_grads``): such an ``embeds`` is left as it is and a new tensor with the same values is
        returned (its gradient still reaches ``embeds``)."""
        mask = input_ids == image_token_id
        n_tokens, n_feats = int(mask.sum()), features.shape[0]
        if n_tokens != n_feats:
            raise ValueError(f"{kind} placeholder count mismatch: input_ids hold {n_tokens} {kind} tokens "
                             f"(id {image_token_id}) but the {kind}s produced {n_feats} feature vectors")
        if n_feats == 0:
            return embeds
        values = features.to(embeds.dtype)
        if embeds.is_leaf and embeds.requires_grad:
            return embeds.index_put((mask,), values)
        embeds[mask] = values
        return embeds

    def forward(self, **kwargs: Any) -> Any:
        return self.model(**kwargs)

    def accepted_keywords(self, *, decoder: bool = False) -> frozenset[str] | None:
        """The keywords the transformers model's forward accepts (``decoder``: its decoder's, which
        ``hidden_states`` calls), or ``None`` when its signature cannot tell (``vlm.llm.keywords``)."""
        return accepted_keywords((self.model.get_decoder() if decoder else self.model).forward)

    def export_config(self) -> dict[str, Any]:
        cfg = self.model.config.to_dict()
        dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        out: dict[str, Any] = {"name": "hf_causal_lm", "config": cfg, "attn_implementation": self.attn_implementation,
                               "trust_remote_code": self.trust_remote_code, "dtype": dtype}
        if not self.strict_config:  # built from a dict with exotic keys: the rebuilt model must accept them too
            out["strict_config"] = False
        return out


def load_pretrained(path: str, *, attn_implementation: str, dtype: torch.dtype,
                    trust_remote_code: bool = False) -> PreTrainedModel:
    """The causal LM of a local transformers directory: ``AutoModelForCausalLM`` when the family has a causal-LM
    class; ``CausalLMFromBase`` for a text model with only a base model (a directory saved from one); and for a
    multimodal directory whose text model is such (a saved ``Qwen2VLForConditionalGeneration``), its language model and
    output head only (the other weights, the vision tower's, are not loaded)."""
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    kind = causal_lm_kind(config, trust_remote_code)
    common = {"attn_implementation": attn_implementation, "dtype": dtype, "local_files_only": True}
    if kind == "causal_lm":
        return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, **common)
    if kind == "base":
        return CausalLMFromBase.from_pretrained(path, config=config, **common)
    text_config = config.get_text_config()
    if text_config is not config and causal_lm_kind(text_config, trust_remote_code) == "base":
        text_config.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        return CausalLMFromBase.from_pretrained(path, config=text_config, key_mapping=language_model_keys(config),
                                                **common)
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, **common)  # its error


def make_config(config: dict[str, Any], strict: bool = True) -> PretrainedConfig:
    """A transformers config from a dict naming ``model_type``. ``strict``: refuse keys the config class does not
    accept (``vlm.hf_config.check_config_keys``)."""
    config = dict(config)
    if "model_type" not in config:
        raise KeyError(f"hf_causal_lm config needs 'model_type' (e.g. llama, qwen2, gemma, gpt2); got keys "
                       f"{sorted(config)}")
    model_type = config.pop("model_type")
    config_class = config_class_for(model_type, "hf_causal_lm config")
    if strict:
        check_config_keys(config_class, config, "hf_causal_lm config", model_type=model_type)
    for k in FILE_KEYS:
        config.pop(k, None)
    built = AutoConfig.for_model(model_type, **config)
    check_mrope_section(built)
    return built


def check_mrope_section(config: PretrainedConfig) -> None:
    """An mRoPE config's ``rope_parameters.mrope_section`` (temporal, height, width frequencies) must split the head's
    ``head_dim / 2`` rotary frequencies exactly (transformers splits by it inside attention, where a mismatch is a bare
    shape error at the first step). Raises ``ValueError`` naming the key, the head size and a split that fits."""
    rope = getattr(config, "rope_parameters", None) or {}
    section = rope.get("mrope_section") if isinstance(rope, dict) else None
    if not section:
        return
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if sum(section) != head_dim // 2:
        half = head_dim // 2
        fit = [half - 2 * (half // 4), half // 4, half // 4]
        raise ValueError(f"llm.config.rope_parameters.mrope_section={list(section)} sums to {sum(section)}, but the "
                         f"attention heads have head_dim={head_dim} (hidden_size / num_attention_heads), i.e. "
                         f"{half} rotary frequencies to split into temporal, height and width; expected a section "
                         f"summing to {half}, e.g. {fit}")
