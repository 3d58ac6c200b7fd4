"""The fault suite: `mebp` killed at every write point, on a full disk, on flipped bytes, twice at once.

Each case runs the `mebp` command line in a child process and then asserts what a user
would find: the output as it was before (byte for byte) or the new one whole (its
SHA256SUMS holds), nothing left behind once the next start has recovered, and a failure
told in one line with exit code 1. Kills come from the write points' own hook
(`MEBP_FAULT_AT`, `mebp_compiler.faults`). The children are forked from a server that
imported mebp once (multiprocessing's forkserver), so a case costs its compile and two
steps, not torch's import.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import multiprocessing
import os
import resource
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mebp_compiler import faults
from mebp_compiler.app import rundir
from mebp_compiler.app.cli import main
from mebp_compiler.offload import OffloadError, OffloadStore
from mebp_compiler.passes.partition import ManifestError
from mebp_compiler.schedule import Schedule, ScheduleError
from mebp_compiler.targets import driver, load_target
from tests.conftest import flipped_byte, safetensors_data_start

SKIPPED = 77  # a child's exit code: the case cannot run on this machine
_CONTEXT = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["mebp_compiler.app.cli", "mebp_compiler.app.models", "mebp_compiler.plan",
                                 "mebp_compiler.app.train", "mebp_compiler.targets.driver", "tests.test_faults"])
TINY = ["--model", "tiny-llama", "--seq-len", "32"]


@dataclass
class Outcome:
    exitcode: int
    stderr: str

    @property
    def killed(self) -> bool:
        return self.exitcode == -signal.SIGKILL

    def assert_one_line_error(self, *fragments: str) -> None:
        """Exit code 1 and one error line naming every fragment, no traceback."""
        assert self.exitcode == 1, self.stderr
        errors = [line for line in self.stderr.splitlines() if ": error: " in line]
        assert len(errors) == 1 and "Traceback" not in self.stderr, self.stderr
        assert all(f in errors[0] for f in fragments), errors[0]


def _child(argv: list[str], log: str, fault: str | None, file_size_limit: int | None,
           tmpfs: tuple[str, int, str] | None) -> None:
    """Run `mebp argv` with stdout and stderr to `log`(.out/.err), then exit with its code."""
    for fd, suffix in ((1, ".out"), (2, ".err")):
        os.dup2(os.open(log + suffix, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    if tmpfs is not None and not _mount_tmpfs(tmpfs[0], tmpfs[1]):
        os._exit(SKIPPED)
    os.environ["MEBP_FAULT_AT"] = fault or ""
    importlib.reload(faults)  # the hook reads MEBP_FAULT_AT when it is imported
    if file_size_limit is not None:  # a full disk: writes past the limit fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
    code = main(argv)
    if tmpfs is not None:  # the mount goes with this process: say what it held
        Path(tmpfs[2]).write_text(json.dumps(sorted(os.listdir(tmpfs[0]))))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _mount_tmpfs(directory: str, size: int) -> bool:
    """Mount a tmpfs of `size` bytes on `directory`, in a mount namespace of this process only."""
    libc = ctypes.CDLL(None, use_errno=True)
    clone_newns, clone_newuser, ms_rec, ms_private = 0x00020000, 0x10000000, 0x4000, 1 << 18
    root = os.getuid() == 0
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(clone_newns if root else clone_newns | clone_newuser) != 0:
        return False
    if not root:
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            Path(f"/proc/self/{name}").write_text(text)
    return (libc.mount(b"none", b"/", None, ms_rec | ms_private, None) == 0
            and libc.mount(b"tmpfs", directory.encode(), b"tmpfs", 0, f"size={size}".encode()) == 0)


def start_mebp(argv: list[str], log: Path, *, fault: str | None = None, file_size_limit: int | None = None,
               tmpfs: tuple[Path, int, Path] | None = None):
    mount = (str(tmpfs[0]), tmpfs[1], str(tmpfs[2])) if tmpfs else None
    child = _CONTEXT.Process(target=_child, args=([str(a) for a in argv], str(log), fault, file_size_limit, mount))
    child.start()
    return child


def run_mebp(argv: list[str], log: Path, **options) -> Outcome:
    child = start_mebp(argv, log, **options)
    child.join(300)
    if child.is_alive():
        child.kill()
        pytest.fail(f"mebp {' '.join(map(str, argv))} ran for 5 minutes")
    if child.exitcode == SKIPPED:
        pytest.skip("mounting a tmpfs is not allowed here")
    return Outcome(child.exitcode, Path(f"{log}.err").read_text())


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def recovered(path: Path, entries=rundir.TRAIN_ENTRIES) -> list[str]:
    """What the parent of `path` holds after the next start has recovered `path` (and let go of it)."""
    rundir.RunDirectory(path, entries).close()
    return sorted(os.listdir(path.parent))


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 300)
    return path


@pytest.fixture(scope="module")
def old_run(tmp_path_factory, text) -> Path:
    """A finished run: what a new run over the same --out must never damage."""
    out = tmp_path_factory.mktemp("old") / "run"
    assert main(["train", *TINY, "--steps", "2", "--data", str(text), "--out", str(out), "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def old_compile(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("old") / "compiled"
    assert main(["compile", *TINY, "--target", "mlx", "-o", str(out)]) == 0
    return out


def fresh_copy(old: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "outputs" / old.name
    shutil.copytree(old, copy)
    return copy


def assert_new_run(out: Path, seed: int) -> None:
    rundir.check(out)
    history = json.loads((out / "history.json").read_text())
    assert history["args"]["seed"] == seed and len(history["loss"]) == 2
    assert sorted(p.name for p in (out / "adapter").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors"]


TRAIN_KILLS = {  # write point -> what the run directory must be after the kill and the next start
    "*.bin:3": "old",  # a checkpoint offloaded in the second step
    "adapter/swapped": "old",  # the adapter written into the staging directory
    "loss.png": "old",
    "history.json": "old",
    "SHA256SUMS": "old",
    "run/aside": "new",  # between the two renames: the next start finishes the swap
    "run/swapped": "new",
}


@pytest.mark.parametrize("point", TRAIN_KILLS)
def test_a_train_killed_at_a_write_point_leaves_the_old_run_or_the_new_one_whole(point, old_run, text, tmp_path):
    out = fresh_copy(old_run, tmp_path)
    # Both methods write their output with the same code, and MeZO compiles a forward-only
    # step in about half the time: backprop only where its checkpoints are the write point.
    method = ["--checkpoints", "disk", "--offload-dir", tmp_path / "flash"] if point == "*.bin:3" else [
        "--method", "mezo"]
    outcome = run_mebp(["train", *TINY, "--steps", "2", "--seed", "1", "--data", text, "--out", out, *method,
                        "--no-progress"], tmp_path / "log", fault=point)
    assert outcome.killed, outcome.stderr
    assert recovered(out) == ["run"]
    if TRAIN_KILLS[point] == "old":
        assert snapshot(out) == snapshot(old_run)
    else:
        assert_new_run(out, seed=1)


def test_a_train_killed_writing_its_int4_weights_leaves_the_old_run(old_run, text, tmp_path):
    out = fresh_copy(old_run, tmp_path)
    outcome = run_mebp(["train", *TINY, "--steps", "2", "--data", text, "--out", out, "--int4", "--group-size", "32",
                        "--offload-dir", tmp_path / "flash", "--no-progress"], tmp_path / "log", fault="mebp-int4-*")
    assert outcome.killed, outcome.stderr
    assert recovered(out) == ["run"] and snapshot(out) == snapshot(old_run)


COMPILE_KILLS = {"*.mlxfn:2": "old", "manifest.json": "old", "compiled/aside": "new"}


@pytest.mark.parametrize("point", COMPILE_KILLS)
def test_a_compile_killed_at_a_write_point_leaves_the_old_artifacts_or_the_new_ones(point, old_compile, tmp_path):
    out = fresh_copy(old_compile, tmp_path)
    outcome = run_mebp(["compile", "--model", "tiny-llama", "--seq-len", "16", "--target", "mlx", "-o", out],
                       tmp_path / "log", fault=point)
    assert outcome.killed, outcome.stderr
    assert recovered(out, rundir.COMPILE_ENTRIES) == ["compiled"]
    if COMPILE_KILLS[point] == "old":
        assert snapshot(out) == snapshot(old_compile)
    else:
        rundir.check(out)
        assert driver.load_manifest(out).batch_shape == [1, 16]
    driver.Driver.open(out, load_target("mlx"))


def test_mebp_run_killed_writing_its_out_file_leaves_the_old_file(old_compile, text, tmp_path):
    lora = tmp_path / "lora.safetensors"
    lora.write_bytes(b"the adapter of an earlier run")
    outcome = run_mebp(["run", old_compile, "--steps", "1", "--data", text, "--out", lora, "--no-progress"],
                       tmp_path / "log", fault="lora.safetensors")
    assert outcome.killed, outcome.stderr
    rundir.RunFile(lora).close()  # the next start
    assert lora.read_bytes() == b"the adapter of an earlier run"
    assert sorted(os.listdir(tmp_path)) == ["log.err", "log.out", "lora.safetensors"]


@pytest.mark.parametrize("disk", ["tmpfs", "file size limit"])
def test_a_full_offload_disk_is_one_line_and_leaves_no_file(disk, old_run, text, tmp_path):
    """Offloaded checkpoints of 8 KiB each on 4 KiB of disk: this was a SIGBUS."""
    out, flash = fresh_copy(old_run, tmp_path), tmp_path / "flash"
    flash.mkdir()
    full = ({"tmpfs": (flash, 4096, tmp_path / "listing.json")} if disk == "tmpfs"
            else {"file_size_limit": 4096})
    outcome = run_mebp(["train", *TINY, "--steps", "2", "--data", text, "--out", out, "--checkpoints", "disk",
                        "--offload-dir", flash, "--no-progress"], tmp_path / "log", **full)
    outcome.assert_one_line_error("cannot offload", "8192 bytes needed", "bytes free")
    left = json.loads((tmp_path / "listing.json").read_text()) if disk == "tmpfs" else os.listdir(flash)
    assert left == []
    assert recovered(out) == ["run"] and snapshot(out) == snapshot(old_run)


def test_a_full_disk_while_writing_the_run_keeps_the_old_run(old_run, text, tmp_path):
    """64 KiB files at most: the plot fits, the adapter (~130 KiB) does not."""
    out = fresh_copy(old_run, tmp_path)
    outcome = run_mebp(["train", *TINY, "--steps", "2", "--seed", "1", "--data", text, "--out", out, "--no-progress"],
                       tmp_path / "log", file_size_limit=64 * 1024)
    outcome.assert_one_line_error("cannot write", "bytes free")
    assert sorted(os.listdir(out.parent)) == ["run"]  # no staging left, nothing to recover
    assert snapshot(out) == snapshot(old_run)


def test_a_full_disk_while_writing_artifacts_or_the_out_file_keeps_the_old_ones(old_compile, text, tmp_path):
    out = fresh_copy(old_compile, tmp_path)
    outcome = run_mebp(["compile", "--model", "tiny-llama", "--seq-len", "16", "--target", "mlx", "-o", out],
                       tmp_path / "compile", file_size_limit=256 * 1024)  # the ~490 KiB weights do not fit
    outcome.assert_one_line_error("cannot write", "weights.safetensors")
    assert sorted(os.listdir(out.parent)) == ["compiled"] and snapshot(out) == snapshot(old_compile)

    lora = tmp_path / "lora.safetensors"
    lora.write_bytes(b"the adapter of an earlier run")
    outcome = run_mebp(["run", old_compile, "--steps", "1", "--data", text, "--out", lora, "--no-progress"],
                       tmp_path / "run", file_size_limit=64 * 1024)
    outcome.assert_one_line_error("cannot write", str(lora))
    assert lora.read_bytes() == b"the adapter of an earlier run"
    assert not list(tmp_path.glob(".lora*"))


def test_a_second_train_on_the_same_out_is_refused_at_once_naming_the_first(old_run, text, tmp_path):
    out = fresh_copy(old_run, tmp_path)
    argv = ["train", *TINY, "--steps", "100000", "--data", text, "--out", out, "--no-progress"]
    first = start_mebp(argv, tmp_path / "first")
    lock = out.parent / ".run.lock"
    deadline = time.monotonic() + 120
    while not (lock.is_file() and lock.read_text().strip() == str(first.pid)):
        assert first.is_alive() and time.monotonic() < deadline, Path(f"{tmp_path / 'first'}.err").read_text()
        time.sleep(0.05)
    try:
        second = run_mebp(argv, tmp_path / "second")
    finally:
        first.kill()
        first.join()
    second.assert_one_line_error(str(out), f"pid {first.pid}", "another mebp process")
    assert recovered(out) == ["run"] and snapshot(out) == snapshot(old_run)


def test_an_out_directory_with_other_files_is_refused_before_anything_is_loaded(text, tmp_path, capsys):
    """A run replaces --out whole: a directory of the user's own files must not be replaced."""
    (tmp_path / "notes.txt").write_text("mine")
    code = main(["train", *TINY, "--steps", "2", "--data", str(text), "--out", str(tmp_path), "--no-progress"])
    Outcome(code, capsys.readouterr().err).assert_one_line_error(str(tmp_path), "notes.txt", "new or empty")
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


# Flipped bytes: every file mebp reads back refuses to be used, naming itself.

def offsets(path: Path) -> list[int]:
    size = path.stat().st_size
    return sorted({0, min(40, size - 1), size // 2, size - 1})


def test_flipped_bytes_in_an_artifact_directory_are_refused(old_compile, tmp_path, capsys):
    out = fresh_copy(old_compile, tmp_path)
    manifest = driver.load_manifest(out)
    mlx = load_target("mlx")
    for name in ("manifest.json", "weights.safetensors", *manifest.unique_artifacts()):
        path = out / name
        for offset in (*offsets(path), safetensors_data_start(path)) if name.endswith("safetensors") else offsets(path):
            with flipped_byte(path, offset):
                with pytest.raises(ManifestError, match=f"{path}.*compile the artifacts again"):
                    driver.Driver.open(out, mlx)
        with flipped_byte(path, path.stat().st_size // 2):
            code = main(["run", str(out), "--steps", "1", "--no-progress"])
        Outcome(code, capsys.readouterr().err).assert_one_line_error(str(path), "compile the artifacts again")
    for offset in offsets(out / "schedule.json"):
        with flipped_byte(out / "schedule.json", offset):
            with pytest.raises(ScheduleError, match=f"{out / 'schedule.json'}.*compile the plan again"):
                Schedule.load(out / "schedule.json")
    rundir.check(out)
    driver.Driver.open(out, mlx)


def test_flipped_bytes_in_a_run_directory_are_found(old_run, tmp_path):
    out = fresh_copy(old_run, tmp_path)
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "history.json", "loss.png",
                 "SHA256SUMS"):
        for offset in offsets(out / name):
            with flipped_byte(out / name, offset):
                with pytest.raises(rundir.RunDirectoryError, match=f"{out}/"):
                    rundir.check(out)
    rundir.check(out)


def test_a_flipped_byte_in_an_offloaded_tensor_is_refused_at_reload(tmp_path):
    store = OffloadStore(tmp_path)
    tensor = torch.arange(1024, dtype=torch.float32)
    handle = store.write(tensor, "checkpoint")
    for offset in offsets(Path(handle.path)):
        with flipped_byte(Path(handle.path), offset):
            with pytest.raises(OffloadError, match=f"{handle.path} changed on disk"):
                store.read(handle)
    assert torch.equal(store.read(handle), tensor)
