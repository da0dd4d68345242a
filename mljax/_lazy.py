"""Package attributes loaded on first use (PEP 562), so importing a package stays cheap."""
from __future__ import annotations

import importlib


def lazy_attributes(package: str, namespace: dict, table: dict[str, str]):
    """``(__getattr__, __dir__)`` for ``package``: attribute ``name`` in ``table`` is imported from
    module ``table[name]`` on first access and then kept in ``namespace`` (the package's globals)."""
    def __getattr__(name):
        if name in table:
            value = getattr(importlib.import_module(table[name]), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(namespace) | set(table))

    return __getattr__, __dir__
