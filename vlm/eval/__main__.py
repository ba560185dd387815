"""``python -m vlm.eval MODEL_DIR [data=OPTION] [data.KEY=VALUE ...] [--out DIR] [...]``: answer every sample's final
question of an evaluation set and score it (``vlm.eval.score``: VQA accuracy, multiple choice, grounding Acc@IoU0.5
and mean IoU, captioning BLEU-4 / CIDEr-D; a dataset with its own ``evaluate``, like ``shapes``, scores itself).

MODEL_DIR: a ``vlm.load`` directory, a run directory (then its evaluation set and chat template are the default) or
a transformers directory. ``data=files data.eval=my/val.json`` evaluates your own file; ``data=shapes`` the
built-in shapes validation split; any ``recipes/data`` option works (its ``eval.data`` entry is the set). Writes
``eval.json``, ``predictions.jsonl``, ``report.md``, ``report.html`` and ``gallery/*.png`` to ``--out`` (default
``MODEL_DIR/eval/<data>``) and prints the table. This is the same function training's evaluation calls
(``vlm.eval.evaluator.evaluate``)."""
from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def data_spec(opened: Any, overrides: Sequence[str], image_size: int) -> tuple[dict[str, Any], str]:
    """``(dataset spec, name)`` of the evaluation set named by ``overrides`` (or the run's own)."""
    from omegaconf import OmegaConf

    from vlm.registry import to_dict
    from vlm.train.config import compose

    overrides = list(overrides)
    option = next((o.split("=", 1)[1] for o in overrides if o.startswith("data=")), None)
    if opened.run_config is not None and option is None:
        cfg = OmegaConf.merge(opened.run_config, OmegaConf.from_dotlist(overrides))
        name = cfg.eval.data
    else:
        option = option or "shapes"
        if option == "files" and not any(o.startswith("data.train=") for o in overrides):
            path = next((o.split("=", 1)[1] for o in overrides if o.startswith("data.eval=")), None)
            if path is None:
                raise SystemExit("vlm.eval: data=files needs data.eval=PATH (the file to evaluate)")
            overrides.append(f"data.train={path}")
        overrides = [o for o in overrides if not o.startswith("data=")]
        cfg = compose("tiny", [f"data={option}", *overrides, f"encoder.image_size={image_size}"], validate=False)
        name = cfg.eval.data
    if not name or name not in cfg.data:
        raise SystemExit(f"vlm.eval: the data option names no evaluation set (eval.data={name!r}; data keys "
                         f"{sorted(cfg.data)})")
    spec = to_dict(OmegaConf.to_container(cfg.data[name], resolve=True))
    # the folder is named for the data (the option, else the run's dataset), not for the config key it sits under
    return spec, str(option or spec.get("name") or name)


def evaluated(samples: Any, name: str) -> str:
    """What was evaluated, in words: the data file read (with the held-out slice it is, when it is one), else the
    data option's name (``shapes``)."""
    selection = getattr(samples, "selection", None)
    return str(selection or getattr(samples, "source_name", None) or name)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    import argparse

    import torch

    from vlm.data.datasets import build_dataset
    from vlm.eval.evaluator import OneProcess, evaluate, format_table, model_frame
    from vlm.eval.report import write_report
    from vlm.inference.chat import processor_for
    from vlm.inference.load import open_model
    from vlm.quantize import SCHEMES

    ap = argparse.ArgumentParser(prog="python -m vlm.eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("overrides", nargs="*", help="data=OPTION and data.KEY=VALUE overrides")
    ap.add_argument("--out", default=None, help="output folder (default MODEL_DIR/eval/<data>)")
    ap.add_argument("--template", default=None, help="chat template (default: the run's, else the directory's own)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--limit", type=int, default=None, help="evaluate the first N samples only")
    ap.add_argument("--gallery", type=int, default=12, help="gallery PNGs to write (0: none)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quantize", default=None, choices=SCHEMES.names(),
                    help="weight-only quantization of the LLM's linear layers (vlm.quantize; default: none)")
    a = ap.parse_args(argv)
    bad = [o for o in a.overrides if "=" not in o]
    if bad:
        raise SystemExit(f"vlm.eval: {bad} are not KEY=VALUE overrides (e.g. data=files data.eval=val.json)")
    workers = OneProcess(a.device)
    try:  # a quantized model is quantized where it runs
        opened = open_model(a.model_dir, device=str(workers.device) if a.quantize else None, quantize=a.quantize)
    except (FileNotFoundError, ValueError, ImportError) as e:
        raise SystemExit(f"vlm.eval: {e}") from None
    model = opened.model
    spec, data_name = data_spec(opened, a.overrides, model.image_size)
    samples = build_dataset(spec)
    model.to(workers.device)
    processor = processor_for(model, a.template or opened.template, truncation="drop")
    metrics, records = evaluate(model, workers, processor, samples, batch_size=a.batch_size,
                                max_new_tokens=a.max_new_tokens, precision=torch.float32, limit=a.limit,
                                progress=True)
    out = Path(a.out) if a.out else Path(a.model_dir) / "eval" / data_name
    n = len(records)
    info = {"model": str(a.model_dir), "data": evaluated(samples, data_name), "template": str(processor.template.name),
            "samples": n, "max_new_tokens": a.max_new_tokens, **({"quantize": a.quantize} if a.quantize else {})}
    # the answered samples themselves for the gallery (indexing a skipping dataset gives a dropped one's neighbour)
    read = getattr(samples, "sample", None) or samples.__getitem__
    shown = [read(i) if r.get("prediction") is not None else None for i, r in enumerate(records)]
    report = write_report(out, metrics, records, shown, title=f"vlm.eval: {a.model_dir}", info=info,
                          gallery=a.gallery, json_frame=model_frame(processor), data_config=spec)
    print(format_table(metrics))
    print(f"\nwrote {out / 'eval.json'}, {report}, {out / 'report.html'} and {out / 'predictions.jsonl'}", file=sys.stderr)
    return metrics


if __name__ == "__main__":
    main()
