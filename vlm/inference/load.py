"""Open whatever directory a user points ``vlm.chat`` / ``vlm.eval`` at: a ``vlm.load`` directory, a training run
directory (its ``final/``; the run's config gives the chat template and evaluation data) or a transformers
directory of a supported family (LLaVA, BLIP-2, InternVL), imported on the fly; all through ``vlm.load``, in eval
mode."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Opened:
    """``model`` (eval mode), the chat ``template`` to use (the run's last stage's, else ``None``: ``auto``), the
    run's config (``None`` for a model directory) and the directory the weights came from."""

    model: Any
    template: Any
    run_config: Any
    directory: Path


def open_model(path: str | os.PathLike, *, device: str | None = None, quantize: str | None = None,
               quantize_vision: bool = False, **load_options: Any) -> Opened:
    """Open ``path`` (``quantize``, ``quantize_vision``: as ``vlm.load``'s; ``load_options``: more ``vlm.load``
    keywords). Raises ``FileNotFoundError`` / ``ValueError`` saying what was found and what was expected."""
    import vlm
    from vlm.pretrained import CONFIG_FILE

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{str(root)!r} is not a directory; expected a model directory (vlm.load or "
                                f"transformers) or a training run directory")
    run_cfg, template, weights = None, None, root
    if (root / "config.yaml").is_file() and (root / "final").is_dir():
        from omegaconf import OmegaConf

        run_cfg = OmegaConf.load(root / "config.yaml")
        weights = root / "final"
        template = run_cfg.stage[run_cfg.stages[-1]].template
        template = OmegaConf.to_container(template) if not isinstance(template, str) else template
    cfg_file = weights / CONFIG_FILE
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{str(root)!r} is not a model directory: no {CONFIG_FILE} (expected a vlm.load "
                                f"directory, a run directory with final/, or a transformers directory)")
    # one loader: vlm directories and transformers ones, eval mode
    model = vlm.load(weights, device=device, quantize=quantize, quantize_vision=quantize_vision, **load_options)
    return Opened(model.eval(), template, run_cfg, weights)
