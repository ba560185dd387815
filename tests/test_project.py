"""The project skeleton: packaging metadata, the README's set-up commands, and the CI script that replays them."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = ("torch", "transformers", "open_clip_torch", "timm", "peft", "einops", "datasets", "hydra-core", "wandb",
           "safetensors", "pillow")


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirements(specs: list[str]) -> dict[str, Requirement]:
    return {Requirement(s).name.lower(): Requirement(s) for s in specs}


def test_pyproject_dependencies_and_extras():
    project = pyproject()["project"]
    assert project["name"] == "vlm"
    deps = requirements(project["dependencies"])
    assert set(RUNTIME) <= set(deps), sorted(set(RUNTIME) - set(deps))
    # the README's `pip install torch==2.14.1 torchvision==0.29.1` must satisfy the pins
    assert deps["torch"].specifier.contains(Version("2.14.1"))
    assert deps["torchvision"].specifier.contains(Version("0.29.1"))
    extras = project["optional-dependencies"]
    assert {"test", "dev", "flash"} <= set(extras)
    assert "pytest" in requirements(extras["test"])
    flash = requirements(extras["flash"])["flash-attn"]
    assert flash.marker is not None  # never resolved on platforms without CUDA wheels/toolchains


def test_layout():
    for d in ("vlm", "vlm/encoders", "vlm/connectors", "vlm/llm", "vlm/interop", "recipes", "tests", "docs"):
        assert (ROOT / d).is_dir(), d
    for f in ("docs/architecture.md", "docs/interop.md", "README.md", ".ci/run"):
        assert (ROOT / f).is_file(), f


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def normalize(step: str) -> str:
    """A shell step without pip/pytest quiet flags and quoting differences."""
    return " ".join(w for w in step.replace("'", '"').split() if w != "-q")


def test_readme_two_setup_commands_and_ci_replays_the_test_one():
    commands = readme_commands()
    setup = [c for c in commands if c.startswith("python3 -m venv")]
    assert len(setup) == 2, setup
    test_cmd = next(c for c in setup if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text()
    ci_steps = {normalize(line) for line in ci.splitlines() if line.strip() and not line.lstrip().startswith("#")}
    for step in test_cmd.split("&&"):
        step = step.strip()
        if step.startswith(("python3 -m venv", ". ")):  # the CI makes its own throw-away virtualenv
            continue
        assert any(normalize(step) in s for s in ci_steps), f"README step {step!r} is not in .ci/run"
    assert 'python3 -m venv "$VENV"' in ci
