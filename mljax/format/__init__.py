"""Core ML files: ``.mlpackage`` folders, ``.mlmodel`` files and weight blobs (read and write)."""

__all__ = ["BlobReader", "BlobWriter", "load_spec", "save_spec", "LoadedSpec"]

# Loaded on first use: the blob module needs mljax.mil.types (ml_dtypes, ~1-2 s to import), which
# reading a spec (`mljax info`, `mljax predict`'s input checks) does not.
_LAZY = {"BlobReader": "mljax.format.blob", "BlobWriter": "mljax.format.blob",
         "load_spec": "mljax.format.package", "save_spec": "mljax.format.package",
         "LoadedSpec": "mljax.format.package"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mljax.format' has no attribute {name!r}")
