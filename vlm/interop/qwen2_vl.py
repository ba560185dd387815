"""transformers ``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration`` <-> ``vlm.VLM``, weight
for weight (one module, two formats: ``qwen2_vl`` and ``qwen2_5_vl``; ``FAMILIES`` says what differs).

| Qwen2-VL / Qwen2.5-VL (transformers)                  | vlm                                                     |
| ----------------------------------------------------- | ------------------------------------------------------- |
| ``model.visual`` minus ``merger`` (``vision_config``) | ``encoder.model`` (``qwen2_vl_vit``, same names)        |
| ``model.visual.merger`` (``ln_q``, ``mlp.0/2``)       | ``connector`` (``patch_merger``, same names; ``norm``:  |
|                                                       | LayerNorm for Qwen2-VL, RMSNorm for Qwen2.5-VL)         |
| ``vision_config.spatial_merge_size``                  | ``connector.merge_size``                                |
| ``vision_config.hidden_size`` / ``out_hidden_size``   | ``connector.out_dim`` (= the LLM's hidden size)         |
| ``model.language_model`` + ``lm_head``                | ``llm`` (``hf_causal_lm``, ``qwen2_vl_text`` /          |
|                                                       | ``qwen2_5_vl_text``: mRoPE positions)                   |
| ``image_token_id`` (``<|image_pad|>``)                | ``image_token_id``                                      |
| ``Qwen2VLImageProcessor`` (``min_pixels``, ...)       | ``image_preprocessing.tiling`` ``{kind: native, ...}``  |

The imported model takes what the family's processor returns, whole: ``input_ids``, ``attention_mask``,
``pixel_values`` (flat patches), ``image_grid_thw`` and ``mm_token_type_ids`` (checked against ``input_ids``, see
``VLM.forward``); videos too (``pixel_values_videos``, ``video_grid_thw``, ``second_per_grid_ts``: the directory's
``video_token_id``). Only local directories are read; no
remote code is ever run.
"""
from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from vlm import connectors
from vlm.connectors.patch_merger import PatchMerger
from vlm.encoders.qwen2_vl_vit import MERGER_PREFIX, Qwen2VLViT
from vlm.interop import common
from vlm.interop.formats import FORMATS, HFFormat
from vlm.model import VLM
from vlm.pretrained import CONFIG_FILE

IMAGE_TOKEN = "<|image_pad|>"  # the image token's string when the directory has no tokenizer
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
BICUBIC = 3  # PIL's bicubic, the only resample vlm's native layout does
MIN_PIXELS, MAX_PIXELS = 56 * 56, 28 * 28 * 1280  # Qwen2VLImageProcessor's defaults
#: the native tiling keys the image processor states, with their Qwen2VLImageProcessor defaults
GEOMETRY_DEFAULTS = {"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}


@dataclass(frozen=True)
class Family:
    """What differs between Qwen2-VL and Qwen2.5-VL (everything else is shared)."""

    model_type: str  # config.json's
    hf_class: str  # transformers' model class
    config_class: str
    processor_class: str
    tower_type: str  # vision_config.model_type
    text_type: str  # text_config.model_type
    merger_norm: str  # the patch_merger ``norm``
    out_key: str  # the vision_config key of the merger's output width (= the LLM's)
    label: str  # for messages


FAMILIES = {
    "qwen2_vl": Family("qwen2_vl", "Qwen2VLForConditionalGeneration", "Qwen2VLConfig", "Qwen2VLProcessor",
                       "qwen2_vl_vision", "qwen2_vl_text", "layer_norm", "hidden_size", "Qwen2-VL"),
    "qwen2_5_vl": Family("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig",
                         "Qwen2_5_VLProcessor", "qwen2_5_vl_vision", "qwen2_5_vl_text", "rms_norm",
                         "out_hidden_size", "Qwen2.5-VL"),
}


def _transformers(name: str) -> Any:
    import transformers

    return getattr(transformers, name)


# ----------------------------------------------------------------------------------------------------- import
def read_native(config: dict[str, Any] | None, image_size: int, where: str) -> dict[str, Any]:
    """The ``image_preprocessing`` record of a ``Qwen2VLImageProcessor`` config: ``tiling: {kind: native,
    min_pixels, max_pixels, patch_size, merge_size, temporal_patch_size, resample}`` (``min_pixels`` /
    ``max_pixels`` keys, else transformers 5's ``size: {shortest_edge, longest_edge}``, else the class defaults;
    ``resample: torchvision`` for ``Qwen2VLImageProcessor``, what ``AutoImageProcessor`` picks, ``pil`` for
    ``Qwen2VLImageProcessorPil``). Warns (naming ``where``) about a resample other than bicubic or
    ``do_resize=False``, which vlm's native layout does not do. ``image_size`` is not used (no fixed size)."""
    config = config or {}
    size = config.get("size") if isinstance(config.get("size"), dict) else {}
    lo = config.get("min_pixels") or size.get("shortest_edge") or MIN_PIXELS
    hi = config.get("max_pixels") or size.get("longest_edge") or MAX_PIXELS
    kind = str(config.get("image_processor_type") or "Qwen2VLImageProcessor")
    tiling = {"kind": "native", "min_pixels": int(lo), "max_pixels": int(hi),
              **{k: int(config.get(k) or v) for k, v in GEOMETRY_DEFAULTS.items()},
              "resample": "pil" if kind.endswith("Pil") else "torchvision"}
    if config.get("resample") is not None and int(config["resample"]) != BICUBIC:
        warnings.warn(f"from_hf: {where} has resample={config['resample']}; vlm's native layout resizes bicubic",
                      stacklevel=3)
    if config.get("do_resize") is False:
        warnings.warn(f"from_hf: {where} has do_resize=False; vlm's native layout always resizes to multiples of "
                      f"patch_size * merge_size inside [min_pixels, max_pixels]", stacklevel=3)
    return {"resize_mode": "resize", "tiling": tiling}


def import_chat_template(path: Path, tokenizer: Any, image_token: str) -> None:
    """Give ``tokenizer`` the chat template the directory's processor renders with (``processor_config.json``,
    ``chat_template.json``, ``chat_template.jinja``, else the tokenizer's own). Qwen2-VL's writes
    ``<|vision_start|><|image_pad|><|vision_end|>`` per image and its processor repeats ``<|image_pad|>`` once
    per merged patch: vlm's ``Processor`` does the same with the template as it is. Warns (naming the directory)
    when the template writes no ``image_token`` for an image part."""
    from vlm.data.templates.jinja import image_rendering
    from vlm.interop.internvl_processor import processor_chat_template

    if tokenizer is None:
        return
    template = processor_chat_template(path, tokenizer)
    if not template:
        return
    tokenizer.chat_template = template
    if image_rendering(tokenizer, template, image_token) is None:
        warnings.warn(f"from_hf: the chat template of {str(path)!r} writes no {image_token} for an image part "
                      f"({{'type': 'image'}}); chat places images itself", stacklevel=3)


def from_hf(path: str | os.PathLike, *, family: Family, dtype: str | torch.dtype | None = None,
            tokenizer: bool = True, attn_implementation: str = "sdpa") -> VLM:
    """Import a local transformers ``family.hf_class`` directory as a ``vlm.VLM`` (eval mode).

    The encoder is our ``qwen2_vl_vit`` (the directory's ``vision_config``, ``model.visual.*`` weights without the
    merger), the connector ``patch_merger`` (the merger's weights), the LLM the directory's text model (mRoPE). The
    tokenizer, the processor's chat template, the generation config and the image preprocessing (``read_native``,
    image mean / std) come from the directory. ``ValueError`` naming ``config.json`` for a config the parts cannot
    hold (a merger width other than the LLM's)."""
    hf_class = _transformers(family.hf_class)
    path = Path(path)
    where = f"from_hf: {str(path / CONFIG_FILE)!r}"
    config = common.read_hf_config(path, _transformers(family.config_class), family.model_type, hf_class)
    vision, text = config.vision_config, config.text_config
    out_dim = int(getattr(vision, family.out_key))
    if out_dim != int(text.hidden_size):
        raise ValueError(f"{where}: vision_config.{family.out_key}={out_dim} (the merger's output) differs from "
                         f"text_config.hidden_size={text.hidden_size}")
    hf, torch_dtype = common.load_checkpoint(hf_class, path, dtype)

    vision_cfg = {**common.arch_config(vision), "model_type": family.tower_type}
    factor = int(vision.patch_size) * int(vision.spatial_merge_size)
    encoder, image_processor, image_processor_file = common.import_encoder(path, type(vision), {
        "name": "qwen2_vl_vit", "config": vision_cfg, "image_size": factor * max(1, 448 // factor),
        "attn_implementation": attn_implementation, "dtype": common.dtype_name(torch_dtype)})
    lm = common.import_llm(text, common.is_tied(hf), attn_implementation, torch_dtype)
    connector = connectors.build({"name": "patch_merger", "merge_size": int(vision.spatial_merge_size),
                                  "norm": family.merger_norm},
                                 in_dim=encoder.hidden_size, out_dim=lm.hidden_size).to(torch_dtype)
    with torch.no_grad():
        visual = hf.model.visual.state_dict()
        tower = {k: v for k, v in visual.items() if not k.startswith(MERGER_PREFIX)}
        merger = {k.removeprefix(MERGER_PREFIX): v for k, v in visual.items() if k.startswith(MERGER_PREFIX)}
        common.copy_state(encoder.model, tower, "from_hf: vision tower")
        common.copy_state(connector, merger, "from_hf: merger")
        common.copy_language_model(lm, hf, to_hf=False)
    del hf

    def prepare(model: VLM) -> None:
        import_chat_template(path, model.tokenizer, model.image_token)
        video_id = getattr(config, "video_token_id", None)  # the model takes the processor's videos too
        if video_id is not None and 0 <= int(video_id) < model.llm.vocab_size:
            model.video_token_id = int(video_id)
            model.video_token = common.token_string(model.tokenizer, int(video_id), "<|video_pad|>")

    return common.assemble(path, config, encoder, connector, lm, image_token_id=int(config.image_token_id),
                           tokenizer=tokenizer, image_processor=image_processor,
                           image_processor_file=image_processor_file, image_token=IMAGE_TOKEN, prepare=prepare,
                           preprocessing=read_native)


# ----------------------------------------------------------------------------------------------------- export
def qwen2_vl_problems(model: VLM, family: Family) -> list[str]:
    """Why ``model`` cannot be written as a transformers ``family.hf_class`` checkpoint (empty when it can): the
    encoder must be ``qwen2_vl_vit`` with the family's tower, the connector ``patch_merger`` with the tower's merge
    size and the family's norm, the LLM the family's text model (mRoPE)."""
    problems = []
    enc, conn, lm = model.encoder, model.connector, model.llm
    tower_type = enc.hf_config.model_type if isinstance(enc, Qwen2VLViT) else None
    if tower_type is None:
        problems.append(f"the encoder is {common.part_name(enc)!r}; {family.label}'s vision tower is 'qwen2_vl_vit'")
    elif tower_type != family.tower_type:
        problems.append(f"the qwen2_vl_vit tower is {tower_type!r}; {family.label}'s is {family.tower_type!r}")
    if not isinstance(conn, PatchMerger):
        problems.append(f"the connector is {common.part_name(conn)!r}; {family.label}'s merger is 'patch_merger'")
    else:
        norm = conn.options.get("norm", "layer_norm")
        if norm != family.merger_norm:
            problems.append(f"the patch_merger norm={norm!r}; {family.label}'s merger has {family.merger_norm!r}")
        if tower_type is not None and conn.merge_size != enc.spatial_merge_size:
            problems.append(f"the patch_merger merge_size={conn.merge_size} differs from the tower's "
                            f"spatial_merge_size={enc.spatial_merge_size}")
    problems += common.lm_problems(lm, family.label, family.hf_class)
    text_type = getattr(getattr(lm, "text_config", None), "model_type", None)
    if text_type is not None and text_type != family.text_type:
        problems.append(f"the LLM is {text_type!r}; {family.label}'s text model is {family.text_type!r}")
    return problems


def qwen2_vl_config(model: VLM, family: Family) -> Any:
    """The ``family.config_class`` describing ``model`` (``ValueError`` listing what it cannot express)."""
    common.refuse_export(qwen2_vl_problems(model, family), family.label)
    vision = {k: v for k, v in common.arch_config(model.encoder.hf_config).items() if k != "model_type"}
    vision[family.out_key] = model.llm.hidden_size
    text = common.text_config_for_export(model.llm, model)
    tok = model.tokenizer
    ids = {}
    for key, token in (("vision_start_token_id", VISION_START), ("vision_end_token_id", VISION_END),
                       ("video_token_id", "<|video_pad|>")):
        found = tok.convert_tokens_to_ids(token) if tok is not None else None
        if isinstance(found, int) and found != getattr(tok, "unk_token_id", None):
            ids[key] = found
    return _transformers(family.config_class)(
        vision_config=vision, text_config=text, image_token_id=model.image_token_id,
        tie_word_embeddings=common.is_tied(model.llm.model), **ids)


def native_tiling(model: VLM) -> dict[str, Any]:
    """The model's recorded native tiling (``model.image_preprocessing["tiling"]``), else the tower's geometry with
    Qwen2VLImageProcessor's pixel budget."""
    record = getattr(model, "image_preprocessing", None) or {}
    tiling = record.get("tiling") or {}
    enc = model.encoder
    if tiling.get("kind") != "native":
        tiling = {"min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS, "resample": "torchvision"}
    return {**tiling, "patch_size": enc.patch_size, "merge_size": enc.spatial_merge_size,
            "temporal_patch_size": enc.temporal_patch_size}


def save_processor(model: VLM, out: Path, family: Family) -> bool:
    """Write the family's processor (``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor``: image processor with the
    recorded pixel budget and the encoder's mean / std, a video processor with the same geometry, the tokenizer
    and its chat template). Warns and writes only the image processor when the model has no tokenizer, or one
    that does not encode the image token (``<|image_pad|>``) as the single ``image_token_id``; warns when the chat
    template writes no image token per image."""
    from vlm.interop.processor import processor_problem

    t = native_tiling(model)
    enc = model.encoder
    geometry = {"min_pixels": int(t["min_pixels"]), "max_pixels": int(t["max_pixels"]),
                "patch_size": int(t["patch_size"]), "merge_size": int(t["merge_size"]),
                "temporal_patch_size": int(t["temporal_patch_size"]),
                "image_mean": [float(m) for m in enc.image_mean], "image_std": [float(s) for s in enc.image_std]}
    image_class = "Qwen2VLImageProcessorPil" if t.get("resample") == "pil" else "Qwen2VLImageProcessor"
    image_processor = _transformers(image_class)(**geometry)
    tok = model.tokenizer
    problem = "model.tokenizer is not set" if tok is None else processor_problem(tok, model.image_token,
                                                                                 model.image_token_id)
    if problem is not None:
        image_processor.save_pretrained(str(out))
        warnings.warn(f"to_hf: only the image processor was written to {str(out)!r} (no {family.processor_class}): "
                      f"{problem}", stacklevel=3)
        return False
    from vlm.data.templates.jinja import image_rendering

    if not tok.chat_template or image_rendering(tok, tok.chat_template, model.image_token) is None:
        warnings.warn(f"to_hf: the tokenizer's chat template writes no {model.image_token} for an image part "
                      f"({{'type': 'image'}}), so {family.processor_class} finds no place for an image in prompts "
                      f"from apply_chat_template; set a template that does (model.set_template)", stacklevel=3)
    video_processor = _transformers("Qwen2VLVideoProcessor")(**geometry)
    tok = copy.deepcopy(tok)
    processor = _transformers(family.processor_class)(image_processor=image_processor, tokenizer=tok,
                                                      video_processor=video_processor,
                                                      chat_template=tok.chat_template)
    processor.save_pretrained(str(out))
    return True


def to_hf(model: VLM, path: str | os.PathLike, *, family: Family, dtype: str | torch.dtype | None = None,
          processor: bool = True) -> Path:
    """Write ``model`` as a transformers ``family.hf_class`` directory (safetensors) and return it: the tower and the
    merger as ``model.visual``, the LLM as ``model.language_model`` + ``lm_head``, the generation config, and with
    ``processor`` (default) the family's processor files (``save_processor``)."""
    config = qwen2_vl_config(model, family)
    enc, conn, lm = model.encoder, model.connector, model.llm
    hf = common.new_hf_model(config, _transformers(family.hf_class), common.export_dtype(lm, dtype))
    with torch.no_grad():
        visual = {**enc.model.state_dict(), **{MERGER_PREFIX + k: v for k, v in conn.state_dict().items()}}
        common.copy_state(hf.model.visual, visual, "to_hf: vision tower + merger")
        common.copy_language_model(lm, hf, to_hf=True)
    common.check_tying(lm, hf, family.label)
    out = Path(path)
    common.save_hf(hf, model, out)
    del hf
    if processor:
        save_processor(model, out, family)
    return out


def _format(name: str) -> type[HFFormat]:
    family = FAMILIES[name]

    class Format(HFFormat):
        model_type = family.model_type
        hf_class = family.hf_class
        from_hf = staticmethod(partial(from_hf, family=family))
        to_hf = staticmethod(partial(to_hf, family=family))
        problems = staticmethod(partial(qwen2_vl_problems, family=family))

    Format.__name__ = Format.__qualname__ = f"{family.hf_class.removesuffix('ForConditionalGeneration')}Format"
    Format.__doc__ = f"transformers ``{family.hf_class}`` ({family.label})."
    return FORMATS.register(name)(Format)


Qwen2VLFormat = _format("qwen2_vl")
Qwen2_5_VLFormat = _format("qwen2_5_vl")
