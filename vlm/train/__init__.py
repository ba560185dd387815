"""Training: Hydra recipes, stages, per-module policies, distributed strategies, checkpoints, evaluation.

    python -m vlm.train                                   # the `tiny` recipe on the built-in shapes data
    python -m vlm.train recipe=llava15 trainer=fsdp       # under torchrun for N GPUs
    python -m vlm.train -m connector=mlp,linear seed=0,1  # a sweep, with summary.md / summary.csv
    python -m vlm.train.score runs/tiny/<run>             # re-evaluate a saved model

From Python::

    from vlm.train import compose, run
    cfg = compose("tiny", ["stage.sft.max_steps=100"])
    result = run(cfg)          # RunResult: run_dir, per-stage losses, eval metrics, final_dir, plot
"""
from vlm.train.config import ConfigError, check, compose, list_options, recipes_dir
from vlm.train.loop import BatchTooLargeError, NonFiniteLossError
from vlm.train.run import RunResult, run

__all__ = ["BatchTooLargeError", "ConfigError", "NonFiniteLossError", "RunResult", "check", "compose",
           "list_options", "recipes_dir", "run"]
