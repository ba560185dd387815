"""``python -m vlm.train.score RUN_OR_MODEL_DIR``: re-evaluate a saved model (greedy generation on the shapes
validation split, or the run's own evaluation set) and print the table. Quick: about 10 s for 500 samples of the
tiny model on a CPU."""
from __future__ import annotations

from collections.abc import Sequence

import torch


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """``python -m vlm.train.score RUN_OR_MODEL_DIR``: evaluate a saved model on the shapes validation split.

    ``RUN_OR_MODEL_DIR`` is a ``vlm.load`` directory or a run directory (its ``final/``; then the run's evaluation
    set and last stage's template are used unless given)."""
    import argparse
    import json
    from pathlib import Path

    from omegaconf import OmegaConf

    import vlm
    from vlm.data.datasets import build_dataset
    from vlm.data.processor import Processor
    from vlm.eval.evaluator import OneProcess, evaluate, format_table
    from vlm.registry import to_dict

    ap = argparse.ArgumentParser(prog="python -m vlm.train.score", description=main.__doc__)
    ap.add_argument("path")
    ap.add_argument("--template", default=None, help="chat template (default: the run's last stage, else chatml)")
    ap.add_argument("--split", default="val")
    ap.add_argument("--size", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="write metrics (json) here")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    path = Path(a.path)
    run_cfg = OmegaConf.load(path / "config.yaml") if (path / "config.yaml").is_file() else None
    model = vlm.load(path / "final" if (path / "final").is_dir() else path)
    template = a.template or (run_cfg.stage[run_cfg.stages[-1]].template if run_cfg is not None else "chatml")
    spec = to_dict(run_cfg.data[run_cfg.eval.data]) \
        if run_cfg is not None and run_cfg.eval.data else {"name": "shapes", "image_size": model.image_size}
    spec.update(split=a.split, size=a.size)
    samples = build_dataset(spec)
    workers = OneProcess("auto")
    model.to(workers.device)
    processor = Processor.for_model(model, model.tokenizer, template=template)
    metrics, _ = evaluate(model, workers, processor, samples, batch_size=a.batch_size,
                          max_new_tokens=a.max_new_tokens, precision=torch.float32)
    print(format_table(metrics))
    if a.out:
        Path(a.out).write_text(json.dumps(metrics, indent=1))
    return metrics


if __name__ == "__main__":
    main()
