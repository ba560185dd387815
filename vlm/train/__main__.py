"""``python -m vlm.train [recipe=NAME] [group=option ...] [key=value ...]`` (Hydra; ``-m`` for sweeps).

Examples::

    python -m vlm.train                                        # tiny recipe, shapes data, CPU-friendly
    python -m vlm.train recipe=llava15 trainer=fsdp            # (torchrun --nproc_per_node 8 -m vlm.train ...)
    python -m vlm.train stages=[sft] init_from=runs/tiny/X/pretrain
    python -m vlm.train resume=auto                            # continue the newest unfinished run of the recipe
                                                               # (its saved config; overrides given apply on top)
    python -m vlm.train -m connector=mlp,linear seed=0,1       # sweep -> runs/<recipe>/sweep-*/summary.md
    python -m vlm.train --cfg job                              # print the composed config and exit
"""
from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from vlm.train.config import PRIMARY_CONFIG, ConfigError, check, recipes_dir  # noqa: E402


def _main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from vlm.data.errors import DataError
    from vlm.train.run import run

    hc = HydraConfig.get()
    try:
        cfg = check(cfg)
        if hc.mode == RunMode.MULTIRUN and cfg.output_dir is None:
            cfg.output_dir = hc.runtime.output_dir
        result = run(cfg, overrides=list(hc.overrides.task))  # recorded; a resume applies them to the saved config
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM after its checkpoint: no traceback, how to resume
        sys.exit(interrupted(e, list(hc.overrides.task)))
    if result.run_dir.is_dir() and int(os.environ.get("RANK", 0)) == 0:
        (result.run_dir / "overrides.json").write_text(json.dumps(list(hc.overrides.task)))
    return result.eval.get("all")


def interrupted(err: KeyboardInterrupt, overrides: list[str]) -> int:
    """Print (rank 0) where an interrupted run stopped and the command that resumes it; return the exit code."""
    from vlm.train.interrupt import Interrupted, resume_command

    if not isinstance(err, Interrupted):
        err = Interrupted("INT", "before the run directory was set up")
    if int(os.environ.get("RANK", 0)) == 0:
        lines = [f"[vlm.train] {err.message}"]
        if err.run_dir is not None:
            world = int(os.environ.get("WORLD_SIZE", 1))
            lines.append(f"[vlm.train] resume with: {resume_command(overrides, err.run_dir, world)}")
        print("\n".join(lines), file=sys.stderr, flush=True)
    return err.exit_code


def main() -> None:
    try:
        config_path = str(recipes_dir())
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    hydra.main(config_path=config_path, config_name=PRIMARY_CONFIG, version_base=None)(_main)()


if __name__ == "__main__":
    main()
