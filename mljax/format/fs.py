"""File-system safety for model packages: paths stay inside, files are regular, swaps are atomic.

* :func:`inside` resolves a path (links included) and refuses one that leaves its root; the root
  is the package folder itself, so a ``Data`` folder or a ``Manifest.json`` that links elsewhere
  is refused too.
* :func:`open_regular` / :func:`read_regular` open only regular files (never a FIFO, a device or
  a folder), without blocking, and bound what they read.
* :func:`exchange` swaps two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``, macOS
  ``renamex_np(RENAME_SWAP)``); it returns ``False`` where the OS has no such call.
* :func:`copy_weights` copies a weights folder, refusing links that leave the source package and
  anything that is not a regular file or a folder.
* Staging names (``.<name>.mljax-<pid>-<hex>.tmp``) let the next save remove what a killed
  save left behind (:func:`clean_leftovers`).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
import shutil
import stat
import sys
import uuid
from pathlib import Path

from mljax.errors import ModelFormatError

__all__ = ["resolve", "exists", "inside", "open_regular", "read_regular", "exchange", "copy_weights",
           "staging_path", "clean_leftovers"]

_BLOCK = 1 << 20


def resolve(path: Path, what: str) -> Path:
    """``path.resolve()``; a link loop or an over-long name is a :class:`ModelFormatError`."""
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError, ValueError) as e:
        raise ModelFormatError(f"{what} {path}: cannot resolve the path ({e})") from None


def inside(root: Path, rel, what: str) -> Path:
    """``root / rel`` with its links resolved; refused unless it stays inside ``root``."""
    if "\0" in str(rel):
        raise ModelFormatError(f"{what} path {rel!r} contains a NUL byte")
    target = resolve(Path(root) / rel, what)
    base = resolve(root, what)
    if not target.is_relative_to(base):
        raise ModelFormatError(
            f"{what} path {rel!r} escapes the package folder {root} (it resolves to {target})")
    return target


def exists(path: Path) -> bool:
    """``path.exists()`` that answers False (instead of raising) for names the OS cannot look up."""
    try:
        os.stat(path)
    except (OSError, ValueError):
        return False
    return True


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _stat(path: Path, what: str) -> os.stat_result:
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise ModelFormatError(f"{what} {path} does not exist") from None
    except (OSError, ValueError) as e:
        raise ModelFormatError(f"{what} {path}: cannot read it ({e})") from None


def open_regular(path: Path, what: str, limit: int | None = None) -> tuple[int, int]:
    """``(fd, size)`` of the regular file ``path``: refuses special files and folders (before
    opening them, and again on the open descriptor) and files larger than ``limit`` bytes."""
    st = _stat(path, what)
    if not stat.S_ISREG(st.st_mode):
        raise ModelFormatError(f"{what} {path}: expected a regular file, found {_kind(st.st_mode)}")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise ModelFormatError(f"{what} {path}: cannot open it ({e.strerror})") from None
    st = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(st.st_mode):
        problem = f"expected a regular file, found {_kind(st.st_mode)}"
    elif limit is not None and st.st_size > limit:
        problem = f"expected at most {limit:,} bytes, found {st.st_size:,}"
    if problem:
        os.close(fd)
        raise ModelFormatError(f"{what} {path}: {problem}")
    return fd, st.st_size


def read_regular(path: Path, what: str, limit: int) -> bytes:
    """The bytes of the regular file ``path`` (at most ``limit`` of them)."""
    fd, size = open_regular(path, what, limit)
    chunks, total = [], 0
    try:
        while True:
            chunk = os.read(fd, min(_BLOCK, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise ModelFormatError(f"{what} {path}: expected at most {limit:,} bytes, found more")
    except OSError as e:
        raise ModelFormatError(f"{what} {path}: cannot read it ({e.strerror})") from None
    finally:
        os.close(fd)
    return b"".join(chunks)


# --- atomic exchange ---------------------------------------------------------------------------
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2   # Linux renameat2 flag
_RENAME_SWAP = 2       # macOS renamex_np flag


def _load_exchange():
    """The C call that swaps two paths, as ``f(a_bytes, b_bytes) -> int``; None where none exists."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        fn = libc.renameat2
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        return lambda a, b: fn(_AT_FDCWD, a, _AT_FDCWD, b, _RENAME_EXCHANGE)
    if sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        fn = libc.renamex_np
        fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        return lambda a, b: fn(a, b, _RENAME_SWAP)
    return None


_EXCHANGE = _load_exchange()
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, getattr(errno, "ENOTSUP", -1), getattr(errno, "EOPNOTSUPP", -1)}


def exchange(a: Path, b: Path) -> bool:
    """Swap the entries ``a`` and ``b`` atomically; ``False`` (nothing changed) where the OS or
    the file system cannot."""
    if _EXCHANGE is None:
        return False
    if _EXCHANGE(os.fsencode(a), os.fsencode(b)) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, f"cannot exchange {a} and {b}: {os.strerror(err)}")


# --- staging and leftovers ---------------------------------------------------------------------
def staging_path(dest: Path, kind: str) -> Path:
    """A fresh name beside ``dest`` for a save in progress (``kind``: ``tmp`` or ``old``)."""
    return dest.parent / f".{dest.name}.mljax-{os.getpid()}-{uuid.uuid4().hex[:12]}.{kind}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def clean_leftovers(dest: Path) -> list[Path]:
    """Remove what killed saves to ``dest`` left beside it (their process is gone); returns them."""
    pattern = re.compile(rf"^\.{re.escape(dest.name)}\.mljax-(\d+)-[0-9a-f]+\.(tmp|old)$")
    removed = []
    try:
        entries = list(os.scandir(dest.parent))
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if not m or (_alive(int(m.group(1))) and int(m.group(1)) != os.getpid()):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            with _suppress_os():
                os.unlink(entry.path)
        removed.append(Path(entry.path))
    return removed


class _suppress_os:
    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        return kind is not None and issubclass(kind, OSError)


# --- copying a weights folder --------------------------------------------------------------------
def copy_weights(src: Path, dst: Path, root: Path) -> None:
    """Copy the folder ``src`` to ``dst`` (which must not exist), bytes from inside ``root`` only.

    A link is followed only when its target resolves inside ``root`` (the source model's folder);
    FIFOs, devices and sockets are refused, so a save never copies bytes from outside the package.
    """
    base = resolve(root, "weights folder")
    src_real = resolve(src, "weights folder")
    if not src_real.is_relative_to(base):
        raise ModelFormatError(f"weights folder {src} resolves to {src_real}, outside the model folder {root}")
    os.mkdir(dst)
    for entry in sorted(os.scandir(src), key=lambda e: e.name):
        target = Path(entry.path)
        real = resolve(target, "weight file")
        if not real.is_relative_to(base):
            raise ModelFormatError(
                f"weight file {target} links to {real}, outside the model folder {root}: refusing to copy it")
        st = _stat(real, "weight file")
        if stat.S_ISDIR(st.st_mode):
            copy_weights(real, dst / entry.name, root)
        elif stat.S_ISREG(st.st_mode):
            _copy_file(real, dst / entry.name)
        else:
            raise ModelFormatError(f"weight file {target}: expected a regular file, found {_kind(st.st_mode)}")


def _copy_file(src: Path, dst: Path) -> None:
    fd, _ = open_regular(src, "weight file")
    try:
        with os.fdopen(fd, "rb", closefd=False) as fin, open(dst, "xb") as fout:
            shutil.copyfileobj(fin, fout, _BLOCK)
    finally:
        os.close(fd)
