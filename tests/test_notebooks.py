"""Every notebook in notebooks/ runs headless without error (so they can never rot).

    python -m pytest -q tests/test_notebooks.py

Notebooks are committed with outputs stripped; this test executes them with nbclient (kernel
python3, working directory notebooks/) and fails on the first cell that raises. They read
data/demo_tokens.csv.gz, the probe table of the embedded demo pair (committed); 01_quickstart runs
a 4-position probe on the embedded pair itself.
"""

import os
import pathlib

import nbclient
import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
DEMO = ROOT / "data" / "demo_tokens.csv.gz"

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
    assert DEMO.exists(), f"{DEMO.relative_to(ROOT)} is missing: the notebooks read the demo probe table"
    # the kernel inherits this environment: teachdiag imports from the checkout even uninstalled
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT),
                                                                   os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError, naming the cell, on any error


def test_readme_gives_the_headless_command_and_it_is_installed():
    """#21.10.10: a user gets the command, not only the suite; `jupyter execute` runs each notebook in
    its own folder with the same nbclient as above, and comes with nbclient (notebooks and dev extras)."""
    from importlib.metadata import entry_points

    assert "jupyter execute notebooks/*.ipynb" in (ROOT / "README.md").read_text()
    assert "jupyter-execute" in {e.name for e in entry_points(group="console_scripts")}
