"""The weight blob file (storage version 2) of ML programs: memory-mapped reads, aligned writes.

Layout (little-endian, every record and data block 64-byte aligned): a 64-byte header
``uint32 count, uint32 version=2``; per weight a 64-byte metadata record ``uint32
sentinel=0xDEADBEEF, uint32 dtype, uint64 size_in_bytes, uint64 data_offset,
uint64 padding_size_in_bits``; the data at ``data_offset``.  A program's blob offset
points at the metadata record.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mljax.errors import ModelFormatError
from mljax.format.fs import open_regular
from mljax.mil.types import DTYPES, DType

__all__ = ["BlobReader", "BlobWriter", "BLOB_DTYPE_CODES"]

_ALIGN = 64
_SENTINEL = 0xDEADBEEF
_HEADER = np.dtype([("count", "<u4"), ("version", "<u4")])
_RECORD = np.dtype([("sentinel", "<u4"), ("dtype", "<u4"), ("size", "<u8"),
                    ("offset", "<u8"), ("padding_bits", "<u8")])

#: Blob dtype code -> MIL dtype name.
BLOB_DTYPE_CODES = {1: "fp16", 2: "fp32", 3: "uint8", 4: "int8", 5: "bf16", 6: "int16",
                    7: "uint16", 8: "int4", 9: "uint1", 10: "uint2", 11: "uint4", 12: "uint3",
                    13: "uint6", 14: "int32", 15: "uint32", 16: "fp8e4m3fn", 17: "fp8e5m2"}
_CODE_OF = {v: k for k, v in BLOB_DTYPE_CODES.items()}


def _unpack_bits(raw: np.ndarray, bits: int, count: int, signed: bool) -> np.ndarray:
    """Sub-byte values, packed least-significant bits first."""
    as_bits = np.unpackbits(raw, bitorder="little")[: count * bits].reshape(count, bits)
    values = (as_bits.astype(np.int32) << np.arange(bits, dtype=np.int32)).sum(axis=1)
    if signed:
        values = np.where(values >= 1 << (bits - 1), values - (1 << bits), values)
    return values


class BlobReader:
    """Reads weights from one blob file through a read-only memory map (no copy of the file)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        fd, size = open_regular(self.path, "weight file")
        if size < _ALIGN:
            os.close(fd)
            raise ModelFormatError(
                f"weight file {self.path} is {size} bytes; expected at least a {_ALIGN}-byte header")
        try:
            with os.fdopen(fd, "rb", closefd=False) as f:
                self._map = np.memmap(f, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as e:
            raise ModelFormatError(f"cannot read weight file {self.path}: {e}") from None
        finally:
            os.close(fd)
        header = self._map[: _HEADER.itemsize].view(_HEADER)[0]
        if int(header["version"]) != 2:
            raise ModelFormatError(
                f"weight file {self.path} has storage version {int(header['version'])}; expected 2")
        self.count = int(header["count"])

    def read(self, offset: int, dtype: DType | None = None, shape=None) -> np.ndarray:
        """The array whose metadata record is at ``offset``; a view into the map when byte-aligned."""
        size = self._map.size
        if offset < 0 or offset + _RECORD.itemsize > size:
            raise ModelFormatError(
                f"weight offset {offset} is outside {self.path} ({size} bytes)")
        rec = self._map[offset: offset + _RECORD.itemsize].view(_RECORD)[0]
        if int(rec["sentinel"]) != _SENTINEL:
            raise ModelFormatError(
                f"no weight record at offset {offset} of {self.path}: expected sentinel "
                f"0xDEADBEEF, found {int(rec['sentinel']):#x}")
        code = int(rec["dtype"])
        if code not in BLOB_DTYPE_CODES:
            raise ModelFormatError(f"weight at offset {offset} of {self.path} has unknown dtype code {code}")
        blob_dtype = DTYPES[BLOB_DTYPE_CODES[code]]
        start, nbytes = int(rec["offset"]), int(rec["size"])
        if start < 0 or start + nbytes > size:
            raise ModelFormatError(
                f"weight at offset {offset} of {self.path} claims bytes [{start}, {start + nbytes}) "
                f"but the file has {size} bytes")
        raw = self._map[start: start + nbytes]
        where = f"weight at offset {offset} of {self.path}"
        if blob_dtype.bits % 8 == 0:
            if nbytes % blob_dtype.numpy.itemsize:
                raise ModelFormatError(
                    f"{where} holds {nbytes} bytes of {blob_dtype.name}: expected a multiple of "
                    f"{blob_dtype.numpy.itemsize}")
            values = raw.view(blob_dtype.numpy)
        else:
            padding = int(rec["padding_bits"])
            if padding > nbytes * 8:
                raise ModelFormatError(
                    f"{where} declares {padding} padding bits: expected at most its {nbytes * 8} bits")
            count = (nbytes * 8 - padding) // blob_dtype.bits
            values = _unpack_bits(np.asarray(raw), blob_dtype.bits, count, blob_dtype.name == "int4")
            values = values.astype(blob_dtype.numpy)
        if dtype is not None and dtype.name != blob_dtype.name and dtype.bits == blob_dtype.bits \
                and dtype.bits % 8 == 0:
            values = values.view(dtype.numpy)
        if shape is not None:
            expected = 1
            for d in shape:
                expected *= int(d)
            if values.size != expected:
                raise ModelFormatError(
                    f"weight at offset {offset} of {self.path} holds {values.size} values; "
                    f"the program declares shape {tuple(shape)} ({expected} values)")
            values = values.reshape(shape)
        return values


def _pack_bits(values: np.ndarray, bits: int) -> tuple[bytes, int]:
    flat = values.astype(np.int64).ravel() & ((1 << bits) - 1)
    as_bits = ((flat[:, None] >> np.arange(bits)) & 1).astype(np.uint8).ravel()
    padding = (-as_bits.size) % 8
    packed = np.packbits(np.concatenate([as_bits, np.zeros(padding, np.uint8)]), bitorder="little")
    return packed.tobytes(), padding


class BlobWriter:
    """Writes a blob file in the layout Apple's tools write; ``write`` returns the record offset."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._f = open(self.path, "wb")
        self._count = 0
        self._f.write(b"\0" * _ALIGN)

    def write(self, values: np.ndarray, dtype: DType | None = None) -> int:
        values = np.asarray(values)
        name = dtype.name if dtype is not None else None
        if name is None:
            name = {np.dtype(np.bool_): "uint8", np.dtype(np.int64): "int32",
                    np.dtype(np.float64): "fp32"}.get(values.dtype)
            if name is None:
                from mljax.mil.types import dtype_from_numpy
                name = dtype_from_numpy(values.dtype).name
        if name not in _CODE_OF:
            raise ModelFormatError(f"dtype {name} cannot be stored in a weight blob")
        mil = DTYPES[name]
        if mil.bits % 8:
            data, padding = _pack_bits(values, mil.bits)
        else:
            data, padding = np.ascontiguousarray(values.astype(mil.numpy)).tobytes(), 0
        # Align each record (Apple's writer pads before a record, so the file ends right after
        # the last data block).
        self._f.write(b"\0" * ((-self._f.tell()) % _ALIGN))
        record_at = self._f.tell()
        data_at = record_at + _ALIGN
        rec = np.zeros(1, _RECORD)
        rec[0] = (_SENTINEL, _CODE_OF[name], len(data), data_at, padding)
        self._f.write(rec.tobytes().ljust(_ALIGN, b"\0"))
        self._f.write(data)
        self._count += 1
        return record_at

    def close(self) -> None:
        if self._f.closed:
            return
        self._f.seek(0)
        header = np.zeros(1, _HEADER)
        header[0] = (self._count, 2)
        self._f.write(header.tobytes())
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
