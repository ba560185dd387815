"""The steps every transformers format module shares (``vlm.interop.llava``, ``vlm.interop.blip2``,
``vlm.interop.internvl``): reading and validating a directory's config, loading its model strictly, building our
encoder / LLM from its sub-configs, copying weights both ways (projector layers, language model + ``lm_head``),
assembling the ``VLM`` with the directory's tokenizer, generation settings and image preprocessing, and on export
the config checks, embedding tying check and ``save_pretrained``.

Adding a family (e.g. ``vlm/interop/qwen2_vl.py``) is one new module built from these steps, no edit here:

- import (``from_hf(path, *, dtype, tokenizer, attn_implementation)``): ``read_hf_config`` (model_type checked,
  a ``ValueError`` naming ``config.json``), the family's own config checks, ``load_checkpoint`` (the transformers
  model, strict), ``import_encoder`` and ``import_llm`` (our components with the directory's architecture),
  ``connectors.build``, then ``copy_state`` / ``copy_projector`` / ``copy_language_model`` under ``torch.no_grad()``,
  and ``assemble`` (its ``image_token`` default, a ``prepare`` hook that adapts the tokenizer before the generation
  settings are read, and a ``preprocessing`` reader for the image-processor config are the family's parameters);
- export (``to_hf(model, path, *, dtype, processor)``): ``<family>_problems(model)`` (lists what the format cannot
  express; use ``lm_problems`` for the LLM), ``refuse_export``, the family's transformers config (LLM part:
  ``text_config_for_export``), ``new_hf_model``, the same copies with ``to_hf=True``, ``check_tying``, ``save_hf``,
  then the family's processor files (``vlm.interop.processor.save_processor`` takes any processor class);
- register it: ``@FORMATS.register(name)`` on an ``HFFormat`` subclass (``vlm.interop.formats``) and import the
  module in ``vlm/interop/__init__.py``; tests compare logits with the transformers class both ways.
"""
from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlm.dtypes import resolve_dtype
from vlm.generation import GENERATION_KEYS, generation_settings, read_settings
from vlm.hf_config import unknown_config_keys
from vlm.pretrained import CONFIG_FILE, FILE_KEYS, check_weights, read_config

GENERATION_FILE = "generation_config.json"
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")
LM_PREFIX = "model.language_model."


def arch_config(config: Any) -> dict[str, Any]:
    """A transformers (sub)config as a plain dict without file bookkeeping keys."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: v for k, v in d.items() if k not in FILE_KEYS}


def copy_state(dst: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``dst.load_state_dict(state)`` strictly; a mismatch names the component and the offending keys
    (``vlm.pretrained.load_strict``)."""
    from vlm.pretrained import load_strict as load_state_strict

    load_state_strict(dst, state, what)


def is_tied(model: nn.Module) -> bool:
    """Whether the output embeddings share storage with the input embeddings."""
    out = model.get_output_embeddings()
    return out is not None and out.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def short_list(items: Any, shown: int = 4) -> str:
    """``items`` (a list) for a message: the first ``shown`` entries, then how many there are in all, e.g.
    ``[[384, 768], [768, 384], ...] (36 in all)``; a list that short is shown whole."""
    items = list(items)
    if len(items) <= shown:
        return str(items)
    return str(items[:shown])[:-1] + f", ...] ({len(items)} in all)"


def part_name(part: Any) -> str:
    """A component's registry name (``clip``, ``mlp``, ...) for messages, else its class name."""
    return getattr(part, "registry_name", type(part).__name__)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def has_parameter(module: nn.Module, name: str) -> bool:
    try:
        module.get_parameter(name)
    except AttributeError:
        return False
    return True


def load_strict(hf_class: type, path: Path, dtype: torch.dtype, ignore_missing: Iterable[str] = ()) -> nn.Module:
    """``hf_class.from_pretrained`` (local files, ``weights_only``) in eval mode, strict: any missing or
    shape-mismatched weight is a ``ValueError`` naming the directory, except missing keys under the prefixes
    ``ignore_missing`` (modules the format never runs); unexpected weights only warn."""
    ignore = tuple(ignore_missing)
    hf, info = hf_class.from_pretrained(str(path), dtype=dtype, local_files_only=True, weights_only=True,
                                        output_loading_info=True)
    missing = sorted(k for k in info.get("missing_keys", []) if not (ignore and k.startswith(ignore)))
    mismatched = info.get("mismatched_keys", [])
    if missing or mismatched:
        raise ValueError(f"from_hf: the weights in {str(path)!r} do not match its config.json: missing "
                         f"{missing[:8]}, shape-mismatched {list(mismatched)[:8]}")
    if info.get("unexpected_keys"):
        warnings.warn(f"from_hf: ignoring unexpected weights in {str(path)!r}: "
                      f"{sorted(info['unexpected_keys'])[:8]}", stacklevel=3)
    return hf.eval()


def tying_problems(lm: Any, hf_class: Any, family: str) -> list[str]:
    """Why a tied LLM cannot be written as ``hf_class``: its ``lm_head`` is tied to a fixed parameter name of the
    language model (``embed_tokens``) that the LLM may not have."""
    problems = []
    if is_tied(lm.model):
        for source in (hf_class._tied_weights_keys or {}).values():  # None: the class ties nothing itself
            name = source.removeprefix(LM_PREFIX)
            if name != source and not has_parameter(lm.model.base_model, name):
                problems.append(f"the LLM ({lm.text_config.model_type}) ties its output embeddings, and transformers' "
                                f"{family} ties lm_head to language_model.{name}, which this model does not have; "
                                f"untie the embeddings (tie_word_embeddings=False) or use a Llama-style LLM")
    return problems


def lm_problems(lm: Any, family: str, hf_class_name: str) -> list[str]:
    """Why the LLM cannot be the language model of transformers' ``hf_class_name`` (``family`` names it in the
    messages): it must be a transformers causal LM (``hf_causal_lm``) whose tying the class can express."""
    from vlm.llm.hf_causal_lm import HFCausalLM

    if not isinstance(lm, HFCausalLM):
        return [f"the LLM is {type(lm).__name__}; {family} needs a transformers causal LM (hf_causal_lm)"]
    import transformers

    return tying_problems(lm, getattr(transformers, hf_class_name), family)


def load_tokenizer(path: Path, wanted: bool = True) -> Any:
    """The directory's tokenizer (``vlm.data.tokenizer.load_tokenizer``: local files only, no remote code, no
    prompt), or ``None`` when not ``wanted`` or absent."""
    if not wanted or not any((path / f).is_file() for f in TOKENIZER_FILES):
        return None
    from vlm.data.tokenizer import load_tokenizer as load

    return load(path)


def token_string(tokenizer: Any, token_id: int, default: str = "<image>") -> str:
    """The tokenizer's string for ``token_id`` (``default`` without a tokenizer or for an id past its end)."""
    if tokenizer is not None and token_id < len(tokenizer):
        return tokenizer.convert_ids_to_tokens(token_id) or default
    return default


def read_generation(path: Path, config: Any, tokenizer: Any) -> dict[str, Any]:
    """The directory's generation settings: ``generation_config.json``, else the text config's ids, else the
    tokenizer's (``vlm.generation``); a source's missing keys are filled from the next one."""
    sources = []
    if (path / GENERATION_FILE).is_file():
        try:
            sources.append(read_settings(json.loads((path / GENERATION_FILE).read_text())))
        except json.JSONDecodeError as e:
            raise ValueError(f"from_hf: {str(path / GENERATION_FILE)!r} is not valid JSON ({e})") from e
    sources += [read_settings(config.text_config), generation_settings(tokenizer)]
    out: dict[str, Any] = {}
    for settings in sources:
        for key, value in settings.items():
            out.setdefault(key, value)
    return out


def export_generation(model: Any) -> dict[str, Any]:
    """The generation settings an export carries: ``model.generation`` (else the tokenizer's), every key present
    (``None`` where unknown, overriding the LLM config's own ids, which need not match the tokenizer)."""
    settings = model.generation or generation_settings(model.tokenizer)
    return {key: settings.get(key) for key in GENERATION_KEYS}


def text_config_for_export(lm: Any, model: Any) -> dict[str, Any]:
    """The LLM's config as an exported ``text_config``: its grown ``vocab_size``, the actual embedding tying and the
    generation ids (where serving engines read eos / pad / bos)."""
    text_cfg = arch_config(lm.text_config)
    text_cfg["vocab_size"] = lm.vocab_size
    text_cfg["tie_word_embeddings"] = is_tied(lm.model)
    text_cfg.update(export_generation(model))
    return text_cfg


def save_hf(hf: nn.Module, model: Any, out: Path) -> None:
    """Set ``hf``'s generation config from ``model`` (what ``generate()`` uses) and ``save_pretrained`` it to
    ``out`` (safetensors)."""
    for key, value in export_generation(model).items():
        setattr(hf.generation_config, key, value)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out), safe_serialization=True)


# ------------------------------------------------------------------------------------------------ import steps
def read_hf_config(path: Path, config_class: type, model_type: str, hf_class: type, hint: str = "") -> Any:
    """The directory's ``config.json`` as a ``config_class`` (e.g. ``LlavaConfig``). ``ValueError`` naming the file
    when it is missing or not JSON, when its ``model_type`` is not ``model_type`` (the message names ``hf_class``,
    says so when the directory is a vlm one, and ends with ``hint``), or when ``config_class`` rejects it."""
    cfg_file = str(path / CONFIG_FILE)
    raw = read_config(path, "from_hf", f"the config.json of a transformers {hf_class.__name__} (model_type "
                                       f"'{model_type}') saved with save_pretrained")
    if raw.get("model_type") != model_type:
        ours = " (it is a vlm directory: use vlm.load, or to_hf to export it)" if raw.get("format") == "vlm" else ""
        raise ValueError(f"from_hf: {cfg_file!r} has model_type={raw.get('model_type')!r}; expected "
                         f"'{model_type}' ({hf_class.__name__}){ours}{hint}")
    try:
        return config_class.from_dict(raw)
    except Exception as e:  # transformers' strict config validation has its own exception types
        raise ValueError(f"from_hf: {cfg_file!r} is not a valid {config_class.__name__}: {e}") from e


def load_checkpoint(hf_class: type, path: Path, dtype: str | torch.dtype | None,
                    ignore_missing: Iterable[str] = ()) -> tuple[nn.Module, torch.dtype]:
    """``(the directory's hf_class model, the import dtype)``: ``dtype`` resolved (default float32), the weight files
    checked to exist (``vlm.pretrained.check_weights``), then ``load_strict``."""
    torch_dtype = resolve_dtype(dtype) or torch.float32
    check_weights(path, "from_hf")
    return load_strict(hf_class, path, torch_dtype, ignore_missing), torch_dtype


def import_encoder(path: Path, config_class: type | None, enc_cfg: dict[str, Any]
                   ) -> tuple[Any, dict[str, Any] | None, Path]:
    """Build the encoder ``enc_cfg`` describes (its ``config`` a dict of ``config_class``; ``None``: an encoder
    built from its own arguments, no transformers config), with the image mean/std of the directory's
    image-processor config when it has one. Returns ``(encoder, image-processor config or None, its file)``. The
    directory's config.json is trusted: keys a newer transformers dropped do not stop the import (the encoder then
    exports ``strict_config=False``, so ``vlm.load`` of the result accepts them too)."""
    from vlm import encoders
    from vlm.pretrained import normalization, read_image_processor_config

    enc_cfg = dict(enc_cfg)
    image_processor, image_processor_file = read_image_processor_config(path) or (None, path)
    norm = normalization(image_processor)
    if norm is not None:
        enc_cfg["image_mean"], enc_cfg["image_std"] = norm
    if config_class is not None and unknown_config_keys(config_class, enc_cfg["config"]):
        enc_cfg["strict_config"] = False
    return encoders.build(enc_cfg), image_processor, image_processor_file


def import_llm(text_config: Any, tied: bool, attn_implementation: str, dtype: torch.dtype) -> Any:
    """An ``hf_causal_lm`` with the architecture of ``text_config``, its embeddings tied as the loaded model's are
    (``tied``: what transformers actually did, whatever the flags say)."""
    from vlm import llm as llms

    text_cfg = arch_config(text_config)
    text_cfg["tie_word_embeddings"] = tied
    lm_cfg: dict[str, Any] = {"name": "hf_causal_lm", "config": text_cfg, "attn_implementation": attn_implementation,
                              "dtype": dtype_name(dtype)}
    if unknown_config_keys(type(text_config), text_cfg):
        lm_cfg["strict_config"] = False
    return llms.build(lm_cfg)


#: reads a transformers image-processor config (or ``None``) for an encoder of ``image_size`` px into the model's
#: ``image_preprocessing`` record; the third argument names the file in warnings
PreprocessingReader = Callable[[dict[str, Any] | None, int, str], dict[str, Any]]


def assemble(path: Path, config: Any, encoder: Any, connector: Any, lm: Any, *, image_token_id: int,
             tokenizer: bool, image_processor: dict[str, Any] | None, image_processor_file: Path,
             image_token: str = "<image>", prepare: Callable[[Any], None] | None = None,
             preprocessing: PreprocessingReader | None = None, arrangement: Any = None,
             video_token_id: int | None = None) -> Any:
    """The imported ``vlm.VLM`` (eval mode) with the directory's tokenizer (``tokenizer=False``: none), generation
    settings and image preprocessing.

    ``image_token``: the placeholder's string when the tokenizer has none for ``image_token_id``. ``prepare(model)``
    runs once the model holds its tokenizer, before the generation settings are read from it (a family's checks of
    the model against the directory, or its chat template rewritten to vlm's convention). ``preprocessing``
    (default ``vlm.interop.processor.read_preprocessing``: resize / crop / pad, so ``Processor.for_model``
    preprocesses as the source did) reads the image-processor config for the encoder's image size. ``arrangement``:
    how each image's view tokens are arranged (``vlm.arrangements``; LLaVA-NeXT's ``anyres_grid``).
    ``video_token_id``: the video placeholder of a model that takes videos (its string from the tokenizer, else
    ``<video>``)."""
    from vlm.interop.processor import read_preprocessing
    from vlm.model import VLM

    tok = load_tokenizer(path, tokenizer)
    model = VLM(encoder, connector, lm, image_token_id=image_token_id,
                image_token=token_string(tok, image_token_id, image_token), arrangement=arrangement,
                video_token_id=video_token_id,
                video_token=token_string(tok, video_token_id, "<video>") if video_token_id is not None else "<video>")
    model.tokenizer = tok
    if prepare is not None:
        prepare(model)
    model.generation = read_generation(path, config, tok)
    read = preprocessing or read_preprocessing
    model.image_preprocessing = read(image_processor, int(encoder.image_size), str(image_processor_file))
    return model.eval()


def copy_projector(connector: nn.Module, projector: nn.Module, layers: dict[str, str], to_hf: bool) -> None:
    """Copy the projector weights into (``to_hf``) or out of a transformers projector module ``projector``:
    ``layers`` maps each of our submodules in ``connector`` (e.g. ``"layers.0"``) to its name in ``projector``
    (e.g. ``"linear_1"``); a missing or extra weight on the receiving side is an error."""
    if to_hf:
        state = connector.state_dict()
        theirs = {f"{name}.{k.removeprefix(ours + '.')}": v for ours, name in layers.items()
                  for k, v in state.items() if k.startswith(ours + ".")}
        copy_state(projector, theirs, "to_hf: projector")
    else:
        ours = {f"{mine}.{k}": v for mine, name in layers.items()
                for k, v in getattr(projector, name).state_dict().items()}
        copy_state(connector, ours, "from_hf: projector")


def copy_language_model(lm: Any, hf: nn.Module, to_hf: bool) -> None:
    """Copy the LLM's weights into (``to_hf``) or out of a transformers ``*ForConditionalGeneration`` ``hf`` whose
    language model is ``hf.model.language_model`` and output layer ``hf.lm_head``."""
    pairs = ((lm.model.base_model, hf.model.language_model, "language model"),
             (lm.model.get_output_embeddings(), hf.lm_head, "lm_head"))
    for ours, theirs, what in pairs:
        src, dst = (ours, theirs) if to_hf else (theirs, ours)
        copy_state(dst, src.state_dict(), f"{'to_hf' if to_hf else 'from_hf'}: {what}")


# ------------------------------------------------------------------------------------------------ export steps
def refuse_export(problems: list[str], family: str) -> None:
    """``ValueError`` listing ``problems`` (a format's ``problems(model)``) when there are any."""
    if problems:
        raise ValueError(f"to_hf: this model cannot be exported as transformers {family}: " + "; ".join(problems))


def export_dtype(lm: nn.Module, dtype: str | torch.dtype | None) -> torch.dtype:
    """The dtype of the written weights: ``dtype``, else the LLM's."""
    return resolve_dtype(dtype) or next(lm.parameters()).dtype


def warn_fixed_size(encoder: Any, config_class: str) -> None:
    """Warn when the encoder interpolates its position embeddings, which ``config_class`` cannot state."""
    if getattr(encoder, "interpolate_pos_encoding", False):
        warnings.warn(f"to_hf: the encoder's interpolate_pos_encoding=True has no {config_class} field; the exported "
                      f"model takes only the native {encoder.image_size}x{encoder.image_size} images (its image "
                      f"processor resizes to that size), where its logits are identical", stacklevel=3)


def new_hf_model(config: Any, hf_class: type, dtype: torch.dtype) -> nn.Module:
    """A randomly initialised transformers model for ``config`` in ``dtype`` (``AutoModelForImageTextToText``, the
    public API), which must be a ``hf_class``."""
    from transformers import AutoModelForImageTextToText

    hf = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    if not isinstance(hf, hf_class):
        raise TypeError(f"to_hf: transformers built {type(hf).__name__} for {type(config).__name__}, expected "
                        f"{hf_class.__name__}")
    return hf


def check_tying(lm: Any, hf_lm: nn.Module, family: str) -> None:
    """``RuntimeError`` when the exported language model ``hf_lm`` does not tie its embeddings as ``lm`` does."""
    if is_tied(lm.model) != is_tied(hf_lm):
        raise RuntimeError(f"to_hf: embedding tying differs after export (vlm tied={is_tied(lm.model)}, "
                           f"{family} tied={is_tied(hf_lm)})")
