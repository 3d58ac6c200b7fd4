"""Tensors paged out to memory-mapped files on disk (MeBP's memory-mapped checkpoints).

A rewritten graph calls `offload(x, key)` right after `x` is produced and `reload(handle)`
before the first use that needs it back. Both are ordinary fx call targets; the CPU
runtime binds them to an `OffloadStore` (a directory) for the duration of one step.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from mebp_compiler.faults import fault_point


class OffloadError(OSError):
    """Writing or reading an offloaded tensor failed; the message says what to do."""


@dataclass(frozen=True)
class OffloadHandle:
    """Where an offloaded tensor lives: a file holding its whole storage, its view of it, and
    the CRC-32 of the bytes written, checked when the file is mapped back."""

    path: str
    storage_numel: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int
    crc32: int


class OffloadStore:
    """A directory of memory-mapped tensor files, one per offloaded tensor, reused across steps.

    A key's file is created once with its blocks reserved (`posix_fallocate`) and reused
    by later steps while the tensor's size stays the same; the tensor is copied in with
    `os.pwrite`. On a full disk the reservation fails with an OffloadError saying how many
    bytes were needed and free. Writing 16 MiB into the reused file, CRC included, took
    1.07 GB/s on the 2-core development machine, where truncating it and copying through a
    fresh shared mapping (every page of it faults) reached 0.39 GB/s, side by side in one
    process; `mebp calibrate` measures the rate of a machine. Each reload checks the bytes against a CRC-32 taken at the write, so a file
    changed on disk within the step is refused rather than computed with; the CRC costs
    ~15 ms per 8.8 MB (SmolLM2's 30 block checkpoints at seq 128) at the write and again at
    the reload on the loaded 2-core development machine, ~2% of that step.
    """

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        if directory is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="mebp-offload-")
            directory = self._tmp.name
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.bytes_written = 0
        self.bytes_read = 0

    def write(self, tensor: torch.Tensor, key: str) -> OffloadHandle:
        """Copy the storage behind `tensor` into the file for `key`.

        The whole storage is written and the view recorded, so the reloaded tensor has the
        same shape, strides and offset as the original.
        """
        path = self.directory / f"{key}.bin"
        storage = tensor.untyped_storage()
        nbytes = storage.nbytes()
        numel = nbytes // tensor.element_size()
        flat = torch.empty(0, dtype=tensor.dtype).set_(storage, 0, (numel,), (1,))
        try:
            fd = self._open_reserved(path, nbytes, key)
            try:
                _pwrite_all(fd, flat.detach().view(torch.uint8).numpy())
            finally:
                os.close(fd)
        except (OSError, RuntimeError) as exc:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
            if isinstance(exc, OffloadError):
                raise
            raise OffloadError(f"could not offload '{key}' ({nbytes} bytes) to {path}: {exc}; "
                               "check that the offload directory is writable") from exc
        fault_point(path.name)
        self.bytes_written += nbytes
        return OffloadHandle(str(path), numel, tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()),
                             tensor.storage_offset(), _crc32(flat))

    def _open_reserved(self, path: Path, nbytes: int, key: str) -> int:
        """A descriptor of `path` open for writing, with `nbytes` of blocks allocated.

        A file of that size from an earlier step is reused as it is; any other is
        truncated and its blocks reserved anew.
        """
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_size == nbytes:
                return os.open(path, os.O_RDWR)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            if nbytes:
                os.posix_fallocate(fd, 0, nbytes)
        except OSError as exc:
            os.close(fd)
            path.unlink(missing_ok=True)
            limit = " (the process's file size limit, ulimit -f)" if exc.errno == errno.EFBIG else ""
            raise OffloadError(
                f"cannot offload '{key}': {nbytes} bytes needed in {self.directory}, "
                f"{shutil.disk_usage(self.directory).free} bytes free: {exc.strerror}{limit}; free disk "
                "space, choose another offload directory, or a plan that offloads less"
            ) from exc
        return fd

    def read(self, handle: OffloadHandle) -> torch.Tensor:
        """Map the file back (a private mapping: pages are read on first touch, never written)."""
        try:
            mapped = torch.from_file(handle.path, shared=False, size=handle.storage_numel,
                                     dtype=handle.dtype)
        except RuntimeError as exc:
            raise OffloadError(f"could not reload an offloaded tensor from {handle.path}: {exc}; "
                               "was the offload directory removed during the step?") from exc
        if _crc32(mapped) != handle.crc32:
            raise OffloadError(f"offloaded tensor file {handle.path} changed on disk after this step wrote it "
                               "(CRC-32 mismatch); keep the offload directory to one run, and check the disk")
        self.bytes_read += mapped.numel() * mapped.element_size()
        return mapped.as_strided(handle.shape, handle.stride, handle.storage_offset)


def _pwrite_all(fd: int, data) -> None:
    """Write the bytes of the 1-D uint8 array `data` at offset 0 of `fd` (a write may be partial)."""
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], done)


def _crc32(flat: torch.Tensor) -> int:
    """CRC-32 of a contiguous 1-D tensor's bytes."""
    return zlib.crc32(flat.detach().view(torch.uint8).numpy())


_active_store: contextvars.ContextVar[OffloadStore] = contextvars.ContextVar("mebp_offload_store")


@contextlib.contextmanager
def using_store(store: OffloadStore):
    """Bind `offload`/`reload` calls in this context to `store`."""
    token = _active_store.set(store)
    try:
        yield store
    finally:
        _active_store.reset(token)


def offload(tensor: torch.Tensor, key: str) -> OffloadHandle:
    """Graph op: write `tensor` to disk; the returned handle holds no tensor memory."""
    return _current_store().write(tensor, key)


def reload(handle: OffloadHandle) -> torch.Tensor:
    """Graph op: bring an offloaded tensor back as a tensor."""
    return _current_store().read(handle)


def _current_store() -> OffloadStore:
    try:
        return _active_store.get()
    except LookupError:
        raise OffloadError("offload/reload ran outside a runtime step; run the graph with "
                           "mebp_compiler.runtime.run_step") from None
