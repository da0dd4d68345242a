"""Core ML files: ``.mlpackage`` folders, ``.mlmodel`` files and weight blobs (read and write)."""
from mljax.format.blob import BlobReader, BlobWriter
from mljax.format.package import load_spec, save_spec, LoadedSpec

__all__ = ["BlobReader", "BlobWriter", "load_spec", "save_spec", "LoadedSpec"]
