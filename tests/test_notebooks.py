"""Every research notebook in notebooks/ runs top to bottom without an error.

The notebooks are stored with the outputs of a full run (``scripts/run_notebooks.py`` writes
them), so a reader sees the plots and tables; the tests check that stored run is complete and
error-free, and execute each notebook again, fresh, headless with nbclient in a kernel that runs
*this* interpreter (a kernel spec written into a temporary folder), with ``MPLBACKEND=Agg``.  nbclient, nbformat and ipykernel are in the test extra: when they are
missing this module fails at import, it is not skipped.
"""
import os
import sys
from pathlib import Path

import pytest

try:
    import nbformat
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient
except ImportError as e:  # fail loudly: the notebooks are part of the test suite
    raise ImportError(f"the notebook tests need nbclient, nbformat and ipykernel (pip install -e '.[test]'): {e}") from e

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
EXPECTED = {"01_open_predict_inspect.ipynb", "02_frozen_vs_updatable.ipynb", "03_typed_execution.ipynb",
            "04_population.ipynb"}
KERNEL = "mljax-test-python3"
CELL_TIMEOUT_S = 300


def test_the_notebooks_are_there():
    assert EXPECTED <= {p.name for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stored_with_the_outputs_of_a_full_run(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), \
        f"{path.name}: not one complete run in order (execution counts {counts}); run scripts/run_notebooks.py"
    errors = [o.get("ename") for c in code for o in c.outputs if o.get("output_type") == "error"]
    assert not errors, f"{path.name}: the stored run has errors {errors}"
    plots = sum("plt." in c.source for c in code)
    images = sum("image/png" in o.get("data", {}) for c in code for o in c.outputs)
    assert images >= plots, f"{path.name}: {plots} cells plot but {images} images are stored (MPLBACKEND=Agg?)"


@pytest.fixture(scope="module")
def kernel_specs(tmp_path_factory):
    """A kernel spec whose argv is this interpreter (``sys.executable -m ipykernel_launcher``)."""
    kernels = tmp_path_factory.mktemp("kernels")
    write_kernel_spec(kernels / KERNEL)
    return KernelSpecManager(kernel_dirs=[str(kernels)])


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, kernel_specs, tmp_path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    assert kernel_specs.get_kernel_spec(KERNEL).argv[0] == sys.executable
    nb = nbformat.read(path, as_version=4)
    km = KernelManager(kernel_name=KERNEL, kernel_spec_manager=kernel_specs)
    client = NotebookClient(nb, km=km, kernel_name=KERNEL, timeout=CELL_TIMEOUT_S,
                            allow_errors=False, resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError (with the cell and traceback) on any error
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
