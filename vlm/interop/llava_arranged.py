"""What LLaVA-NeXT (``vlm.interop.llava_next``) and LLaVA-OneVision (``vlm.interop.llava_onevision``) share: LLaVA's
parts (``vlm.interop.llava``: tower, ``mlp`` projector, LLM) + a feature arrangement (``vlm.arrangements``) holding
the model's ``image_newline (D,)``, images laid out by the ``anyres`` layout the arrangement states.

``import_arranged`` builds the ``VLM`` from a directory given the arrangement's config; ``export_arranged`` writes one
given the family's transformers config; ``arranged_problems`` states what such a family needs of the arrangement.
Only local directories are read; weights come from safetensors (or ``torch.load(weights_only=True)``); no remote
code is ever run.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vlm import arrangements
from vlm.interop import common
from vlm.interop.llava import export_parts, import_parts, parts_problems
from vlm.pretrained import CONFIG_FILE


def import_arranged(path: Path, config: Any, hf_class: type, arrangement_cfg: dict[str, Any], *,
                    dtype: str | torch.dtype | None, tokenizer: bool, attn_implementation: str,
                    keys: str, video_token_id: int | None = None) -> Any:
    """A LLaVA-layout directory with ``model.image_newline`` as a ``vlm.VLM`` (eval mode): LLaVA's parts + the
    arrangement ``arrangement_cfg`` (``attach``-checked against the tower; a misfit is a ``ValueError`` naming
    ``keys``, the config keys it came from, and their values) holding ``image_newline``;
    ``model.image_preprocessing`` records the arrangement's layout, so ``Processor.for_model`` (and ``model.chat``)
    lays images out as the family's processor."""
    where = f"from_hf: {str(path / CONFIG_FILE)!r}"
    parts = import_parts(path, config, hf_class, dtype, attn_implementation)
    arrangement = arrangements.build(arrangement_cfg, dim=parts.lm.hidden_size).to(parts.dtype)
    try:
        arrangement.attach(parts.encoder, parts.connector)
    except ValueError as e:
        # the problem first, then the config keys it comes from (the pinpoints shortened: OneVision has 36)
        raise ValueError(f"{where}: {e} (from {keys}, vision_config.image_size={config.vision_config.image_size}, "
                         f"vision_feature_select_strategy={config.vision_feature_select_strategy!r})") from None
    with torch.no_grad():
        arrangement.image_newline.copy_(parts.hf.model.image_newline)
    hf_processor = parts.image_processor
    parts = parts._replace(hf=None)
    tiling = arrangement.layout()

    def preprocessing(image_processor: Any, image_size: int, where: str) -> dict[str, Any]:
        return {"resize_mode": "resize", "tiling": tiling}

    return common.assemble(path, config, parts.encoder, parts.connector, parts.lm,
                           image_token_id=int(config.image_token_id), tokenizer=tokenizer,
                           image_processor=hf_processor, image_processor_file=parts.image_processor_file,
                           preprocessing=preprocessing, arrangement=arrangement, video_token_id=video_token_id)


def arranged_problems(model: Any, family: str, hf_class_name: str, required: dict[str, Any]) -> list[str]:
    """Why ``model`` cannot be written as ``family`` (empty when it can): its arrangement's options must have the
    ``required`` values (e.g. ``unpad: True``), the tower must not keep its CLS token, and the parts must be
    LLaVA's (``parts_problems``). A wrong arrangement kind is named by ``vlm.interop.formats.all_problems``."""
    problems = []
    arr = getattr(model, "arrangement", None)
    if arr is not None and hasattr(arr, "options"):
        wrong = {k: arr.options.get(k) for k, v in required.items() if arr.options.get(k) != v}
        if wrong:
            problems.append(f"the {arr.registry_name} arrangement has {wrong}; {family} has {required}")
        if getattr(model.encoder, "has_cls", False) and not model.encoder.drops_first:
            problems.append(f"the encoder keeps its CLS token (select='all'); {family} arranges the patch grid only "
                            f"(select='patch')")
    return problems + parts_problems(model, family, hf_class_name)


def export_arranged(model: Any, path: Path, config: Any, hf_class: type, family: str,
                    dtype: str | torch.dtype | None, save_processor: Callable[[Any, Path], Any] | None) -> Path:
    """Write ``model`` as the transformers ``hf_class`` of ``config`` (safetensors: LLaVA's parts + the arrangement's
    ``image_newline``), then, unless ``save_processor`` is ``None``, the family's processor files
    (``save_processor(model, path)``). Returns ``path``."""
    common.warn_fixed_size(model.encoder, type(config).__name__)
    out = Path(path)
    hf = common.new_hf_model(config, hf_class, common.export_dtype(model.llm, dtype))
    export_parts(model, hf, family)
    with torch.no_grad():
        hf.model.image_newline.copy_(model.arrangement.image_newline)
    common.save_hf(hf, model, out)
    del hf
    if save_processor is not None:
        save_processor(model, out)
    return out
