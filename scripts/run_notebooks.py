"""Execute the research notebooks and store them with their outputs (plots, tables, prints).

The notebooks in ``notebooks/`` are committed with the outputs of a run of this script, so a
reader of the repository sees the results; ``tests/test_notebooks.py`` still executes every
notebook fresh and checks that the stored ones carry a complete, error-free run.

Usage: ``python scripts/run_notebooks.py [notebooks/NAME.ipynb ...]`` (default: all of them).
Each runs headless (nbclient) in a kernel on this interpreter, in a temporary working folder,
with matplotlib's inline backend so the plots are stored as PNG outputs (``MPLBACKEND`` is
unset: ``Agg`` would make ``plt.show()`` store nothing); needs the test extra
(``pip install -e ".[test]"``).
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNEL = "mljax-notebook-python3"
CELL_TIMEOUT_S = 600
# stderr lines not worth storing: coremltools' Linux/version notices, tqdm's widget notice
_NOISE = re.compile(r"Failed to load _ML\w+Proxy|has not been tested with coremltools|TqdmWarning: IProgress|"
                    r"warnings\.warn\(|from \.autonotebook import|^\s*$")


def _tidy(outputs: list) -> list:
    """Consecutive stream outputs merged; a progress bar kept as its final state (``\\r`` lines
    collapsed); stderr notices in ``_NOISE`` dropped."""
    import nbformat
    tidy = []
    for out in outputs:
        if out.get("output_type") != "stream":
            tidy.append(out)
            continue
        if tidy and tidy[-1].get("output_type") == "stream" and tidy[-1]["name"] == out["name"]:
            tidy[-1]["text"] += out["text"]
        else:
            tidy.append(nbformat.v4.new_output("stream", name=out["name"], text=out["text"]))
    for out in tidy:
        if out.get("output_type") == "stream":
            lines = [line.rsplit("\r", 1)[-1] for line in out["text"].split("\n")]
            if out["name"] == "stderr":
                lines = [line for line in lines if not _NOISE.search(line)]
            out["text"] = "\n".join(lines).strip("\n") + "\n" if any(lines) else ""
    return [o for o in tidy if o.get("output_type") != "stream" or o["text"]]


def run(path: Path, specs) -> float:
    """Execute ``path`` in place (outputs replaced); seconds taken."""
    import nbformat
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient
    nb = nbformat.read(path, as_version=4)
    km = KernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mljax-nb-") as cwd:
        NotebookClient(nb, km=km, kernel_name=KERNEL, timeout=CELL_TIMEOUT_S, allow_errors=False,
                       resources={"metadata": {"path": cwd}}).execute()
    for cell in nb.cells:               # no per-cell timestamps: reruns differ only in results
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.outputs = _tidy(cell.outputs)
    nb.metadata.get("kernelspec", {}).update(name="python3", display_name="Python 3")
    nbformat.validate(nb)
    nbformat.write(nb, path)
    return time.perf_counter() - t0


def main(argv: list[str]) -> int:
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client.kernelspec import KernelSpecManager
    os.environ.pop("MPLBACKEND", None)     # the kernel's inline backend: plots become outputs
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    paths = [Path(p).resolve() for p in argv] or sorted((ROOT / "notebooks").glob("*.ipynb"))
    with tempfile.TemporaryDirectory(prefix="mljax-kernels-") as kernels:
        write_kernel_spec(Path(kernels) / KERNEL)
        specs = KernelSpecManager(kernel_dirs=[kernels])
        for path in paths:
            print(f"{path.relative_to(ROOT)}: running ...", flush=True)
            print(f"{path.relative_to(ROOT)}: stored with outputs ({run(path, specs):.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
