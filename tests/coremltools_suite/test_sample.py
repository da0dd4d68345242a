"""CI: a fixed sample of coremltools' own op tests runs on mljax at a minimum pass rate.

The sample (``sample_nodeids.txt``, one backend test per test class of coremltools' MIL op
tests) runs in a subprocess through ``scripts/conformance.py --sample``, so the plugin's
macOS pretence never leaks into this test session.  Raise the thresholds as ops land.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MIN_PASS_RATE = 0.97   # (the full suite passes 100%) among the sampled tests that reach predict / make_state
MIN_REACHED = 130      # of 168 sampled tests; ~20 never call predict (builder / type checks)


@pytest.mark.slow
def test_fixed_sample_of_coremltools_op_tests(tmp_path):
    pytest.importorskip("coremltools")
    pytest.importorskip("PIL", reason="coremltools' test utilities import Pillow")
    results = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "conformance.py"), "--sample", "--results", str(results),
         "--min-pass-rate", str(MIN_PASS_RATE), "--min-reached", str(MIN_REACHED)],
        cwd=ROOT, capture_output=True, text=True, timeout=1800)
    report = proc.stdout[-4000:] + proc.stderr[-2000:]
    meta = json.loads((results / "meta.json").read_text())
    assert meta["pytest_exit"] in (0, 1), f"pytest exit {meta['pytest_exit']} (5 = nothing collected)\n{report}"
    assert proc.returncode == 0, report
