"""Test-wide setup: helper modules importable, JAX on the CPU unless told otherwise."""
import os
import sys
from pathlib import Path

if os.environ.get("MLJAX_TEST_GPU") is None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Tests run with --import-mode=importlib; shared helper modules (helpers.py, and the
# _util/models modules beside some test files) are imported by plain name.
_ROOT = Path(__file__).parent
for _dir in (_ROOT, _ROOT / "updatable", _ROOT / "mljax" / "classic"):
    if str(_dir) not in sys.path:
        sys.path.insert(0, str(_dir))

# ct.convert ends with a full gc.collect() (~0.75 s each with torch + jax loaded): young generation only
sys.path.insert(0, str(_ROOT / "coremltools_suite"))
from ct_speed import skip_full_gc_per_convert  # noqa: E402

skip_full_gc_per_convert()
