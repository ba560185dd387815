"""MkDocs hook: the notebooks of ``notebooks/`` as site pages ``notebooks/<name>.md``, with their outputs.

A tiny renderer (``nbformat`` only, no nbconvert): markdown cells as they are (``../docs/`` links rewritten to the
site's pages), code cells in ``python`` blocks, text outputs in ``text`` blocks, PNG outputs as image files beside the
page, errors as their traceback (colours stripped). At build time each notebook is executed (``execute``: nbclient,
an ipykernel of this interpreter, a scratch working directory, ``PYTHONPATH`` = the repository) and the executed copy cached in
``.cache/notebooks/`` under the hash of its cells, so an unchanged notebook runs once. ``VLM_DOCS_EXECUTE=0``
renders the notebooks without executing them (CI's quick strict build); ``VLM_DOCS_NOTEBOOKS=DIR`` takes executed
copies from ``DIR/<name>.ipynb`` (e.g. the ones ``tests/test_notebooks.py`` ran). A notebook marked
``metadata.vlm.skip_reason`` (needs a GPU or a download) is rendered unexecuted, with the reason.
"""
from __future__ import annotations

import base64
import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import nbformat

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
CACHE = ROOT / ".cache" / "notebooks"
NB_LINK = re.compile(r"\]\(([\w-]+)\.ipynb")
# stderr lines of dependencies that say nothing about the notebook (torch's pytree notices at import, tqdm without
# ipywidgets, tqdm progress bars); dropped from the rendered page only
NOISE = re.compile(r"_pytree\.py:\d+\]|TqdmWarning: IProgress not found|from \.autonotebook import tqdm"
                   r"|^[\w ]*:\s+\d+%\|")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
TIMEOUT_S = 600  # per cell


def skip_reason(nb: Any) -> str | None:
    """The reason a notebook cannot run in CI (it needs a GPU or a download), or None."""
    return (nb.metadata.get("vlm") or {}).get("skip_reason")


def source_hash(nb: Any) -> str:
    """Hash of the cells' sources: the cache key of an executed copy."""
    h = hashlib.sha256()
    for cell in nb.cells:
        h.update(cell.cell_type.encode() + b"\0" + cell.source.encode() + b"\0")
    return h.hexdigest()[:16]


KERNEL = "vlm-python3"  # a kernel spec of this interpreter, written for the run (not a python3 spec found elsewhere)


def execute(nb: Any, cwd: str | os.PathLike, timeout: int = TIMEOUT_S) -> Any:
    """Run ``nb`` top to bottom in place: an ipykernel of this very interpreter (``sys.executable``: the current
    virtualenv, whatever ``python3`` kernel specs are installed elsewhere), in ``cwd``, with this repository on
    ``PYTHONPATH``; a cell error raises ``nbclient.exceptions.CellExecutionError`` naming the cell."""
    import json
    import sys

    from nbclient import NotebookClient

    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "JUPYTER_PATH", "TOKENIZERS_PARALLELISM")}
    with tempfile.TemporaryDirectory() as specs:
        spec = Path(specs) / "kernels" / KERNEL
        spec.mkdir(parents=True)
        spec.joinpath("kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": f"Python ({sys.executable})", "language": "python"}))
        os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [saved["PYTHONPATH"]])])
        os.environ["JUPYTER_PATH"] = os.pathsep.join([specs, *filter(None, [saved["JUPYTER_PATH"]])])
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        try:
            NotebookClient(nb, timeout=timeout, kernel_name=KERNEL,
                           resources={"metadata": {"path": str(cwd)}}).execute()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return nb


def executed(path: Path) -> Any:
    """``path``'s notebook with outputs: from ``VLM_DOCS_NOTEBOOKS``, the cache, or run now; unexecuted when
    ``VLM_DOCS_EXECUTE=0`` or the notebook is marked with a skip reason."""
    nb = nbformat.read(path, as_version=4)
    given = os.environ.get("VLM_DOCS_NOTEBOOKS")
    if given and (Path(given) / path.name).is_file():
        return nbformat.read(Path(given) / path.name, as_version=4)
    if os.environ.get("VLM_DOCS_EXECUTE", "1") == "0" or skip_reason(nb):
        return nb
    cached = CACHE / f"{path.stem}-{source_hash(nb)}.ipynb"
    if cached.is_file():
        return nbformat.read(cached, as_version=4)
    with tempfile.TemporaryDirectory() as tmp:
        execute(nb, tmp)
    CACHE.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, cached)
    return nb


def site_links(markdown: str) -> str:
    """Links that work in Jupyter (``../docs/x.md``, ``other.ipynb``) rewritten to the site's pages (``../x.md``,
    ``other.md``)."""
    return NB_LINK.sub(r"](\1.md", markdown.replace("](../docs/", "](../"))


def _text(s: Any) -> str:
    return ANSI.sub("", s if isinstance(s, str) else "".join(s))


def _block(lang: str, text: str) -> str:
    fence = "````" if "```" in text else "```"
    return f"{fence}{lang}\n{text.rstrip()}\n{fence}\n"


def _outputs(cell: Any) -> list[dict[str, Any]]:
    """The cell's outputs with consecutive stream outputs of one stream joined and known noise dropped."""
    out: list[dict[str, Any]] = []
    for o in cell.get("outputs", []):
        if o.get("output_type") == "stream":
            text = "".join(line for line in _text(o["text"]).splitlines(keepends=True) if not NOISE.search(line))
            if out and out[-1].get("output_type") == "stream" and out[-1]["name"] == o["name"]:
                out[-1]["text"] += text
                continue
            o = {"output_type": "stream", "name": o["name"], "text": text}
        out.append(o)
    return [o for o in out if o.get("output_type") != "stream" or o["text"].strip()]


def render(nb: Any, name: str) -> tuple[str, dict[str, bytes]]:
    """Markdown of ``nb`` and its images ``{file name: PNG bytes}`` (files sit beside the page, ``<name>_<k>.png``)."""
    parts: list[str] = []
    images: dict[str, bytes] = {}
    reason = skip_reason(nb)
    if reason:
        parts.append(f'!!! note "Not executed"\n    {reason}\n')
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            parts.append(site_links(cell.source).rstrip() + "\n")
        elif cell.cell_type == "code" and cell.source.strip():
            parts.append(_block("python", cell.source))
            for out in _outputs(cell):
                kind = out.get("output_type")
                if kind == "stream":
                    parts.append(_block("text", out["text"]))
                elif kind == "error":
                    parts.append(_block("text", _text("\n".join(out.get("traceback", [])))))
                elif kind in ("execute_result", "display_data"):
                    data = out.get("data", {})
                    if "image/png" in data:
                        file = f"{name}_{len(images) + 1}.png"
                        images[file] = base64.b64decode(data["image/png"])
                        parts.append(f"![output {len(images)}]({file})\n")
                    elif "text/markdown" in data:
                        parts.append(site_links(_text(data["text/markdown"])).rstrip() + "\n")
                    elif "text/plain" in data:
                        parts.append(_block("text", _text(data["text/plain"])))
    return "\n".join(parts), images


def on_files(files: Any, config: Any) -> Any:
    """Add ``notebooks/<name>.md`` (and its images) for every ``notebooks/*.ipynb``."""
    from mkdocs.structure.files import File

    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        md, images = render(executed(path), path.stem)
        files.append(File.generated(config, f"notebooks/{path.stem}.md", content=md))
        for file, data in images.items():
            files.append(File.generated(config, f"notebooks/{file}", content=data))
    return files
