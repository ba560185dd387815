"""Every notebook in notebooks/ runs top to bottom (nbclient, an ipykernel of this interpreter, a scratch
working directory, this repository on ``PYTHONPATH``); a cell error fails with the cell's traceback. Notebooks are
kept without outputs in the repository. A notebook that needs a GPU or a download carries
``metadata.vlm.skip_reason`` and is skipped with that reason. The executed notebooks render to site pages with their
outputs (the renderer of docs/hooks/notebooks.py)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
_spec = importlib.util.spec_from_file_location("docs_notebooks_hook", ROOT / "docs" / "hooks" / "notebooks.py")
hook = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hook)


def test_the_notebooks_are_there():
    assert {p.stem for p in NOTEBOOKS} >= {"quickstart", "ablate", "your_data", "interop", "inspect"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, (f"{path.name}: cells {dirty} hold outputs or execution counts; strip them "
                       f"(Jupyter: Edit > Clear All Outputs, or `jupyter nbconvert --clear-output --inplace`)")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_runs_top_to_bottom_and_renders(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    reason = hook.skip_reason(nb)
    if reason:
        pytest.skip(f"{path.name}: {reason}")
    hook.execute(nb, tmp_path)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    md, images = hook.render(nb, path.stem)
    assert md.count("```python") == sum(c.cell_type == "code" and bool(c.source.strip()) for c in nb.cells)
    assert "```text" in md or images, f"{path.name}: no output rendered"
    for file, data in images.items():
        assert data.startswith(b"\x89PNG") and f"]({file})" in md


def test_a_marked_notebook_is_skipped_with_its_reason_and_rendered_unexecuted():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import torch; torch.ones(1, device='cuda')")],
                                  metadata={"vlm": {"skip_reason": "needs a CUDA GPU"}})
    assert hook.skip_reason(nb) == "needs a CUDA GPU"
    md, _ = hook.render(nb, "gpu")
    assert "needs a CUDA GPU" in md and "```python" in md


def test_renderer_rewrites_links_and_drops_noise():
    assert hook.site_links("[t](../docs/training.md#x) [a](ablate.ipynb)") == "[t](../training.md#x) [a](ablate.md)"
    cell = nbformat.v4.new_code_cell("print(1)")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="a\n"),
                    nbformat.v4.new_output("stream", name="stdout", text="b\n"),
                    nbformat.v4.new_output("stream", name="stderr", text="W1207 x torch/utils/_pytree.py:630] y\n")]
    md, _ = hook.render(nbformat.v4.new_notebook(cells=[cell]), "n")
    assert "```text\na\nb\n```" in md and "_pytree" not in md


def test_the_kernel_is_this_interpreter_with_this_checkout(tmp_path):
    import sys

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import sys, vlm; print(sys.executable); "
                                                                   "print(vlm.__file__)")])
    hook.execute(nb, tmp_path)
    out = "".join(o.get("text", "") for o in nb.cells[0].outputs if o.get("name") == "stdout").split()
    assert out == [sys.executable, str(ROOT / "vlm" / "__init__.py")]
