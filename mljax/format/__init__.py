"""Core ML files: ``.mlpackage`` folders, ``.mlmodel`` files and weight blobs (read and write)."""

from mljax._lazy import lazy_attributes

__all__ = ["BlobReader", "BlobWriter", "load_spec", "save_spec", "LoadedSpec"]

# Loaded on first use: the blob module needs mljax.mil.types (ml_dtypes, ~1-2 s to import), which
# reading a spec (`mljax info`, `mljax predict`'s input checks) does not.
__getattr__, __dir__ = lazy_attributes(__name__, globals(), {
    "BlobReader": "mljax.format.blob", "BlobWriter": "mljax.format.blob",
    "load_spec": "mljax.format.package", "save_spec": "mljax.format.package",
    "LoadedSpec": "mljax.format.package"})
del lazy_attributes
