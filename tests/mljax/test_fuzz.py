"""Fuzzing mljax's boundaries (see tests/mljax/fuzz.py): every case ends in a prediction where one
is allowed or an mljax.errors exception — never a raw exception, never a hang (20 s per case).

CI runs a fixed, seeded sample (< 60 s); ``MLJAX_FUZZ=full`` runs many more cases (minutes), and
``MLJAX_FUZZ_SEED=<n>`` draws another sample.  ``python scripts/reliability.py`` writes the
tally of a full run to docs/reliability.md.
"""
import collections
import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import fuzz  # noqa: E402

pytest.importorskip("coremltools")
pytest.importorskip("sklearn")

FULL = os.environ.get("MLJAX_FUZZ") == "full"
PER_SEED = 200 if FULL else 12


@pytest.fixture(scope="module")
def seeds():
    return fuzz.build_seeds()


def test_every_case_ends_in_a_prediction_or_an_mljax_error(seeds):
    rng = np.random.default_rng(int(os.environ.get("MLJAX_FUZZ_SEED", "0")))
    records = fuzz.run_all(fuzz.cases(seeds, rng, PER_SEED))
    tally = collections.Counter((r.category, r.passed) for r in records)
    categories = {r.category for r in records}
    assert categories == {"protobuf", "blob", "manifest", "filesystem", "input", "update"}, categories
    assert len(records) > 400, len(records)
    failures = [f"{r.category} {r.name}: {r.outcome}" + (" (must fail)" if r.must_fail and r.outcome == "ok" else "")
                for r in records if not r.passed]
    assert not failures, f"{len(failures)} of {len(records)} cases ({dict(tally)}):\n" + "\n".join(failures[:40])
