"""Test-harness speed-up for coremltools: skip the full ``gc.collect()`` that ends every ``ct.convert``.

In a process holding coremltools, torch and jax that collection takes ~0.75 s, most of the
time of a small conversion.  It only frees memory (Python's generational collector still
runs), so tests let it collect the young generation only.  Used by ``tests/conftest.py`` and
by the coremltools suite plugin (``--mljax-full-gc`` there keeps the original).
"""
from __future__ import annotations

import gc


class _YoungOnly:
    """Stands in for the ``gc`` module inside coremltools' converter entry point."""

    def __getattr__(self, name):
        return getattr(gc, name)

    @staticmethod
    def collect(generation: int = 0) -> int:
        return gc.collect(min(generation, 0))


def skip_full_gc_per_convert() -> bool:
    """Patch ``coremltools.converters._converters_entry``; False when coremltools is missing."""
    try:
        import coremltools.converters._converters_entry as entry
    except ImportError:
        return False
    entry.gc = _YoungOnly()
    return True
