"""Processor files of an exported InternVL directory: ``InternVLProcessor`` = ``GotOcr2ImageProcessorPil`` (squash
to the tile size; with tiling, InternVL's dynamic tiles + thumbnail: ``crop_to_patches``, ``min_patches``,
``max_patches``), the tokenizer with its named image tokens (``start_image_token`` ``<img>``, ``end_image_token``
``</img>``, ``context_image_token`` = the model's image token), and the chat template.

``InternVLProcessor`` writes ``<img>`` + context token x (``image_seq_length`` x tiles) + ``</img>`` wherever the
prompt holds the context token; a vlm chat template writes each image as ``<img>`` + context token + ``</img>`` (the
markers as text, the token expanded in place by vlm's ``Processor``). The two conventions convert into each other:

- import (:func:`import_chat_template`): a directory served by ``InternVLProcessor`` gets each context token its
  template writes wrapped in the tokenizer's ``start_image_token`` / ``end_image_token``, as the processor does;
- export (:func:`served_chat_template`): the model's template gets each ``<img><IMG_CONTEXT></img>`` written as the
  context token alone, for ``InternVLProcessor`` to expand.

How a template writes an image is read by rendering a probe message with it (``image_rendering``), and each rewrite
is checked by rendering probe conversations (``PROBES``: one image, two in one turn, an image after text, a new
image in a later turn, a text-only turn, a system message) with both templates. The exported processor's PIL
backend gives vlm's pixels exactly: load it with ``AutoProcessor.from_pretrained(dir, backend="pil")``
(transformers' default torchvision backend rounds bicubic resizes differently).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from vlm.data.templates.jinja import image_rendering, render_messages
from vlm.interop.processor import BICUBIC, pixel_options
from vlm.persistence import DEFAULT_IMAGE_PREPROCESSING
from vlm.pretrained import PROCESSOR_CONFIG

START, END, VIDEO = "<img>", "</img>", "<video>"
#: the named tokens ``InternVLProcessor`` reads from the tokenizer (written into ``tokenizer_config.json``)
NAMED_TOKENS = ("start_image_token", "end_image_token", "context_image_token", "video_token")
PROCESSOR_CLASS = "InternVLProcessor"
LEGACY_CHAT_TEMPLATE = "chat_template.json"  # a processor's chat template before chat_template.jinja
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def _user(*parts: str | None) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "image"} if p is None else {"type": "text", "text": p}
                                        for p in parts]}


def _assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


#: ``(messages, add_generation_prompt)`` a chat-template rewrite is checked on (``None`` parts are images)
PROBES: list[tuple[list[dict[str, Any]], bool]] = [
    ([_user(None, "what is this")], True),
    ([_user(None, None, "compare them")], True),
    ([_user("look at", None)], True),
    ([_user(None, "first"), _assistant("one"), _user(None, "second")], True),
    ([_user(None, "first"), _assistant("one"), _user("no image now")], True),
    ([{"role": "system", "content": [{"type": "text", "text": "be brief"}]}, _user(None, "q"), _assistant("a")],
     False),
    ([_user("text only")], False),
]


def _named(tokenizer: Any, name: str, default: str) -> str:
    value = getattr(tokenizer, name, None)
    return value if isinstance(value, str) and value else default


def same_up_to_markers(tokenizer: Any, bare: str, marked: str, image_token: str, start: str, end: str) -> bool:
    """Whether chat template ``marked`` renders every probe conversation (``PROBES``) as ``bare`` does with each
    ``image_token`` wrapped in ``start`` / ``end``, and both write images (``image_rendering``)."""
    if image_rendering(tokenizer, bare, image_token) is None or image_rendering(tokenizer, marked,
                                                                                image_token) is None:
        return False
    try:
        for messages, agp in PROBES:
            want = render_messages(tokenizer, bare, messages, agp).replace(image_token, start + image_token + end)
            if render_messages(tokenizer, marked, messages, agp) != want:
                return False
    except Exception:  # noqa: BLE001 - a template rejecting a probe (e.g. a system message) cannot be checked
        return False
    return True


def served_chat_template(tokenizer: Any, template: str | None, image_token: str) -> tuple[str | None, str | None]:
    """``(chat template for InternVLProcessor, None)`` or ``(None, why not)``: ``template`` (a vlm model's, which
    writes each image as ``<img>`` + ``image_token`` + ``</img>``) with the markers left to the processor."""
    if not template:
        return None, "the tokenizer has no chat template"
    rendering = image_rendering(tokenizer, template, image_token)
    if rendering is None:
        return None, (f"the chat template writes no {image_token} for an image part ({{'type': 'image'}}); "
                      f"InternVLProcessor places each image at that token")
    marked = f"{START}{image_token}{END}"
    if marked not in rendering:
        return None, (f"the chat template writes an image as {rendering!r}, without {START}/{END} around "
                      f"{image_token}, while InternVLProcessor adds them (train with a template whose "
                      f"image_start/image_end are {START}/{END})")
    bare = template.replace(marked, image_token)
    if not same_up_to_markers(tokenizer, bare, template, image_token, START, END):
        return None, (f"the chat template's images could not be rewritten as {image_token} alone (rendering probe "
                      f"conversations with the rewritten template gave different text)")
    return bare, None


def processor_class(path: Path) -> str | None:
    """The ``processor_class`` a directory's ``processor_config.json`` (else ``tokenizer_config.json``) names."""
    for name in (PROCESSOR_CONFIG, "tokenizer_config.json"):
        f = path / name
        if f.is_file():
            try:
                found = json.loads(f.read_text()).get("processor_class")
            except (json.JSONDecodeError, AttributeError):
                continue
            if found:
                return found
    return None


def check_image_seq_length(path: Path, tokens_per_tile: int) -> None:
    """Warn when ``path``'s ``InternVLProcessor`` writes another number of context tokens per tile
    (``image_seq_length``, 256 when ``processor_config.json`` gives none) than the model takes."""
    if processor_class(path) != PROCESSOR_CLASS:
        return
    f = path / PROCESSOR_CONFIG
    try:
        written = json.loads(f.read_text()).get("image_seq_length", 256) if f.is_file() else 256
    except (json.JSONDecodeError, AttributeError):
        return
    if written != tokens_per_tile:
        warnings.warn(f"from_hf: the InternVLProcessor of {str(path)!r} writes image_seq_length={written} tokens "
                      f"per tile ({PROCESSOR_CONFIG}), but the model takes {tokens_per_tile}; transformers cannot "
                      f"run the directory's own processor with its model, vlm uses {tokens_per_tile}", stacklevel=3)


def processor_chat_template(path: Path, tokenizer: Any) -> str | None:
    """The chat template ``AutoProcessor`` gives the directory's processor: ``processor_config.json``'s
    ``chat_template``, else the legacy ``chat_template.json``, else ``chat_template.jinja``, else the tokenizer's."""
    found = None
    for name in (PROCESSOR_CONFIG, LEGACY_CHAT_TEMPLATE):
        f = path / name
        if f.is_file() and found is None:
            try:
                found = json.loads(f.read_text()).get("chat_template")
            except (json.JSONDecodeError, AttributeError) as e:
                raise ValueError(f"from_hf: {str(f)!r} is not a JSON object ({e})") from e
    if isinstance(found, dict):  # several named templates: the processor renders with "default"
        found = found.get("default")
    if not found and (path / CHAT_TEMPLATE_FILE).is_file():
        found = (path / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    return found or getattr(tokenizer, "chat_template", None)


def import_chat_template(path: Path, tokenizer: Any, image_token: str) -> None:
    """Give ``tokenizer`` the chat template of ``path``'s ``InternVLProcessor`` in vlm's convention: each
    ``image_token`` it writes wrapped in the tokenizer's ``start_image_token`` / ``end_image_token`` (what the
    processor adds when it expands the token), so ``model.chat`` builds the prompt transformers builds. Directories
    without an ``InternVLProcessor`` keep their template. Warns (naming the directory) when the template writes no
    ``image_token`` per image or the rewrite does not render as the processor would."""
    if tokenizer is None or processor_class(path) != PROCESSOR_CLASS:
        return
    template = processor_chat_template(path, tokenizer)
    if not template:
        return
    start, end = _named(tokenizer, "start_image_token", START), _named(tokenizer, "end_image_token", END)
    context = _named(tokenizer, "context_image_token", image_token)
    where = f"from_hf: the chat template of {str(path)!r}"
    if context != image_token:
        warnings.warn(f"{where}: the tokenizer's context_image_token is {context!r}, but config.json's "
                      f"image_token_id is {image_token!r}; chat places images at {image_token!r}", stacklevel=3)
    tokenizer.chat_template = template
    rendering = image_rendering(tokenizer, template, image_token)
    if rendering is None:
        warnings.warn(f"{where} writes no {image_token} for an image part ({{'type': 'image'}}), so "
                      f"InternVLProcessor finds no place for an image; chat places images itself", stacklevel=3)
        return
    marked = template.replace(image_token, start + image_token + end)
    if not same_up_to_markers(tokenizer, template, marked, image_token, start, end):
        warnings.warn(f"{where} writes images as {rendering!r}, and wrapping {image_token} in {start}/{end} in it "
                      f"does not render as InternVLProcessor's prompt; model.chat may build a different prompt",
                      stacklevel=3)
        return
    tokenizer.chat_template = marked


def read_tiling(config: dict[str, Any] | None, image_size: int, where: str, always_crops: bool = False
                ) -> dict[str, Any]:
    """The ``image_preprocessing`` record of a GotOcr2 / InternVL image-processor ``config``: ``resize`` to the tile
    size, plus ``tiling`` (dynamic, thumbnail on) when ``crop_to_patches`` (or ``always_crops``: an
    ``InternVLProcessor`` passes ``crop_to_patches=True`` on every call, whatever the config says) and
    ``max_patches > 1``. Warns (naming ``where``) about a size other than the tower's or a non-bicubic resample."""
    if not config:
        return dict(DEFAULT_IMAGE_PREPROCESSING)
    size = config.get("size") or {}
    side = size.get("height") if isinstance(size, dict) else size
    if side is not None and (int(side) != image_size or (isinstance(size, dict) and size.get("width") != side)):
        warnings.warn(f"from_hf: {where} resizes to {size}, not the tower's {image_size} x {image_size}; vlm "
                      f"uses {image_size}", stacklevel=3)
    if config.get("resample") is not None and int(config["resample"]) != BICUBIC:
        warnings.warn(f"from_hf: {where} has resample={config['resample']}; vlm resizes bicubic", stacklevel=3)
    record: dict[str, Any] = dict(DEFAULT_IMAGE_PREPROCESSING)
    lo, hi = int(config.get("min_patches", 1)), int(config.get("max_patches", 12))
    if (config.get("crop_to_patches") or always_crops) and hi > 1:
        record["tiling"] = {"kind": "dynamic", "min_tiles": lo, "max_tiles": hi, "thumbnail": True}
    return record


def processor_problems(model: Any) -> list[str]:
    """Why the exported ``InternVLProcessor`` could not preprocess as vlm does (empty when it can)."""
    problems = []
    record = getattr(model, "image_preprocessing", None) or DEFAULT_IMAGE_PREPROCESSING
    if record.get("resize_mode", "resize") != "resize":
        problems.append(f"resize_mode={record['resize_mode']!r}: InternVL's image processor squashes ('resize')")
    tiling = record.get("tiling")
    if tiling is not None and (tiling.get("kind") != "dynamic" or not tiling.get("thumbnail", True)):
        problems.append(f"tiling={tiling}: InternVL's image processor does dynamic tiling with a thumbnail only")
    tok = model.tokenizer
    if tok is None:
        return problems + ["model.tokenizer is not set"]
    if not getattr(tok, "loads_in_transformers", True):
        problems.append(f"the tokenizer is vlm's {type(tok).__name__} (read from remote-code tokenizer files), which "
                        f"transformers' AutoTokenizer does not load; its files are written for vlm.load")
    for token in (START, END, model.image_token):
        ids = tok.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            problems.append(f"the tokenizer encodes {token!r} as {ids}, not one token")
    why = served_chat_template(tok, tok.chat_template, model.image_token)[1]
    return problems + ([why] if why else [])


def hf_image_processor(model: Any) -> Any:
    """The ``GotOcr2ImageProcessorPil`` computing vlm's pixels for ``model`` (tile size, mean/std, tiling)."""
    from transformers import GotOcr2ImageProcessorPil

    enc = model.encoder
    size = int(enc.image_size)
    tiling = (getattr(model, "image_preprocessing", None) or {}).get("tiling")
    # InternVLProcessor crops whatever crop_to_patches says; max_patches=1 is what keeps an image one tile
    extra = {"crop_to_patches": False, "min_patches": 1, "max_patches": 1}
    if tiling is not None:
        extra = {"crop_to_patches": True, "min_patches": int(tiling.get("min_tiles", 1)),
                 "max_patches": int(tiling.get("max_tiles", 12))}
    return GotOcr2ImageProcessorPil(size={"height": size, "width": size}, do_resize=True, **pixel_options(enc),
                                    **extra)


def save_processor(model: Any, path: Path) -> bool:
    """Write the ``InternVLProcessor`` files (or, when ``processor_problems`` finds any, only the image processor
    and the tokenizer, with a warning saying why). Returns whether the full processor was written."""
    image_processor = hf_image_processor(model)
    problems = processor_problems(model)
    if problems:
        image_processor.save_pretrained(str(path))
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(str(path))
        warnings.warn(f"to_hf: no InternVLProcessor written to {str(path)!r}: " + "; ".join(problems), stacklevel=3)
        return False
    from transformers import AutoTokenizer, InternVLProcessor
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor

    model.tokenizer.save_pretrained(str(path))
    cfg_file = path / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(dict(zip(NAMED_TOKENS, (START, END, model.image_token, VIDEO))))
    cfg_file.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    # each image is the context token alone: InternVLProcessor adds <img> ... </img> itself
    template = served_chat_template(model.tokenizer, model.tokenizer.chat_template, model.image_token)[0]
    tokenizer.chat_template = template
    processor = InternVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                  video_processor=InternVLVideoProcessor(), image_seq_length=model.num_image_tokens(),
                                  chat_template=template)
    processor.save_pretrained(str(path))
    return True
