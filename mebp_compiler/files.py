"""Atomic file writes: a crash leaves the old file or the new one, never half of one.

Each write goes to a hidden temporary sibling (`.<stem>.tmp<suffix>`, so writers that go by
the suffix still see it), which is flushed to disk (fsync) before it is renamed over the
target; the directory is flushed after the rename. A process killed at any instant leaves
the old file or the new one; with the fsyncs, so does a power loss on a file system that
honours them. A failed write removes its temporary file and raises `WriteError`, which says
how many bytes were free.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from safetensors import SafetensorError

from mebp_compiler.faults import fault_point


class WriteError(OSError):
    """A file could not be written (disk full, file size limit, permissions); the message says which and why."""


def temporary_sibling(path: Path) -> Path:
    return path.with_name(f".{path.stem}.tmp{path.suffix}")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` to write the whole file at a temporary sibling, then commit it as `path`."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        write(tmp)
        fsync_file(tmp)
    except (OSError, SafetensorError) as exc:
        _remove(tmp)
        raise write_error(path, exc) from exc
    except BaseException:
        _remove(tmp)
        raise
    fault_point(path.name)
    os.replace(tmp, path)
    fsync_directory(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: str | os.PathLike, data: object) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2))


def write_error(path: Path, exc: BaseException) -> WriteError:
    """`exc`, raised writing `path`, as a one-line WriteError with the bytes free where it was written."""
    reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
    try:
        free = f"; {shutil.disk_usage(path.parent).free} bytes free there"
    except OSError:
        free = ""
    error = WriteError(f"cannot write {path}: {reason}{free}; free some space or write elsewhere")
    error.errno = getattr(exc, "errno", None)
    return error


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(path: Path) -> None:
    """Flush a directory's entries (the names created, renamed or removed in it) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush every file and directory under `path` (and `path` itself) to disk."""
    for root, _, names in os.walk(path):
        for name in names:
            fsync_file(Path(root) / name)
        fsync_directory(Path(root))


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
