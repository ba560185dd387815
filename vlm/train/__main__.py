"""``python -m vlm.train [recipe=NAME] [group=option ...] [key=value ...]`` (Hydra; ``-m`` for sweeps).

Examples::

    python -m vlm.train                                        # tiny recipe, shapes data, CPU-friendly
    python -m vlm.train recipe=llava15 trainer=fsdp            # (torchrun --nproc_per_node 8 -m vlm.train ...)
    python -m vlm.train stages=[sft] init_from=runs/tiny/X/pretrain
    python -m vlm.train resume=auto                            # continue the newest unfinished run of the recipe
                                                               # (its saved config; overrides given apply on top)
    python -m vlm.train -m connector=mlp,linear seed=0,1       # sweep -> runs/<recipe>/sweep-*/summary.md
    python -m vlm.train --cfg job                              # print the composed config and exit
    python -m vlm.train -m connector=mlp,linear --cfg job      # ... every job's config of a sweep

A config mistake is one line on stderr (``error: key=value: ...``, exit status 2), found before anything is built
or written: every job of a sweep is composed and checked first. ``--debug`` (or ``HYDRA_FULL_ERROR=1``) shows the
traceback instead. In a sweep, a job that fails is recorded (``<job>/error.json``, a row of the summary) and the
other jobs still run; the sweep then exits with status 1.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from vlm.train.config import (PRIMARY_CONFIG, ConfigError, check, recipes_dir, search_path_override,  # noqa: E402
                              user_recipe_dirs)

DEBUG_FLAG = "--debug"
FULL_ERROR_ENV = "HYDRA_FULL_ERROR"
CONFIG_ERROR_STATUS = 2
JOB_ERROR_FILE = "error.json"


def debugging() -> bool:
    """``--debug`` or ``HYDRA_FULL_ERROR=1``: show tracebacks instead of one-line errors."""
    return os.environ.get(FULL_ERROR_ENV) == "1"


def fail(e: Exception) -> None:
    """A config or data mistake: one line on stderr and exit status 2 (the traceback with ``--debug`` / ``HYDRA_FULL_ERROR=1``)."""
    if debugging():
        raise e
    print(f"error: {e}", file=sys.stderr)
    sys.exit(CONFIG_ERROR_STATUS)


def job_overrides(overrides: Sequence[str], multirun: bool) -> list[list[str]]:
    """The overrides of every job the command line asks for: one job, or the sweep's combinations under ``-m``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    from vlm.train.config_check import explain

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except OverrideParseException as e:
        raise explain(e, overrides) from e
    axes = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if multirun and o.is_sweep_override()
            else [o.input_line] for o in parsed]
    return [list(combo) for combo in itertools.product(*axes)]


def hydra_flags() -> argparse.ArgumentParser:
    """A parser for Hydra's documented command-line flags (``python app.py --help`` lists them): what ``precheck``
    needs to know of a command line before Hydra sees it (Hydra's own parser is not public API)."""
    parser = argparse.ArgumentParser(add_help=False)
    for flags in (["--help", "-h"], ["--hydra-help"], ["--version"], ["--resolve"], ["--run", "-r"],
                  ["--multirun", "-m"], ["--shell-completion", "-sc"]):
        parser.add_argument(*flags, action="store_true")
    for flags in (["--cfg", "-c"], ["--package", "-p"], ["--config-path", "-cp"], ["--config-name", "-cn"],
                  ["--config-dir", "-cd"], ["--experimental-rerun"]):
        parser.add_argument(*flags, default=None)
    parser.add_argument("--info", "-i", nargs="?", const="all", default=None)
    parser.add_argument("overrides", nargs="*")
    return parser


def precheck(argv: Sequence[str]) -> None:
    """Compose and check every job of the command line (schema, components, files) before Hydra starts anything."""
    from vlm.train.config import compose
    from vlm.train.config_check import check_runnable

    args, _ = hydra_flags().parse_known_args(list(argv))
    if (args.help or args.hydra_help or args.version or args.info or args.shell_completion or args.config_path
            or args.config_name or args.experimental_rerun):
        return  # Hydra's own modes, or another config source: nothing to run here
    try:
        if args.multirun and args.cfg and args.cfg != "job":
            raise ConfigError(f"-m with --cfg {args.cfg}: a sweep prints its jobs' configs with --cfg job")
        jobs = job_overrides(args.overrides, args.multirun)
        for num, overrides in enumerate(jobs):
            cfg = compose(overrides=overrides, config_dir=args.config_dir)
            if not args.cfg:  # `--cfg job` only prints the config: its files need not exist yet
                check_runnable(cfg)
            elif args.multirun:  # Hydra refuses -m with --cfg: print every job's composed config here
                from omegaconf import OmegaConf

                print(f"# job {num} of {len(jobs)}: {' '.join(overrides)}\n{OmegaConf.to_yaml(cfg)}")
    except ConfigError as e:
        fail(e)
    if args.multirun and args.cfg:
        sys.exit(0)


def write_overrides(run_dir: Path, overrides: Sequence[str]) -> None:
    """``<run>/overrides.json``: the command line's overrides (a sweep summary's columns)."""
    if int(os.environ.get("RANK", 0)) == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "overrides.json").write_text(json.dumps(list(overrides)))


def record_failure(job_dir: Path, overrides: Sequence[str], e: BaseException) -> None:
    """``<job>/error.json`` (one-line error, type, traceback) and ``overrides.json``: the sweep summary's row."""
    write_overrides(job_dir, overrides)
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    (job_dir / JOB_ERROR_FILE).write_text(json.dumps({
        "error": f"{type(e).__name__}: {first}", "traceback": traceback.format_exc()}, indent=1))


def _main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from vlm.data.errors import DataError
    from vlm.train.run import run

    hc = HydraConfig.get()
    sweeping = hc.mode == RunMode.MULTIRUN
    try:
        cfg = check(cfg)
        if sweeping:  # (its config was checked before the sweep started)
            if cfg.output_dir is None:
                cfg.output_dir = hc.runtime.output_dir
            write_overrides(Path(cfg.output_dir), hc.overrides.task)  # a killed job still has its summary row
        result = run(cfg, overrides=list(hc.overrides.task))  # recorded; a resume applies them to the saved config
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM after its checkpoint: no traceback, how to resume
        sys.exit(interrupted(e, list(hc.overrides.task)))
    except Exception as e:
        if not sweeping or debugging():
            if isinstance(e, (ConfigError, DataError)):
                fail(e)
            raise
        # one failed job must not end the sweep: record it, the summary lists it, the sweep exits with status 1
        record_failure(Path(hc.runtime.output_dir), hc.overrides.task, e)
        print(f"error: job {hc.job.num} failed ({hc.runtime.output_dir}/{JOB_ERROR_FILE}): {type(e).__name__}: {e}"
              + ("" if isinstance(e, (ConfigError, DataError)) else f"\n{traceback.format_exc()}"), file=sys.stderr)
        return None
    if result.run_dir.is_dir():
        write_overrides(result.run_dir, hc.overrides.task)
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
    if DEBUG_FLAG in sys.argv[1:]:
        sys.argv = [a for a in sys.argv if a != DEBUG_FLAG]
        os.environ[FULL_ERROR_ENV] = "1"
    try:
        config_path = str(recipes_dir())
        search = search_path_override(user_recipe_dirs())  # $VLM_RECIPES adds to the recipes (--config-dir: Hydra)
    except ConfigError as e:
        fail(e)
    precheck(sys.argv[1:])
    first = next((i for i, a in enumerate(sys.argv) if i and "=" in a and not a.startswith("-")), len(sys.argv))
    sys.argv[first:first] = search  # next to the overrides: argparse takes them as one run of positionals
    hydra.main(config_path=config_path, config_name=PRIMARY_CONFIG, version_base=None)(_main)()


if __name__ == "__main__":
    main()
