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
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch


class OffloadError(OSError):
    """Writing or reading an offloaded tensor failed; the message says what to do."""


@dataclass(frozen=True)
class OffloadHandle:
    """Where an offloaded tensor lives: a file holding its whole storage, and its view of it."""

    path: str
    storage_numel: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int


class OffloadStore:
    """A directory of memory-mapped tensor files, one per offloaded tensor, reused across steps."""

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        if directory is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="mebp-offload-")
            directory = self._tmp.name
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.bytes_written = 0
        self.bytes_read = 0

    def write(self, tensor: torch.Tensor, key: str) -> OffloadHandle:
        """Copy the storage behind `tensor` into the file for `key` through a shared memory map.

        The whole storage is written and the view recorded, so the reloaded tensor has the
        same shape, strides and offset as the original.
        """
        path = self.directory / f"{key}.bin"
        storage = tensor.untyped_storage()
        numel = storage.nbytes() // tensor.element_size()
        flat = torch.empty(0, dtype=tensor.dtype).set_(storage, 0, (numel,), (1,))
        try:
            with open(path, "wb") as f:
                f.truncate(storage.nbytes())
            mapped = torch.from_file(str(path), shared=True, size=numel, dtype=tensor.dtype)
            mapped.copy_(flat)
            del mapped
        except (OSError, RuntimeError) as exc:
            no_space = getattr(exc, "errno", None) == errno.ENOSPC or "space" in str(exc).lower()
            hint = "free disk space or choose another offload directory" if no_space else (
                "check that the offload directory is writable")
            raise OffloadError(
                f"could not offload '{key}' ({storage.nbytes()} bytes) to {path}: {exc}; {hint}"
            ) from exc
        self.bytes_written += storage.nbytes()
        return OffloadHandle(str(path), numel, tensor.dtype, tuple(tensor.shape),
                             tuple(tensor.stride()), tensor.storage_offset())

    def read(self, handle: OffloadHandle) -> torch.Tensor:
        """Map the file back (a private mapping: pages are read on first touch, never written)."""
        try:
            mapped = torch.from_file(handle.path, shared=False, size=handle.storage_numel,
                                     dtype=handle.dtype)
        except RuntimeError as exc:
            raise OffloadError(f"could not reload an offloaded tensor from {handle.path}: {exc}; "
                               "was the offload directory removed during the step?") from exc
        self.bytes_read += mapped.numel() * mapped.element_size()
        return mapped.as_strided(handle.shape, handle.stride, handle.storage_offset)


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
