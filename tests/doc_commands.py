"""Every command shown in README.md and docs/*.md, extracted and run with tiny step counts (tests/test_docs_commands.py).

What counts as a command (picked up automatically, in document order):

- each line of a fenced block tagged ``bash`` / ``sh`` / ``shell`` / ``console`` (``\\`` continuations joined,
  ``#`` comments dropped), and ``$ ``-prompt lines in untagged blocks;
- each fenced ``python`` block (run as one script);
- inline code spans starting with ``python -m vlm.`` that pass arguments.

A block that is illustrative only (needs real weights, a download, a server) carries a marker on the line right above
its opening fence, with the reason: ``<!-- doc-test: skip: needs the LLaVA-1.5 weights and data -->`` (an HTML comment:
not rendered). Install commands (``pip install``, ``python3 -m venv``, ``bash .ci/run``) are exempt: CI runs them.
Any other command the harness does not know how to run makes the test fail, so nothing is dropped silently.

How commands run (one subprocess for all, in a scratch directory, in document order):

- ``python -m vlm.train ARGS`` gets overrides appended that keep its stages and recipe but shrink the work
  (``tiny_overrides``): 2 optimizer steps of 4 samples per stage, 16-sample shapes sets, 4 evaluation samples;
- other ``python -m vlm.*`` modules get ``MODULE_ARGS[module]`` appended (e.g. a smaller evaluation);
- ``runs/<recipe>/<run>`` (the docs' placeholder for "a run directory of that recipe") becomes a run the harness
  trains once per recipe, with the same tiny overrides;
- a ``python`` block runs with ``vlm.train.compose`` appending the same tiny overrides.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
SKIP_MARKER = re.compile(r"^\s*<!--\s*doc-test:\s*skip:\s*(?P<reason>.*?)\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w-]*)\s*$")
INLINE = re.compile(r"`(python -m vlm\.[\w.]+ [^`]+)`")
EXEMPT = ("pip install", "python3 -m venv", "bash .ci/run")
RUN_PLACEHOLDER = re.compile(r"runs/(?P<recipe>\w+)/<run>")
MODULE_ARGS = {"vlm.train.score": ["--size", "8", "--batch-size", "8", "--max-new-tokens", "4"],
               "vlm.eval": ["--limit", "4", "--batch-size", "4", "--max-new-tokens", "4", "--gallery", "2"],
               "vlm.chat": ["--max-new-tokens", "4"],
               "vlm.bench": ["--quick", "--repeats", "1", "--warmup", "0", "--memory-repeats", "1"]}
TINY_STEPS, TINY_BATCH, TINY_DATA, TINY_EVAL = 2, 4, 16, 4


@dataclass
class DocCommand:
    where: str            # file:line
    kind: str             # "shell" | "python"
    text: str             # the command line, or the python source
    skip: str | None = None


def extract(files: list[str] = DOCS) -> list[DocCommand]:
    """The commands of ``files`` in document order (skipped blocks included, with their reason)."""
    out: list[DocCommand] = []
    for name in files:
        lines = (ROOT / name).read_text().splitlines()
        i = 0
        while i < len(lines):
            m = FENCE.match(lines[i])
            if not m:
                out += [DocCommand(f"{name}:{i + 1}", "shell", c) for c in INLINE.findall(lines[i])]
                i += 1
                continue
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            body = [line[len(m["indent"]):] for line in lines[i + 1:end]]
            marker = SKIP_MARKER.match(lines[i - 1]) if i else None
            skip = marker["reason"] if marker else None
            where = f"{name}:{i + 1}"
            if m["lang"] == "python":
                out.append(DocCommand(where, "python", "\n".join(body) + "\n", skip))
            elif m["lang"] in SHELL_LANGS:
                out += [DocCommand(where, "shell", c, skip) for c in shell_commands(body)]
            elif m["lang"] == "":
                out += [DocCommand(where, "shell", line.strip()[2:], skip) for line in body
                        if line.strip().startswith("$ ")]
            i = end + 1
    return out


def shell_commands(body: list[str]) -> list[str]:
    """Command lines of a shell block: continuations joined, comments and blank lines dropped."""
    joined, cur = [], ""
    for line in body:
        cur += line.rstrip()
        if cur.endswith("\\"):
            cur = cur[:-1] + " "
            continue
        text = cur.split(" #", 1)[0].strip() if not cur.lstrip().startswith("#") else ""
        if text:
            joined.append(text)
        cur = ""
    return joined


def is_exempt(cmd: DocCommand) -> bool:
    return cmd.kind == "shell" and any(part.strip().startswith(EXEMPT) for part in cmd.text.split("&&"))


# ------------------------------------------------------------------------------------------------ tiny overrides
def tiny_overrides(args: list[str], compose=None, config_dir: str | None = None) -> list[str]:
    """Overrides that shrink the job(s) of ``python -m vlm.train ARGS`` to seconds, keeping recipe and stages
    (``config_dir``: a user recipes folder, as ``--config-dir`` in ``ARGS`` gives it)."""
    from hydra._internal.utils import get_args_parser

    from vlm.train.__main__ import job_overrides
    from vlm.train.config import compose as default_compose
    from vlm.train.config_check import used_data_keys

    parsed, _ = get_args_parser().parse_known_args(args)
    if parsed.cfg or parsed.help or parsed.hydra_help or parsed.info:
        return []
    extra = ["trainer.num_workers=0", "trainer.progress=false", "eval.limit=4", f"eval.max_new_tokens={TINY_EVAL}",
             f"eval.batch_size={TINY_EVAL}"]
    for overrides in job_overrides(parsed.overrides, parsed.multirun):
        cfg = (compose or default_compose)(overrides=overrides, config_dir=parsed.config_dir or config_dir)
        for s in cfg.stages:
            extra += [f"stage.{s}.max_steps={TINY_STEPS}", f"stage.{s}.global_batch_size={TINY_BATCH}",
                      f"stage.{s}.micro_batch_size={TINY_BATCH // 2}", f"stage.{s}.eval_every=null",
                      f"stage.{s}.save_every=null"]
        extra += [f"data.{k}.size={TINY_DATA}" for k in used_data_keys(cfg) if "size" in cfg.data[k]]
    return list(dict.fromkeys(extra))


# ------------------------------------------------------------------------------------------------------- running
def classify(cmd: DocCommand) -> str | None:
    """``vlm`` (python -m vlm.*), ``torchrun``, ``python``, or None when the harness cannot run it."""
    if cmd.kind == "python":
        return "python"
    words = shlex.split(cmd.text)
    if len(words) > 2 and words[:2] == ["python", "-m"] and words[2].split(".")[0] == "vlm":
        return "vlm"
    if words and words[0] == "torchrun" and "vlm.train" in words:
        return "torchrun"
    return None


class Runner:
    """Runs the commands in the current directory, one process (torchrun: its own processes)."""

    def __init__(self) -> None:
        self.base_runs: dict[str, str] = {}
        self.sweeps = 0

    def substitute(self, text: str) -> str:
        for recipe in {m["recipe"] for m in RUN_PLACEHOLDER.finditer(text)}:
            if recipe not in self.base_runs:
                out = f"runs/{recipe}/doc-base"
                self.train([f"recipe={recipe}", f"output_dir={out}"])
                self.base_runs[recipe] = out
        return RUN_PLACEHOLDER.sub(lambda m: self.base_runs[m["recipe"]], text)

    def train(self, args: list[str]) -> None:
        from hydra.core.global_hydra import GlobalHydra

        from vlm.train import __main__ as cli

        args = args + tiny_overrides(args)
        if "-m" in args or "--multirun" in args:
            self.sweeps += 1
            args.append(f"hydra.sweep.dir=runs/doc-sweep-{self.sweeps}")
        GlobalHydra.instance().clear()
        self.call_main(cli.main, ["vlm.train", *args])

    @staticmethod
    def call_main(fn, argv: list[str]) -> None:
        old = sys.argv
        sys.argv = argv
        try:
            fn()
        except SystemExit as e:
            if e.code not in (0, None):
                raise RuntimeError(f"exit status {e.code}") from e
        finally:
            sys.argv = old

    def run(self, cmd: DocCommand) -> None:
        kind = classify(cmd)
        if kind == "python":
            self.python(self.substitute(cmd.text))
            return
        words = shlex.split(self.substitute(cmd.text))
        if kind == "vlm":
            module, args = words[2], words[3:]
            if module == "vlm.train":
                self.train(args)
            else:
                self.call_main(lambda: runpy.run_module(module, run_name="__main__", alter_sys=True),
                               [module, *args, *MODULE_ARGS.get(module, [])])
        elif kind == "torchrun":
            at = words.index("vlm.train")
            args = words[at + 1:]
            argv = [sys.executable, "-m", "torch.distributed.run", *words[1:at + 1], *args, *tiny_overrides(args)]
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
            if proc.returncode:
                raise RuntimeError(f"exit status {proc.returncode}: {proc.stderr[-2000:]}")
        else:
            raise RuntimeError("the harness does not know how to run this command")

    def python(self, source: str) -> None:
        import vlm.train
        import vlm.train.config as config

        real = config.compose

        def compose(recipe=None, overrides=(), **kw):
            args = ([f"recipe={recipe}"] if recipe else []) + list(overrides)
            return real(None, args + tiny_overrides(args, compose=real, config_dir=kw.get("config_dir")), **kw)

        vlm.train.compose = config.compose = compose
        try:
            exec(compile(source, "<doc snippet>", "exec"), {"__name__": "__main__"})
        finally:
            vlm.train.compose = config.compose = real


def main(commands_json: str, results_json: str) -> None:
    commands = [DocCommand(**c) for c in json.loads(Path(commands_json).read_text())]
    runner, results = Runner(), []
    for cmd in commands:
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log):
                runner.run(cmd)
            results.append({**asdict(cmd), "ok": True})
        except BaseException as e:  # noqa: BLE001 - every failure is reported with its command
            results.append({**asdict(cmd), "ok": False, "error": f"{type(e).__name__}: {e}",
                            "traceback": traceback.format_exc()[-3000:], "stdout": log.getvalue()[-2000:]})
        Path(results_json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_MODE", "disabled")
    main(sys.argv[1], sys.argv[2])
