"""A causal LM made of any transformers text base model (``AutoModel``) plus an output projection.

Some transformers text models have a base model but no causal-LM class: the text halves of multimodal families
(Qwen2-VL's ``qwen2_vl_text``, Qwen2.5-VL's ``qwen2_5_vl_text``), which transformers only runs inside their
``...ForConditionalGeneration``. ``CausalLMFromBase`` is one generic class (not one per family) that makes any of them a
``PreTrainedModel`` + ``GenerationMixin`` with the usual layout: ``model`` (the base model), ``lm_head`` (tied to the
input embeddings when the config says so), so ``generate``, ``save_pretrained`` / ``from_pretrained``, peft's LoRA,
gradient checkpointing and ``resize_token_embeddings`` work as for a native causal LM.
"""
from __future__ import annotations

import re
from typing import Any

import torch
import transformers
from torch import nn
from transformers import AutoModel, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING


def causal_lm_kind(config: PretrainedConfig, trust_remote_code: bool = False) -> str | None:
    """How a causal LM is built from ``config``: ``"causal_lm"`` (transformers has a causal-LM class for it, or its
    remote code states one), ``"base"`` (a text model with a base model but no causal-LM class:
    ``CausalLMFromBase``), ``None`` (neither; e.g. a multimodal config, whose text config may be ``"base"``)."""
    if trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}):
        return "causal_lm"
    if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING:
        return "causal_lm"
    is_text = config.get_text_config() is config and not getattr(config, "is_encoder_decoder", False)
    if is_text and type(config) in MODEL_MAPPING and getattr(config, "vocab_size", None):
        return "base"
    return None


def language_model_keys(config: PretrainedConfig) -> dict[str, str]:
    """``from_pretrained``'s ``key_mapping`` that reads a multimodal checkpoint's language model and output head as
    ``CausalLMFromBase``'s ``model.*`` / ``lm_head.*`` (e.g. ``model.language_model.*``, ``lm_head.*`` of a saved
    ``Qwen2VLForConditionalGeneration``). Found by building the model the config names (``architectures``) on the
    meta device and locating its text base model and output embeddings. Raises ``ValueError`` when it cannot."""
    base_class = MODEL_MAPPING[type(config.get_text_config())]
    classes = [getattr(transformers, name, None) for name in (getattr(config, "architectures", None) or ())]
    classes = [c for c in classes if isinstance(c, type) and issubclass(c, PreTrainedModel)]
    if not classes:
        raise ValueError(f"{type(config).__name__}: cannot tell which weights are the language model: the config "
                         f"names no transformers architecture ({getattr(config, 'architectures', None)})")
    with torch.device("meta"):
        full = classes[0]._from_config(config)
    names = {id(m): name for name, m in full.named_modules()}
    text = [name for name, m in full.named_modules() if isinstance(m, base_class)]
    head = full.get_output_embeddings()
    if len(text) != 1 or head is None or id(head) not in names:
        raise ValueError(f"{classes[0].__name__}: expected one {base_class.__name__} and an output head; found "
                         f"{text or 'no'} language model(s)")
    return {rf"^{re.escape(text[0])}\.": "model.", rf"^{re.escape(names[id(head)])}\.": "lm_head."}


class CausalLMFromBase(PreTrainedModel, GenerationMixin):
    """``model`` (``AutoModel.from_config(config)``, a text base model returning ``last_hidden_state (B, L, D)``) +
    ``lm_head`` (``Linear(D, vocab_size)``, no bias) -> ``CausalLMOutputWithPast`` (``logits (B, L, V)``, the
    transformers loss with ``labels``, the base model's cache / hidden states / attentions)."""

    config_class = PretrainedConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        self.model = AutoModel.from_config(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # the base model's layer classes (device maps, vlm's decoder_layers) and its embedding for tying
        self._no_split_modules = list(getattr(self.model, "_no_split_modules", None) or [])
        embedding = self.model.get_input_embeddings()
        name = next(n for n, m in self.model.named_modules() if m is embedding)
        self._tied_weights_keys = {"lm_head.weight": f"model.{name}.weight"}
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def get_decoder(self) -> nn.Module:
        return self.model

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: Any = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                **kwargs: Any) -> CausalLMOutputWithPast:
        """The base model's forward (``position_ids``: whatever it takes, e.g. Qwen2-VL's ``(3, B, L)``), then
        ``lm_head`` on the last ``logits_to_keep`` positions (0: all)."""
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        hidden = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        rest = {k: v for k, v in outputs.items() if k != "last_hidden_state"}
        return CausalLMOutputWithPast(loss=loss, logits=logits, **rest)
