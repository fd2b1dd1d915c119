"""The notebooks run top to bottom (small size: JDEQ_NOTEBOOK_SMALL=1) and are stored without outputs."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
# figures each notebook must draw; the quickstart's are its training curves, residual traces and step histogram
FIGURES = {"01_quickstart.ipynb": 3}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


# The default suite executes the quickstart. The paper notebooks (02-04) run their experiments' code, which
# tests/test_experiments.py and tests/test_scaling.py check on known answers, and 05/06 train through the layers
# and fit, which tests/test_fit_flax.py and tests/test_well_posed.py cover (07/08 train the zoo models, which
# tests/test_zoo.py covers); executing them takes ~150 s of the
# default suite's 15-minute budget, so they run in `make test-slow`.
SLOW_NOTEBOOKS = (
    "02_kawaguchi2021.ipynb",
    "03_gao2022.ipynb",
    "04_ling2023.ipynb",
    "05_flax_modules.ipynb",
    "06_well_posed.ipynb",
    "07_mdeq.ipynb",
    "08_deq_transformer.ipynb",
)


@pytest.mark.parametrize(
    "path",
    [pytest.param(p, marks=pytest.mark.slow) if p.name in SLOW_NOTEBOOKS else p for p in NOTEBOOKS],
    ids=[p.name for p in NOTEBOOKS],
)
def test_notebook_executes_at_small_size(path, tmp_path, monkeypatch):
    monkeypatch.setenv("JDEQ_NOTEBOOK_SMALL", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel then draws inline
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    images = [o for cell in nb.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    expected = FIGURES.get(path.name)
    assert len(images) == expected if expected else len(images) >= 1, f"{path.name} drew {len(images)} figures"
