"""Output directories replaced whole, and one writer at a time (output files too).

`mebp train --out DIR` and `mebp compile -o DIR` write their results as a unit: the
adapter, history and plot of one run; the schedule, manifest, weights and artifacts of one
compile. The new directory is written in full next to the old one, then swapped in:

    PARENT/.DIR.staging   the new directory while it is written
    PARENT/.DIR.old       the old one, moved aside for the instant of the swap
    PARENT/.DIR.lock      flock()ed by the process writing DIR; holds its pid

Commit: fsync every file and directory under the staging copy, rename DIR to .DIR.old,
rename the staging copy to DIR, fsync PARENT, remove .DIR.old. A process killed at any
instant leaves DIR as the old directory or the new one, whole, except in the instant
between the two renames, when DIR is missing and both copies are whole; `recover` (run by
the next writer, under the lock) finishes that commit and removes every other leftover.
After a power loss the same holds where the file system honours fsync (ext4, xfs, btrfs,
APFS); a disk that acknowledges writes it has not made can still lose them.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import os
import re
import shutil
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path

from mebp_compiler.checksums import sha256_path
from mebp_compiler.faults import fault_point
from mebp_compiler.files import atomic_write_bytes, atomic_write_text, fsync_directory, fsync_tree, temporary_sibling

CHECKSUMS_FILE = "SHA256SUMS"
#: What a train run directory holds (`mebp train --out`).
TRAIN_ENTRIES = ("adapter", "history.json", "loss.png", "memory.png", "checkpoint")
#: What a federated run directory holds (`mebp federate --out`).
FEDERATE_ENTRIES = ("adapter", "history.json")
#: What a compile directory holds (`mebp compile -o`, with or without --target).
COMPILE_ENTRIES = ("schedule.json", "memory.json", "manifest.json", "weights.safetensors", "*.onnx", "*.mlxfn",
                   "*.mlpackage", "coreml-check.json")


class RunDirectoryError(ValueError):
    """An output directory that cannot be replaced, or whose files do not match their checksums."""


class RunDirectoryBusy(RunDirectoryError):
    """Another process is writing the same output."""


def _sibling(path: Path, what: str) -> Path:
    return path.with_name(f".{path.name}.{what}")


def recover(path: str | os.PathLike) -> None:
    """Finish or undo what an interrupted replacement of `path` left behind.

    Killed between the two renames, `path` is missing while the old copy and the whole new
    one exist: the new one is put in place. Then any staging or old copy is removed.
    """
    path = Path(path)
    staging, aside = _sibling(path, "staging"), _sibling(path, "old")
    if aside.exists() and not path.exists():
        os.rename(staging if staging.exists() else aside, path)
    for leftover in (staging, aside):
        if leftover.exists():
            shutil.rmtree(leftover)
    if path.parent.exists():
        fsync_directory(path.parent)


@contextlib.contextmanager
def replaced(path: str | os.PathLike) -> Iterator[Path]:
    """Write the new contents of directory `path` into the yielded staging directory; on a
    normal exit they replace `path` whole, on an exception `path` is left as it was.

    Not safe against another process replacing the same `path` at the same time: hold a
    `RunLock` (as `RunDirectory` does) where that can happen.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    staging, aside = _sibling(path, "staging"), _sibling(path, "old")
    staging.mkdir()
    try:
        yield staging
        fsync_tree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if path.exists():
        os.rename(path, aside)
        fault_point(f"{path.name}/aside")
    os.rename(staging, path)
    fsync_directory(path.parent)
    fault_point(f"{path.name}/swapped")
    if aside.exists():
        shutil.rmtree(aside)
        fsync_directory(path.parent)


class RunLock:
    """An exclusive lock on the output `path` (a flock on PARENT/.NAME.lock) while it is open.

    A second process is refused at once with RunDirectoryBusy naming the holder's pid. The
    lock file is removed on release; a killed holder's lock is released by the kernel and
    its file is taken over by the next writer.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = _sibling(path, "lock")
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunDirectoryBusy(f"{path} is being written by another mebp process (pid {holder}); "
                                       "wait for it to finish, or choose another output") from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the holder removed the file between our open and our lock: take the new one
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._release = weakref.finalize(self, _release, fd, self.path)

    def close(self) -> None:
        self._release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _release(fd: int, path: Path) -> None:
    path.unlink(missing_ok=True)
    os.close(fd)


class RunDirectory:
    """The output directory `path` of one command, locked while this object lives.

    Opening it takes the lock, recovers an interrupted earlier write, and refuses a directory
    holding anything but `entries` (fnmatch patterns; a replacement would delete the rest).
    `replace()` then writes the new directory whole, with a SHA256SUMS of its files
    (`sha256sum -c SHA256SUMS` checks them, as does `check`).
    """

    def __init__(self, path: str | os.PathLike, entries: Sequence[str]) -> None:
        self.path = Path(path).resolve()
        self.lock = RunLock(self.path)
        try:
            recover(self.path)
            _refuse_foreign(self.path, (*entries, CHECKSUMS_FILE))
        except BaseException:
            self.lock.close()
            raise

    @contextlib.contextmanager
    def replace(self) -> Iterator[Path]:
        """Write the new directory into the yielded path; it replaces the old one whole on a normal exit."""
        with replaced(self.path) as staging:
            yield staging
            write_checksums(staging)

    def close(self) -> None:
        self.lock.close()


class RunFile:
    """The output file `path` of one command (`mebp run --out`), locked while this object lives.

    Opening it takes the lock and removes the temporary file an interrupted write left;
    `write_bytes` replaces the file atomically (`files.atomic_write`).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).resolve()
        self.lock = RunLock(self.path)
        temporary_sibling(self.path).unlink(missing_ok=True)

    def write_bytes(self, data: bytes) -> Path:
        return atomic_write_bytes(self.path, data)

    def close(self) -> None:
        self.lock.close()


def _refuse_foreign(path: Path, entries: Sequence[str]) -> None:
    """Raise RunDirectoryError unless `path` is missing or a directory of `entries` (and their temporary files)."""
    if not path.exists():
        return
    if not path.is_dir():
        raise RunDirectoryError(f"{path} is a file, not a directory; choose another output directory")

    def ours(name: str) -> bool:
        if name.startswith("."):  # a temporary file or directory of an interrupted write
            name = name[1:].replace(".tmp", "").replace(".staging", "").replace(".old", "")
        return any(fnmatch.fnmatchcase(name, entry) for entry in entries)

    foreign = sorted(p.name for p in path.iterdir() if not ours(p.name))
    if foreign:
        raise RunDirectoryError(f"{path} holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}, "
                                "which mebp does not write there; writing would replace the directory whole: "
                                "choose a new or empty output directory")


def write_checksums(directory: Path) -> Path:
    """Write SHA256SUMS (sha256sum's format) for every file under `directory`."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != CHECKSUMS_FILE)
    lines = [f"{sha256_path(p)}  {p.relative_to(directory).as_posix()}\n" for p in files]
    return atomic_write_text(directory / CHECKSUMS_FILE, "".join(lines))


def check(directory: str | os.PathLike) -> None:
    """Raise RunDirectoryError naming the first file of `directory` that is missing or differs from SHA256SUMS."""
    directory = Path(directory)
    sums = directory / CHECKSUMS_FILE
    if not sums.is_file():
        raise RunDirectoryError(f"{directory} has no {CHECKSUMS_FILE}; it was not written whole by mebp")
    *lines, end = sums.read_text(errors="replace").split("\n")
    entries = [re.fullmatch(r"([0-9a-f]{64})  (\S.*)", line) for line in lines]
    if end or not all(entries):
        raise RunDirectoryError(f"{sums} is not in sha256sum's format: its bytes changed after mebp wrote it")
    for digest, name in (entry.groups() for entry in entries):
        file = directory / name
        if not file.is_file():
            raise RunDirectoryError(f"{file} is missing; {directory} is not whole")
        if sha256_path(file) != digest:
            raise RunDirectoryError(f"{file} does not match its SHA-256 in {sums}: its bytes changed after "
                                    "mebp wrote it")
