"""The documentation site builds with ``mkdocs build --strict`` (no warning: broken links or anchors, pages left out
of the navigation, API references that do not resolve), every page under docs/ is in the navigation, and a broken
link does fail the build. The notebooks are rendered without executing them here (``VLM_DOCS_EXECUTE=0``);
tests/test_notebooks.py executes them."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("mkdocs")
pytest.importorskip("material")
pytest.importorskip("mkdocstrings_handlers.python")


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "VLM_DOCS_EXECUTE": "0", **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def build(config: Path, site: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                          cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300, check=False)


def warnings_of(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if "WARNING" in line or "ERROR" in line]


def nav_pages(nav) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [p for item in nav for p in nav_pages(item)]
    if isinstance(nav, dict):
        return [p for v in nav.values() for p in nav_pages(v)]
    return []


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text())


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    proc = build(ROOT / "mkdocs.yml", out, ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not warnings_of(proc), "\n".join(warnings_of(proc))
    return out


def test_every_page_is_in_the_nav(config):
    pages = set(nav_pages(config["nav"]))
    on_disk = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md") if "hooks" not in p.parts}
    notebooks = {f"notebooks/{p.stem}.md" for p in (ROOT / "notebooks").glob("*.ipynb")}
    assert on_disk | notebooks <= pages, f"pages not in mkdocs.yml's nav: {sorted(on_disk | notebooks - pages)}"
    assert pages <= on_disk | notebooks, f"nav entries without a page: {sorted(pages - on_disk - notebooks)}"


def test_strict_build_has_every_page_and_the_api_reference(site, config):
    for page in nav_pages(config["nav"]):
        assert (site / page.replace(".md", ".html")).is_file(), page
    api = (site / "api" / "vlm.html").read_text()
    for name in ("vlm.compose.build", "vlm.loading.load", "vlm.model.VLM"):
        assert f'id="{name}"' in api, name  # mkdocstrings rendered the object (its docstring is below its heading)
    assert "Load a model directory for inference" in api
    index = (site / "index.html").read_text()
    assert "python -m mkdocs serve" in index
    assert "fonts.googleapis.com" not in index  # offline: no web fonts


def test_rendered_notebooks_are_pages(site):
    import nbformat

    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        html = (site / "notebooks" / f"{path.stem}.html").read_text()
        code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
        assert html.count('<div class="highlight"') >= len(code), path.name  # every code cell, highlighted


def test_a_broken_link_fails_the_strict_build(tmp_path, config):
    """The validation settings of mkdocs.yml turn a broken link or anchor into a warning, which --strict fails on."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.md").write_text("# Home\n\n[a page that is not there](missing.md), "
                                                "[an anchor that is not there](#nowhere)\n")
    small = {"site_name": "t", "docs_dir": "docs", "validation": config["validation"], "nav": ["index.md"]}
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(small))
    proc = build(tmp_path / "mkdocs.yml", tmp_path / "site", tmp_path)
    assert proc.returncode != 0
    text = "\n".join(warnings_of(proc))
    assert "missing.md" in text and "nowhere" in text, text
