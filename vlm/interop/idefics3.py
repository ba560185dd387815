"""transformers ``Idefics3ForConditionalGeneration`` and ``SmolVLMForConditionalGeneration`` <-> ``vlm.VLM``, weight
for weight (one architecture, two registrations: ``idefics3`` and ``smolvlm``; ``to_hf`` without ``format`` writes the
one a model was imported from (``model.source_format``), else tries formats in name order: a model built by vlm is
written as Idefics3 unless ``format="smolvlm"``).

| Idefics3 / SmolVLM                                    | vlm                                                        |
| ----------------------------------------------------- | ---------------------------------------------------------- |
| ``model.vision_model`` (``Idefics3VisionTransformer``) | ``idefics3_vision`` encoder (``post_layernorm=True``)      |
| ``model.connector`` (pixel shuffle + ``proj``, no bias) | ``pixel_shuffle_mlp`` (``scale = 1/scale_factor``, ``head='linear'``) |
| ``model.text_model`` + ``lm_head``                    | ``hf_causal_lm``                                           |
| image processor (``longest_edge``, splitting)         | the ``idefics3`` image layout (``vlm.data.layouts.idefics3``) |
| processor ``pixel_values (B, N, 3, S, S)`` + ``pixel_attention_mask`` | taken whole (``VLM.real_views``)        |

No arrangement: an image's tokens are its views' (crops row-major, then the global image), each view's
``(S / patch / scale_factor)^2`` tokens; the text between them (``<row_1_col_1>``, ...) is the layout's
(``Layout.image_text``), so vlm's processor writes the prompt Idefics3's processor writes. Only local directories are
read; weights come from safetensors (or ``torch.load(weights_only=True)``); no remote code is ever run.
"""
from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch

from vlm import connectors
from vlm.connectors.pixel_shuffle_mlp import PixelShuffleMLP
from vlm.data.layouts.idefics3 import FAKE_TOKEN, GLOBAL_TOKEN
from vlm.encoders.idefics3_vision import Idefics3VisionEncoder
from vlm.interop import common
from vlm.interop.formats import FORMATS, HFFormat
from vlm.interop.processor import pixel_options
from vlm.model import VLM
from vlm.pretrained import CONFIG_FILE

#: Idefics3 / SmolVLM image processors resample with Lanczos (``PILImageResampling.LANCZOS``)
LANCZOS = 1


class Family(NamedTuple):
    """One registration: ``config.json``'s ``model_type`` and transformers' class names."""

    model_type: str
    hf_class: str
    config_class: str
    processor_class: str
    image_processor_class: str
    #: the video processor the processor class requires (``None``: it takes none)
    video_processor_class: str | None = None


IDEFICS3 = Family("idefics3", "Idefics3ForConditionalGeneration", "Idefics3Config", "Idefics3Processor",
                  "Idefics3ImageProcessorPil")
SMOLVLM = Family("smolvlm", "SmolVLMForConditionalGeneration", "SmolVLMConfig", "SmolVLMProcessor",
                 "SmolVLMImageProcessorPil", "SmolVLMVideoProcessor")


def _hf(name: str) -> Any:
    import transformers

    return getattr(transformers, name)


# ----------------------------------------------------------------------------------------------------- import
def check_geometry(config: Any, where: str) -> None:
    """``ValueError`` naming the config keys when the tower cannot take its crops (``image_size`` not a multiple of
    ``patch_size``) or ``scale_factor`` does not divide the patch grid."""
    vc, k = config.vision_config, int(config.scale_factor)
    if vc.image_size % vc.patch_size:
        raise ValueError(f"{where}: vision_config.image_size={vc.image_size} is not a multiple of "
                         f"vision_config.patch_size={vc.patch_size}: the tower cannot take its {vc.image_size} px crops")
    n = vc.image_size // vc.patch_size
    if k < 1 or n % k:
        raise ValueError(f"{where}: scale_factor={config.scale_factor} does not divide the {n}x{n} patch grid "
                         f"(vision_config.image_size {vc.image_size} / patch_size {vc.patch_size}); expected a divisor "
                         f"of {n}")


def preprocessing_reader(image_size: int) -> common.PreprocessingReader:
    """Reads an Idefics3 / SmolVLM image-processor config into the ``idefics3`` tiling record (``longest_edge``,
    ``do_image_splitting``); ``ValueError`` naming the file when its crop size (``max_image_size``) is not the
    tower's ``image_size``; warns when it resamples other than Lanczos or does not resize (vlm then differs)."""

    def read(config: dict[str, Any] | None, _: int, where: str) -> dict[str, Any]:
        cls = None
        if config and str(config.get("image_processor_type") or "").isidentifier():
            import transformers

            cls = getattr(transformers, str(config["image_processor_type"]), None)

        def get(key: str, default: Any) -> Any:
            if config and key in config:
                return config[key]
            return getattr(cls, key, default)

        crop = (get("max_image_size", None) or {}).get("longest_edge", image_size)
        if int(crop) != image_size:
            raise ValueError(f"from_hf: {where} has max_image_size.longest_edge={crop}, but the tower takes "
                             f"{image_size} px crops (vision_config.image_size); expected {image_size}")
        edge = (get("size", None) or {}).get("longest_edge", 4 * image_size)
        if get("resample", LANCZOS) not in (LANCZOS, None) or get("do_resize", True) is False:
            warnings.warn(f"from_hf: {where} resamples with {get('resample', None)} (do_resize="
                          f"{get('do_resize', True)}); vlm's idefics3 layout resizes with Lanczos, so its pixels "
                          f"approximate these", stacklevel=3)
        return {"resize_mode": "resize",
                "tiling": {"kind": "idefics3", "longest_edge": int(edge),
                           "split": bool(get("do_image_splitting", True))}}

    return read


def from_hf(path: str | os.PathLike, *, family: Family = SMOLVLM, dtype: str | torch.dtype | None = None,
            tokenizer: bool = True, attn_implementation: str = "sdpa") -> VLM:
    """Import a local transformers ``Idefics3ForConditionalGeneration`` / ``SmolVLMForConditionalGeneration``
    directory as a ``vlm.VLM`` (eval mode); ``model.image_preprocessing`` records the ``idefics3`` tiling of its
    image processor, so ``Processor.for_model`` (and ``model.chat``) writes the family's prompt and pixels.
    ``ValueError`` naming the config key for geometry vlm's parts refuse (``check_geometry``)."""
    path = Path(path)
    hf_class = _hf(family.hf_class)
    config = common.read_hf_config(path, _hf(family.config_class), family.model_type, hf_class)
    where = f"from_hf: {str(path / CONFIG_FILE)!r}"
    check_geometry(config, where)
    hf, torch_dtype = common.load_checkpoint(hf_class, path, dtype)
    vision_cfg = common.arch_config(config.vision_config)
    vision_cfg.pop("model_type", None)
    encoder, ip_config, ip_file = common.import_encoder(path, _hf("Idefics3VisionConfig"), {
        "name": "idefics3_vision", "config": vision_cfg, "attn_implementation": attn_implementation,
        "dtype": common.dtype_name(torch_dtype)})
    lm = common.import_llm(config.text_config, common.is_tied(hf), attn_implementation, torch_dtype)
    connector = connectors.build({"name": "pixel_shuffle_mlp", "scale": 1 / int(config.scale_factor),
                                  "head": "linear", "bias": False},
                                 in_dim=encoder.hidden_size, out_dim=lm.hidden_size).to(torch_dtype)
    with torch.no_grad():
        common.copy_state(encoder.model, hf.model.vision_model.state_dict(), "from_hf: vision tower")
        common.copy_projector(connector, hf.model.connector.modality_projection, {"layers.0": "proj"}, to_hf=False)
        copy_language_model(lm, hf, to_hf=False)
    del hf
    return common.assemble(path, config, encoder, connector, lm, image_token_id=int(config.image_token_id),
                           tokenizer=tokenizer, image_processor=ip_config, image_processor_file=ip_file,
                           preprocessing=preprocessing_reader(int(encoder.image_size)))


def copy_language_model(lm: Any, hf: Any, to_hf: bool) -> None:
    """The LLM <-> ``hf.model.text_model`` + ``hf.lm_head`` (Idefics3 names its language model ``text_model``)."""
    pairs = ((lm.model.base_model, hf.model.text_model, "language model"),
             (lm.model.get_output_embeddings(), hf.lm_head, "lm_head"))
    for ours, theirs, what in pairs:
        src, dst = (ours, theirs) if to_hf else (theirs, ours)
        common.copy_state(dst, src.state_dict(), f"{'to_hf' if to_hf else 'from_hf'}: {what}")


# ----------------------------------------------------------------------------------------------------- export
def idefics3_problems(model: VLM, family: Family = SMOLVLM) -> list[str]:
    """Why ``model`` cannot be written as an Idefics3 / SmolVLM checkpoint (empty when it can)."""
    problems = []
    enc, conn, lm = model.encoder, model.connector, model.llm
    name = family.hf_class
    if not isinstance(enc, Idefics3VisionEncoder):
        problems.append(f"the encoder is {common.part_name(enc)!r}; {name}'s tower is 'idefics3_vision'")
    elif not enc.post_layernorm:
        problems.append(f"the idefics3_vision encoder has post_layernorm=False; {name} reads the last layer through "
                        f"post_layernorm")
    if not isinstance(conn, PixelShuffleMLP):
        problems.append(f"the connector is {common.part_name(conn)!r}; {name}'s is 'pixel_shuffle_mlp' with "
                        f"head='linear'")
    elif (conn.options.get("head"), bool(conn.options.get("bias")), conn.options.get("reducer")) != \
            ("linear", False, "shuffle"):
        problems.append(f"the pixel_shuffle_mlp connector has head={conn.options.get('head')!r}, bias="
                        f"{conn.options.get('bias')!r}, reducer={conn.options.get('reducer')!r}; {name}'s connector "
                        f"is a shuffle + one Linear without bias (head='linear', bias=false, reducer='shuffle')")
    tiling = (getattr(model, "image_preprocessing", None) or {}).get("tiling") or {}
    if tiling.get("kind") != "idefics3":
        problems.append(f"the model's image layout is {tiling.get('kind')!r}; {name}'s processor splits images as the "
                        f"'idefics3' layout does (tiling: {{kind: idefics3}})")
    return problems + common.lm_problems(lm, family.hf_class.removesuffix("ForConditionalGeneration"), name)


def idefics3_config(model: VLM, family: Family = SMOLVLM) -> Any:
    """The ``Idefics3Config`` / ``SmolVLMConfig`` describing ``model`` (``ValueError`` listing what it cannot
    express)."""
    common.refuse_export(idefics3_problems(model, family), family.hf_class)
    enc, conn, lm = model.encoder, model.connector, model.llm
    vision = common.arch_config(enc.hf_config)
    vision.pop("model_type", None)
    return _hf(family.config_class)(vision_config=vision, text_config=common.text_config_for_export(lm, model),
                                    scale_factor=int(conn.factor), image_token_id=int(model.image_token_id),
                                    tie_word_embeddings=common.is_tied(lm.model))


def to_hf(model: VLM, path: str | os.PathLike, *, family: Family = SMOLVLM, dtype: str | torch.dtype | None = None,
          processor: bool = True) -> Path:
    """Write ``model`` as a transformers ``family`` directory (safetensors) and return it; with ``processor``
    (default) also its processor (``save_idefics3_processor``)."""
    config = idefics3_config(model, family)
    out = Path(path)
    hf = common.new_hf_model(config, _hf(family.hf_class), common.export_dtype(model.llm, dtype))
    with torch.no_grad():
        common.copy_state(hf.model.vision_model, model.encoder.model.state_dict(), "to_hf: vision tower")
        common.copy_projector(model.connector, hf.model.connector.modality_projection, {"layers.0": "proj"},
                              to_hf=True)
        copy_language_model(model.llm, hf, to_hf=True)
    common.check_tying(model.llm, hf, family.hf_class)
    common.save_hf(hf, model, out)
    del hf
    if processor:
        save_idefics3_processor(model, out, family)
    return out


def save_idefics3_processor(model: VLM, path: Path, family: Family = SMOLVLM) -> bool:
    """Write the family's processor: its PIL image processor with the model's ``idefics3`` tiling (``longest_edge``,
    ``do_image_splitting``, crops of the tower's size, Lanczos, the encoder's mean/std), the tokenizer, the chat
    template and ``image_seq_len``. Without a tokenizer, or one that lacks the family's tokens as single ids (the
    processor would add them, growing the vocabulary past the embeddings), only the image processor is written, with
    a warning saying why. Returns whether the full processor was written."""
    enc = model.encoder
    s = int(enc.image_size)
    tiling = model.image_preprocessing["tiling"]
    image_processor = _hf(family.image_processor_class)(
        size={"longest_edge": int(tiling.get("longest_edge") or 4 * s)}, max_image_size={"longest_edge": s},
        do_image_splitting=bool(tiling.get("split", True)), do_resize=True, do_pad=True,
        **{**pixel_options(enc), "resample": LANCZOS})
    tok = model.tokenizer
    missing = [] if tok is None else [t for t in (FAKE_TOKEN, GLOBAL_TOKEN, model.image_token, "<end_of_utterance>")
                                      if len(tok.encode(t, add_special_tokens=False)) != 1]
    if tok is None or missing:
        image_processor.save_pretrained(str(path))
        why = "model.tokenizer is not set" if tok is None else f"the tokenizer lacks {missing} as single tokens"
        warnings.warn(f"to_hf: only the image processor written to {str(path)!r}: {why} ({family.processor_class} "
                      f"needs them)", stacklevel=3)
        return False
    tok = copy.deepcopy(tok)
    size = len(tok)
    extra = {}
    if family.video_processor_class is not None:
        extra["video_processor"] = _hf(family.video_processor_class)()
    try:
        proc = _hf(family.processor_class)(image_processor=image_processor, tokenizer=tok,
                                           image_seq_len=model.num_image_tokens(s),
                                           chat_template=getattr(tok, "chat_template", None), **extra)
    except ImportError as e:  # SmolVLMProcessor needs the num2words package
        image_processor.save_pretrained(str(path))
        tok.save_pretrained(str(path))
        warnings.warn(f"to_hf: no processor_config.json written to {str(path)!r}: transformers' "
                      f"{family.processor_class} cannot be built here ({e}); the image processor, tokenizer and chat "
                      f"template are written", stacklevel=3)
        return False
    if len(tok) != size:  # the processor added a token: ids would pass the embeddings
        raise RuntimeError(f"to_hf: {family.processor_class} added tokens to the tokenizer ({size} -> {len(tok)})")
    proc.save_pretrained(str(path))
    return True


# --------------------------------------------------------------------------------------------- registrations
@FORMATS.register("smolvlm")
class SmolVLMFormat(HFFormat):
    """transformers ``SmolVLMForConditionalGeneration`` (SmolVLM: Idefics3's architecture)."""

    model_type = SMOLVLM.model_type
    hf_class = SMOLVLM.hf_class

    @staticmethod
    def from_hf(path: str | os.PathLike, **kwargs: Any) -> VLM:
        return from_hf(path, family=SMOLVLM, **kwargs)

    @staticmethod
    def to_hf(model: VLM, path: str | os.PathLike, **kwargs: Any) -> Path:
        return to_hf(model, path, family=SMOLVLM, **kwargs)

    @staticmethod
    def problems(model: VLM) -> list[str]:
        return idefics3_problems(model, SMOLVLM)


@FORMATS.register("idefics3")
class Idefics3Format(HFFormat):
    """transformers ``Idefics3ForConditionalGeneration`` (Idefics3)."""

    model_type = IDEFICS3.model_type
    hf_class = IDEFICS3.hf_class

    @staticmethod
    def from_hf(path: str | os.PathLike, **kwargs: Any) -> VLM:
        return from_hf(path, family=IDEFICS3, **kwargs)

    @staticmethod
    def to_hf(model: VLM, path: str | os.PathLike, **kwargs: Any) -> Path:
        return to_hf(model, path, family=IDEFICS3, **kwargs)

    @staticmethod
    def problems(model: VLM) -> list[str]:
        return idefics3_problems(model, IDEFICS3)
