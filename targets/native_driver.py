"""The native driver (`targets/native/driver.cpp`, the `mebp-native` executable): build it, write
its token file, run it.

`mebp-native` runs an MLX artifact directory's training steps with no Python in the process
(docs/manifest.md says what it checks and does). It is built with CMake against the MLX C++
library the `mlx` wheel ships, into `build/native/` of the source tree (`make setup` does
it). This module is the Python side a phone app's own code replaces: it tokenizes, writes
the token file, and reads the driver's one JSON line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mebp_compiler.files import atomic_write_bytes

SOURCE_DIR = Path(__file__).resolve().parent / "native"
BUILD_DIR = SOURCE_DIR.parent.parent / "build" / "native"
EXECUTABLE = "mebp-native"
#: First 8 bytes of a token file; then int64 steps, batch, seq and the int64 input_ids and
#: labels, each [steps, batch, seq], all little-endian.
TOKEN_MAGIC = b"MEBPTOK1"


class NativeDriverError(RuntimeError):
    """The native driver could not be built, found, or run; the message is its own error line."""


def mlx_root() -> Path:
    """The `mlx` package directory (include/, lib/libmlx.so, share/cmake/MLX)."""
    try:
        import mlx
    except ImportError as exc:
        raise NativeDriverError("the native driver builds against the 'mlx' package: pip install "
                                "'mebp-compiler[mlx]'") from exc
    return Path(next(iter(mlx.__path__)))


def openblas_root() -> Path | None:
    """The scipy-openblas32 wheel's lib/ directory (OpenBLAS for the driver's float32 matmuls,
    targets/native/blas.cpp), or None where the wheel is not installed (the driver then runs on the
    reference BLAS the mlx wheel bundles, ~30x slower matmuls)."""
    try:
        import scipy_openblas32
    except ImportError:
        return None
    return Path(scipy_openblas32.get_lib_dir())


def executable() -> Path | None:
    """The built driver: $MEBP_NATIVE if set, else build/native/mebp-native, else on PATH."""
    if os.environ.get("MEBP_NATIVE"):
        return Path(os.environ["MEBP_NATIVE"])
    built = BUILD_DIR / EXECUTABLE
    if built.is_file():
        return built
    found = shutil.which(EXECUTABLE)
    return Path(found) if found else None


def build(build_dir: Path = BUILD_DIR) -> Path:
    """Configure and build the driver with CMake (nothing is fetched); return the executable."""
    if shutil.which("cmake") is None:
        raise NativeDriverError("building the native driver needs cmake and a C++20 compiler (g++ or clang++)")
    blas = openblas_root()
    commands = [["cmake", "-S", str(SOURCE_DIR), "-B", str(build_dir), f"-DMLX_ROOT={mlx_root()}",
                 f"-DOPENBLAS_ROOT={blas or ''}"],
                ["cmake", "--build", str(build_dir), "--parallel", "2"]]
    for command in commands:
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise NativeDriverError(f"building the native driver failed ({' '.join(command)}):\n"
                                    f"{done.stdout[-2000:]}{done.stderr[-4000:]}")
    return build_dir / EXECUTABLE


def ensure_built() -> Path:
    """The driver, built first if it is not there or older than its sources (an in-tree build)."""
    found = executable()
    if found is None or (found == BUILD_DIR / EXECUTABLE and _sources_newer_than(found)):
        return build()
    return found


def _sources_newer_than(built: Path) -> bool:
    built_at = built.stat().st_mtime
    return any(source.stat().st_mtime > built_at for source in SOURCE_DIR.iterdir() if source.is_file())


def write_tokens(path: str | os.PathLike, batches: Iterable[Mapping[str, np.ndarray]]) -> Path:
    """Write the batches (`input_ids`, `labels`, int64 [batch, seq], one per step) as a token file."""
    batches = list(batches)
    if not batches:
        raise ValueError("write_tokens needs at least one batch")
    extra = sorted({key for b in batches for key in b} - {"input_ids", "labels"})
    if extra:
        raise ValueError(f"a token file carries input_ids and labels only, and the batches have {extra}; run a "
                         "padded batch (attention_mask) with the Python driver instead of dropping its mask")
    ids = np.stack([np.asarray(b["input_ids"], dtype="<i8") for b in batches])
    labels = np.stack([np.asarray(b["labels"], dtype="<i8") for b in batches])
    if ids.ndim != 3 or labels.shape != ids.shape:
        raise ValueError(f"input_ids {ids.shape[1:]} and labels {labels.shape[1:]} must be [batch, seq] alike")
    header = TOKEN_MAGIC + np.array(ids.shape, dtype="<i8").tobytes()
    return atomic_write_bytes(path, header + ids.tobytes() + labels.tobytes())


@dataclass
class NativeResult:
    """What the driver reported (its JSON line): losses per step, held bytes of the last step
    per stage, the manifest's prediction, flash traffic, and the process's peak RSS (VmHWM,
    and the most anonymous and file-backed RSS seen when a stage returned)."""

    report: dict

    def __getattr__(self, name: str):
        try:
            return self.report[name]
        except KeyError:
            raise AttributeError(name) from None


def run(directory: str | os.PathLike, tokens: str | os.PathLike, out: str | os.PathLike, *,
        optimizer: str | None = None, lr: float | None = None, weight_decay: float | None = None,
        offload_dir: str | None = None, grads_dir: str | None = None, threads: int = 1,
        driver: Path | None = None) -> NativeResult:
    """Run the driver on an artifact directory; raise NativeDriverError with its error line if it fails."""
    command = [str(driver or ensure_built()), str(directory), "--tokens", str(tokens), "--out", str(out)]
    for flag, value in (("--optimizer", optimizer), ("--lr", lr), ("--weight-decay", weight_decay),
                        ("--offload-dir", offload_dir), ("--grads-dir", grads_dir)):
        if value is not None:
            command += [flag, str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        message = done.stderr.strip().replace("mebp-native: error: ", "mebp-native: ")
        raise NativeDriverError(message or f"{command[0]} exited with status {done.returncode}")
    return NativeResult(json.loads(done.stdout.strip().splitlines()[-1]))
