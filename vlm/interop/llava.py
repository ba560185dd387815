"""transformers ``LlavaForConditionalGeneration`` <-> ``vlm.VLM``, weight for weight.

| LLaVA                                               | vlm                                                   |
| --------------------------------------------------- | ----------------------------------------------------- |
| ``model.vision_tower`` (CLIP / SigLIP vision model) | ``encoder.model`` (``clip`` / ``siglip`` encoder)     |
| ``vision_feature_layer`` (int or list)              | ``encoder.feature_layer``                             |
| ``vision_feature_select_strategy``                  | ``encoder.select`` (see ``mapping.SELECT_FROM_LLAVA``)|
| ``model.multi_modal_projector.linear_1 / linear_2`` | ``connector.layers.0 / layers.2`` (``mlp``, depth 2)  |
| ``projector_hidden_act``, ``..._projector_bias``    | ``connector`` ``act``, ``bias``                       |
| ``model.language_model`` + ``lm_head``              | ``llm.model.base_model`` + output embeddings          |
| ``image_token_id`` (``image_token_index``)          | ``image_token_id``                                    |

Only local directories are read; weights come from safetensors (or ``pytorch_model.bin`` through
``torch.load(weights_only=True)``); no remote code is ever run.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import torch

from vlm import connectors, encoders
from vlm.connectors.mlp import MLPConnector
from vlm.encoders.hf_vision import HFVisionEncoder
from vlm.interop import common
from vlm.interop.formats import FORMATS, HFFormat
from vlm.interop.mapping import (
    ACT_FROM_HF,
    ACT_TO_HF,
    ENCODER_MODEL_TYPES,
    SELECT_FROM_LLAVA,
    SELECT_TO_LLAVA,
    UNUSED_VISION_MODULES,
    VISION_MODEL_TYPES,
)
from vlm.interop.processor import save_llava_processor
from vlm.model import VLM
from vlm.pretrained import CONFIG_FILE

LLAVA_MODEL_TYPE = "llava"
VISION_PREFIX = "model.vision_tower."
#: what ``from_hf``'s model_type error adds for a directory of another kind
NOT_LLAVA_HINT = ". LLaVA-NeXT (llava_next) and LLaVA-OneVision (llava_onevision) have their own formats"


# ----------------------------------------------------------------------------------------- LLaVA's projector
#: connector types that can hold LLaVA's ``linear_1 -> act -> linear_2`` projector: ``{our submodule: LLaVA's}``
PROJECTOR_LAYERS: dict[type, dict[str, str]] = {MLPConnector: {"layers.0": "linear_1", "layers.2": "linear_2"}}


def projector_layers(conn: Any) -> dict[str, str] | None:
    """Where LLaVA's projector layers live in ``conn`` (``{our submodule: "linear_1" | "linear_2"}``), or ``None``
    when its type (or a type it derives from) cannot hold them."""
    return next((PROJECTOR_LAYERS[t] for t in type(conn).__mro__ if t in PROJECTOR_LAYERS), None)


def projector_problems(conn: Any) -> list[str]:
    """What keeps ``conn`` from being LLaVA's projector (empty when it is): an ``mlp`` with exactly 2 linear layers,
    no input norm and a hidden size equal to the LLM's (``out_dim``)."""
    if projector_layers(conn) is None:
        return [(f"the connector is {common.part_name(conn)!r}; LLaVA's projector is linear_1 -> act -> linear_2, i.e. "
                 f"our 'mlp' connector with depth=2 (no pooling, no norm)")]
    opts, problems = conn.options, []
    if opts.get("depth") != 2:
        problems.append(f"the mlp connector has depth={opts.get('depth')}; LLaVA's projector has exactly 2 "
                        f"linear layers (depth=2)")
    if opts.get("norm"):
        problems.append("the mlp connector has norm=True; LLaVA's projector has no input LayerNorm")
    if opts.get("hidden_dim") not in (None, conn.out_dim):
        problems.append(f"the mlp connector has hidden_dim={opts.get('hidden_dim')}; LLaVA's projector's hidden "
                        f"size is the LLM hidden size ({conn.out_dim})")
    return problems


# ----------------------------------------------------------------------------------------------------- import
def from_hf(path: str | os.PathLike, *, dtype: str | torch.dtype | None = None, tokenizer: bool = True,
            attn_implementation: str = "sdpa") -> VLM:
    """Import a local transformers ``LlavaForConditionalGeneration`` directory as a ``vlm.VLM`` (eval mode).

    ``dtype``: parameter dtype of the result (default float32, like ``vlm.load``). The tokenizer in the directory,
    if any, is attached as ``model.tokenizer`` (``tokenizer=False`` skips it). Image mean/std come from the
    directory's image-processor config when present, else the encoder family's defaults; so does the image
    geometry (``model.image_preprocessing``: ``resize`` / ``crop`` / ``pad``, see ``processor.read_preprocessing``;
    ``resize`` without a config).
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    path = Path(path)
    config = common.read_hf_config(path, LlavaConfig, LLAVA_MODEL_TYPE, LlavaForConditionalGeneration, NOT_LLAVA_HINT)
    parts = import_parts(path, config, LlavaForConditionalGeneration, dtype, attn_implementation)._replace(hf=None)
    return common.assemble(path, config, parts.encoder, parts.connector, parts.lm,
                           image_token_id=int(config.image_token_id), tokenizer=tokenizer,
                           image_processor=parts.image_processor, image_processor_file=parts.image_processor_file)


class ImportedParts(NamedTuple):
    """What ``import_parts`` reads from a LLaVA-layout directory; ``hf``: the loaded transformers model (for
    family-specific weights such as LLaVA-NeXT's ``image_newline``)."""

    encoder: Any
    connector: Any
    lm: Any
    image_processor: dict[str, Any] | None
    image_processor_file: Path
    hf: Any
    dtype: torch.dtype


def import_parts(path: Path, config: Any, hf_class: type, dtype: str | torch.dtype | None,
                 attn_implementation: str) -> ImportedParts:
    """The encoder, ``mlp`` connector and LLM of a LLaVA-layout directory (``model.vision_tower``,
    ``model.multi_modal_projector``, ``model.language_model`` + ``lm_head``: LLaVA and LLaVA-NeXT), weights copied;
    ``ValueError`` naming the config key a vlm part cannot express."""
    vision_type = config.vision_config.model_type
    if vision_type not in VISION_MODEL_TYPES:
        raise ValueError(f"from_hf: vision_config.model_type={vision_type!r} in {str(path / CONFIG_FILE)!r} is not "
                         f"supported; supported towers: {sorted(VISION_MODEL_TYPES)}")
    strategy = config.vision_feature_select_strategy
    act = config.projector_hidden_act
    if act not in ACT_FROM_HF:
        raise ValueError(f"from_hf: projector_hidden_act={act!r} has no equivalent in the mlp connector; supported: "
                         f"{sorted(ACT_FROM_HF)}")
    enc_name = VISION_MODEL_TYPES[vision_type]
    has_cls = encoders.ENCODERS.get(enc_name).has_cls
    if (strategy, has_cls) not in SELECT_FROM_LLAVA:
        raise ValueError(f"from_hf: vision_feature_select_strategy={strategy!r}; expected 'default' or 'full'")
    # LLaVA never runs some vision-tower modules (UNUSED_VISION_MODULES): a checkpoint may omit them
    hf, torch_dtype = common.load_checkpoint(hf_class, path, dtype,
                                             ignore_missing=[VISION_PREFIX + p for p in UNUSED_VISION_MODULES])
    tied = common.is_tied(hf)

    # modules LLaVA never runs (SigLIP's pooling head) are left out of our encoder: logits are unchanged, and no
    # trainable parameter is left without a gradient
    tower = hf.model.vision_tower.state_dict()
    dropped = [p for p in UNUSED_VISION_MODULES if any(k.startswith(p) for k in tower)]
    tower = {k: v for k, v in tower.items() if not any(k.startswith(p) for p in dropped)}
    vision_cfg = common.arch_config(config.vision_config)
    for prefix in dropped:
        vision_cfg.update(UNUSED_VISION_MODULES[prefix])
    encoder, image_processor, image_processor_file = common.import_encoder(path, type(config.vision_config), {
        "name": enc_name, "config": vision_cfg, "feature_layer": config.vision_feature_layer,
        "select": SELECT_FROM_LLAVA[(strategy, has_cls)], "attn_implementation": attn_implementation,
        "dtype": common.dtype_name(torch_dtype)})
    # what LLaVA actually does (its top-level tying flag can override the text one)
    lm = common.import_llm(config.text_config, tied, attn_implementation, torch_dtype)
    connector = connectors.build({"name": "mlp", "depth": 2, "act": ACT_FROM_HF[act],
                                  "bias": bool(config.multimodal_projector_bias)},
                                 in_dim=encoder.hidden_size, out_dim=lm.hidden_size).to(torch_dtype)

    with torch.no_grad():
        common.copy_state(encoder.model, tower, "from_hf: vision tower")
        common.copy_projector(connector, hf.model.multi_modal_projector, projector_layers(connector), to_hf=False)
        common.copy_language_model(lm, hf, to_hf=False)
    return ImportedParts(encoder, connector, lm, image_processor, image_processor_file, hf, torch_dtype)


def llava_problems(model: VLM) -> list[str]:
    """Why ``model`` cannot be written as a LLaVA checkpoint (empty when it can)."""
    return parts_problems(model, "LLaVA", "LlavaForConditionalGeneration")


def parts_problems(model: VLM, family: str, hf_class_name: str) -> list[str]:
    """Why ``model``'s encoder, connector and LLM are not a LLaVA-layout model's (LLaVA, LLaVA-NeXT) (empty when
    they are)."""
    problems = []
    enc, conn, lm = model.encoder, model.connector, model.llm
    enc_name = common.part_name(enc)
    if not isinstance(enc, HFVisionEncoder) or enc_name not in ENCODER_MODEL_TYPES:
        problems.append(f"the encoder is {enc_name!r}; LLaVA's vision tower is a transformers CLIP or SigLIP vision "
                        f"model (our encoders: {sorted(ENCODER_MODEL_TYPES)})")
    problems += projector_problems(conn)
    act = getattr(conn, "options", {}).get("act")
    if projector_layers(conn) is not None and act not in ACT_TO_HF:
        problems.append(f"the connector act={act!r} has no LLaVA equivalent; supported: {sorted(ACT_TO_HF)}")
    return problems + common.lm_problems(lm, family, hf_class_name)


def llava_config(model: VLM) -> Any:
    """The ``LlavaConfig`` describing ``model`` (raises ``ValueError`` listing what LLaVA cannot express)."""
    from vlm.interop.formats import all_problems

    common.refuse_export(all_problems(LlavaFormat, model), "LLaVA")
    from transformers import LlavaConfig

    enc, conn, lm = model.encoder, model.connector, model.llm
    tied = common.is_tied(lm.model)
    vision_cfg = common.arch_config(enc.hf_config)
    text_cfg = common.text_config_for_export(lm, model)
    return LlavaConfig(
        vision_config=vision_cfg, text_config=text_cfg, image_token_id=model.image_token_id,
        vision_feature_layer=enc.feature_layer, vision_feature_select_strategy=SELECT_TO_LLAVA[enc.drops_first],
        projector_hidden_act=ACT_TO_HF[conn.options["act"]], multimodal_projector_bias=bool(conn.options["bias"]),
        image_seq_length=model.num_image_tokens(), tie_word_embeddings=tied)


def to_hf(model: VLM, path: str | os.PathLike, *, dtype: str | torch.dtype | None = None,
          processor: bool = True) -> Path:
    """Write ``model`` as a transformers ``LlavaForConditionalGeneration`` directory (safetensors) and return it.

    ``dtype``: dtype of the written weights (default: the LLM's). With ``processor`` (default) also writes the image
    processor (the pixels vlm computes for ``model.image_preprocessing``), the tokenizer (if ``model.tokenizer``) and
    the ``LlavaProcessor`` config (when the tokenizer encodes
    the image token as the single ``image_token_id``; otherwise it warns and skips just that file).
    """
    from transformers import LlavaForConditionalGeneration

    config = llava_config(model)
    lm = model.llm
    common.warn_fixed_size(model.encoder, "LlavaConfig")
    out = Path(path)
    hf = common.new_hf_model(config, LlavaForConditionalGeneration, common.export_dtype(lm, dtype))
    export_parts(model, hf, "LLaVA")
    common.save_hf(hf, model, out)
    del hf
    if processor:
        save_llava_processor(model, out, strategy=config.vision_feature_select_strategy)
    return out


def export_parts(model: VLM, hf: Any, family: str) -> None:
    """Copy ``model``'s encoder, connector and LLM weights into a LLaVA-layout transformers model ``hf``; checks the
    embedding tying came out as ``model``'s."""
    enc, conn, lm = model.encoder, model.connector, model.llm
    with torch.no_grad():
        common.copy_state(hf.model.vision_tower, enc.model.state_dict(), "to_hf: vision tower")
        common.copy_projector(conn, hf.model.multi_modal_projector, projector_layers(conn), to_hf=True)
        common.copy_language_model(lm, hf, to_hf=True)
    common.check_tying(lm, hf, family)


@FORMATS.register("llava")
class LlavaFormat(HFFormat):
    """transformers ``LlavaForConditionalGeneration`` (LLaVA-1.5 layout)."""

    model_type = LLAVA_MODEL_TYPE
    hf_class = "LlavaForConditionalGeneration"
    from_hf = staticmethod(from_hf)
    to_hf = staticmethod(to_hf)
    problems = staticmethod(llava_problems)
