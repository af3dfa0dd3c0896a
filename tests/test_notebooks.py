"""The tutorial notebooks: committed with cleared outputs, and every one runs without error.

Each notebook is executed top to bottom in a fresh ``python3`` kernel with
``JAXBP_NOTEBOOK_SMALL=1``, which the notebooks read to shrink epochs and sizes.
A cell that raises — including a failed ``assert`` — fails the test and shows
the cell's traceback.

Outputs are never committed: a committed notebook has no outputs and no
execution counts, so its diff shows only what changed in the lesson, and the
numbers a reader sees are always the ones their own run computes.
"""

import pathlib

import nbformat
import pytest

NOTEBOOKS_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
EXPECTED = [
    "01_forward_propagation",
    "02_backprop_by_hand",
    "03_computational_graph_and_memory",
    "04_convolution_and_pooling",
    "05_gradient_checking",
    "06_training",
    "07_state_and_randomness",
    "08_backprop_through_time",
    "09_write_your_own_layer",
    "10_attention_by_hand",
]
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))


def _read(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    return nb


def test_every_lesson_has_its_notebook():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    nb = _read(path)
    assert nb.metadata.kernelspec.name == "python3"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {i} has outputs; clear them"
            assert cell.execution_count is None, f"{path.name} cell {i} has an execution count"
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "import jaxbp" in code or "from jaxbp" in code
    assert "JAXBP_NOTEBOOK_SMALL" in code, "the notebook must honour small mode"
    assert "assert " in code
    assert "from tests" not in code and "import tests" not in code, "tests are not installed"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("JAXBP_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = _read(path)
    client = NotebookClient(
        nb,
        timeout=240,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS_DIR)}},
    )
    client.execute()  # raises CellExecutionError with the failing cell's traceback
    errors = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if out.output_type == "error"
    ]
    assert not errors
