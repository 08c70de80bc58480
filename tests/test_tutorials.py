"""Execute the teaching notebooks in docs/tutorials/ (jupytext percent files) with nbclient.

Each notebook must run without a cell error, well under 60 s on a 2-core CPU. The kernel is
``python3``: jupyter_client replaces the kernelspec's ``python`` by ``sys.executable``, so the
notebooks run in the interpreter that runs pytest (the .venv); `test_kernel_is_this_python`
checks that.
"""
import pathlib
import sys
import time

import pytest

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

ROOT = pathlib.Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "docs" / "tutorials").glob("[0-9][0-9]_*.py"))
CELL_TIMEOUT = 120          # s per cell (a safety net; each notebook runs in well under 60 s)


def _execute(nb, cwd):
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(cwd)}})
    client.execute()
    return nb


def test_kernel_is_this_python(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import sys; print(sys.executable)")])
    out = _execute(nb, tmp_path).cells[0].outputs[0]["text"].strip()
    assert pathlib.Path(out).resolve() == pathlib.Path(sys.executable).resolve()


def test_four_tutorials_found():
    assert [p.name[:2] for p in TUTORIALS] == ["01", "02", "03", "04"]


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_executes(path, tmp_path):
    nb = jupytext.read(path)
    first_md = next(c for c in nb.cells if c.cell_type == "markdown")
    assert first_md.source.lstrip().startswith("# "), "the first markdown cell must be a '# Title' heading"
    assert any(c.cell_type == "markdown" and c.source.lstrip().startswith("## Exercises") for c in nb.cells), \
        "a tutorial ends with an '## Exercises' markdown cell"
    start = time.perf_counter()
    _execute(nb, tmp_path)          # raises CellExecutionError on any cell error
    elapsed = time.perf_counter() - start
    print(f"{path.name}: {elapsed:.1f} s")
