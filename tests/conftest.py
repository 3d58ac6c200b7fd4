"""Shared fixtures: small LoRA models, the real SmolLM2, and the autograd reference."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import platform
import re
import resource
from pathlib import Path

import pytest
import torch

from mebp_compiler.app import models

# One thread: on a shared 2-core machine two torch threads stall each other badly.
torch.set_num_threads(1)

TINY_MODELS = ("tiny-llama", "tiny-qwen2", "tiny-gemma3")

#: Environment variables that choose CPU kernels or threads: a failure report says where it ran.
KERNEL_SETTINGS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "MKL_DYNAMIC", "MKL_CBWR",
                   "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY",
                   "OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model", "Hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def torch_kernel_config() -> str:
    """torch's BLAS, its MKL and oneDNN versions, and the thread counts its libraries will use."""
    build = torch.__config__.show()
    blas = re.search(r"BLAS_INFO=(\w+)", build)
    mkl = re.search(r"Math Kernel Library Version ([\w.]+)", build)
    onednn = re.search(r"MKL-DNN (v[\d.]+)", build)
    threads = dict(re.findall(r"(\w+)\(\) : (\d+)", torch.__config__.parallel_info()))
    return (f"BLAS {blas.group(1) if blas else 'unknown'}"
            f", MKL {mkl.group(1) if mkl and torch.backends.mkl.is_available() else 'off'}"
            f", oneDNN {onednn.group(1) if onednn and torch.backends.mkldnn.is_available() else 'off'}"
            f", OpenMP threads {threads.get('omp_get_max_threads', '-')}"
            f", MKL threads {threads.get('mkl_get_max_threads', '-')}"
            f", interop threads {torch.get_num_interop_threads()}")


def numpy_blas() -> str:
    """numpy's BLAS (coremltools' value inference and the drivers' numpy code run on it) and,
    for OpenBLAS, the core whose kernels it chose at load (OPENBLAS_CORETYPE overrides it)."""
    import ctypes

    import numpy

    blas = numpy.show_config(mode="dicts")["Build Dependencies"]["blas"]
    name = f"{blas.get('name', 'unknown')} {blas.get('version', '')}".strip()
    try:
        with open("/proc/self/maps") as f:
            library = next(iter(sorted(set(re.findall(r"(/\S*openblas\S*\.so\S*)", f.read())))))
        corename = ctypes.CDLL(library).scipy_openblas_get_corename64_
    except (OSError, StopIteration, AttributeError):  # not Linux, or not numpy's own OpenBLAS wheel
        return name
    corename.restype = ctypes.c_char_p
    return f"{name}, core {corename().decode()}"


def pytest_report_header(config) -> list[str]:
    settings = ", ".join(f"{k}={os.environ[k]}" for k in KERNEL_SETTINGS if k in os.environ) or "none set"
    return [f"cpu: {cpu_model()} ({platform.machine()}, {os.cpu_count()} cores); torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread(s), kernels {torch.backends.cpu.get_cpu_capability()}; "
            f"kernel settings: {settings}",
            f"torch kernels: {torch_kernel_config()}; numpy BLAS: {numpy_blas()}"]


def pytest_addoption(parser) -> None:
    parser.addoption("--cpu-durations", type=int, default=None, metavar="N",
                     help="list the N tests that took the most CPU seconds (0: all)")


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of the child processes it has waited for.

    On a machine shared with other jobs a test's wall time grows with their load; its CPU
    time much less, so it compares runs at different times (forkserver children, whose
    parent is the server, are not counted)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


_CPU_SECONDS: dict[str, float] = {}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if item.config.getoption("cpu_durations") is None:
        return (yield)
    start = cpu_seconds()
    try:
        return (yield)
    finally:
        _CPU_SECONDS[item.nodeid] = cpu_seconds() - start


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    count = config.getoption("cpu_durations")
    if count is None:
        return
    ranked = sorted(_CPU_SECONDS.items(), key=lambda item: -item[1])
    terminalreporter.write_sep("=", f"CPU seconds per test (setup, call and teardown), {sum(_CPU_SECONDS.values()):.1f} in all")
    for nodeid, seconds in ranked[:count or None]:
        terminalreporter.write_line(f"{seconds:8.2f}s {nodeid}")


def lora_model(name: str, seed: int = 0, **lora) -> torch.nn.Module:
    """A LoRA model whose lora_B is random, so every LoRA gradient is non-zero."""
    model = models.add_lora(models.load(name, seed=seed), models.LoraSettings(**lora))
    randomize_lora_b(model, seed)
    return model


def randomize_lora_b(model: torch.nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)


def random_batch(vocab_size: int, batch: int = 2, seq: int = 24, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, seq), generator=generator)
    labels = ids.clone()
    labels[:, :2] = -100  # ignored positions are part of the contract too
    return {"input_ids": ids, "labels": labels}


def autograd_reference(model: torch.nn.Module, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and LoRA gradients of plain eager autograd on the same weights."""
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    loss = model(**batch).loss
    grads = torch.autograd.grad(loss, list(lora.values()))
    return loss.detach(), dict(zip(lora, grads))


def assert_matches_autograd(result, reference, tol: float = 1e-5) -> None:
    """Loss and every LoRA gradient equal autograd's: max abs diff <= tol x largest gradient."""
    ref_loss, ref_grads = reference
    assert set(result.grads) == set(ref_grads)
    scale = max(g.abs().max().item() for g in ref_grads.values())
    assert scale > 0
    worst = max((result.grads[n] - g).abs().max().item() for n, g in ref_grads.items())
    assert worst <= tol * scale, f"max grad diff {worst:.3g} > {tol} x {scale:.3g}"
    assert abs(result.loss.item() - ref_loss.item()) <= tol * max(1.0, abs(ref_loss.item()))


#: The whole SmolLM2-135M float32 step against float64 autograd: max gradient error over the
#: largest gradient. Measured by bench/fp32_error.py over 4 batches, 2 random-number streams
#: and 6 kernel settings: at most 1.46e-5 (torch eager 1.21e-5, ONNX 0.81e-5, MLX 1.46e-5);
#: this is twice that worst case (docs/tolerances.md). The tiny configs' steps, with reductions
#: ~200x shorter, are held to the project's 1e-5.
SMOLLM2_FLOAT64_TOLERANCE = 3e-5

#: Unit roundoff of IEEE float32 and float64 with rounding to nearest.
FLOAT32_UNIT_ROUNDOFF, FLOAT64_UNIT_ROUNDOFF = 2.0**-24, 2.0**-53


def probabilistic_rounding_bound(length: int, terms: int, failure_probability: float = 1e-6,
                                 unit_roundoff: float = FLOAT32_UNIT_ROUNDOFF) -> float:
    """gamma~_length(lambda): a float computation of sums of products in which no term passes
    through more than `length` roundings (its product and the additions on its way to the
    result, in any order, blocked or vectorised, FMA or not) errs in every sum by at most this
    times the sum of the terms' absolute values, except with probability `failure_probability`
    over all `terms` terms of all the sums together.

    Higham & Mary, "A new approach to probabilistic rounding error analysis", SIAM J. Sci.
    Comput. 41(5), 2019, Theorems 2.4 and 3.1: with rounding errors modelled as independent
    random variables of mean zero, a product of n factors (1 + delta_k), |delta_k| <= u, is
    1 + theta with |theta| <= exp(lambda sqrt(n) u + n u^2 / (1 - u)) - 1 except with
    probability 2 exp(-lambda^2 (1 - u)^2 / 2). The confidence factor lambda is the one whose
    union over `terms` such products fails with `failure_probability`. The bound depends on
    the reduction length and the unit roundoff only, not on the CPU's kernels.
    """
    u = unit_roundoff
    confidence = math.sqrt(2 * math.log(2 * terms / failure_probability)) / (1 - u)
    return math.expm1(confidence * math.sqrt(length) * u + length * u * u / (1 - u))


def float64_rounding_bound(length: int) -> float:
    """gamma_length = n u / (1 - n u) in float64: the worst case (Higham, Accuracy and Stability
    of Numerical Algorithms, 2nd ed., Lemma 3.1) of a float64 reference's own error."""
    nu = length * FLOAT64_UNIT_ROUNDOFF
    return nu / (1 - nu)


@contextlib.contextmanager
def flipped_byte(path: Path, offset: int):
    """The file at `path` with one bit of the byte at `offset` flipped, restored afterwards."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x01]))
    try:
        yield path
    finally:
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(bytes([byte]))


def safetensors_data_start(path: Path) -> int:
    """Offset of the first tensor byte of a safetensors file (after its length prefix and JSON header)."""
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (GGUF weights) with LoRA r=16 and random lora_B.

    lora_A is drawn from the global generator: seeded here, so it does not depend on which
    tests ran first (the MLX driver test's margin to its tolerance depends on the values).
    """
    model = models.load("smollm2-135m")
    torch.manual_seed(0)
    model = models.add_lora(model)
    randomize_lora_b(model, seed=1)
    return model


@pytest.fixture(scope="session")
def smollm2_mebp(smollm2):
    """(batch, mebp plan with disk checkpoints) of SmolLM2 at seq 16, compiled once for every target's tests."""
    from tests.test_partition import compile_policy

    batch = random_batch(smollm2.config.vocab_size, batch=1, seq=16, seed=3)
    return batch, compile_policy(smollm2, batch, "mebp")


@pytest.fixture(scope="session")
def smollm2_plan(smollm2, smollm2_mebp):
    """`smollm2_plan(policy)`: the `smollm2_mebp` batch's plan under "mebp" or "optimal"
    (tests.test_partition.compile_policy), each compiled once for every target's tests: the
    optimal plan's solve over SmolLM2's whole step is one of the suite's longest setups."""
    from tests.test_partition import compile_policy

    batch, mebp = smollm2_mebp
    return functools.cache(lambda policy: compile_policy(smollm2, batch, policy, mebp))


@pytest.fixture(scope="session")
def smollm2_step_values(smollm2, smollm2_mebp):
    """(graph, every node's value) of SmolLM2's captured step on the `smollm2_mebp` batch, as
    tests.stages.captured_step gives them, from the mebp plan's own capture (one capture of
    the real model, not two). Do not mutate."""
    from tests.stages import node_values, step_inputs

    batch, plan = smollm2_mebp
    return plan.captured, node_values(plan.captured, step_inputs(smollm2, plan.captured, batch))


@pytest.fixture(scope="session")
def smollm2_float64_reference(smollm2, smollm2_mebp):
    """Loss and LoRA gradients of float64 autograd on SmolLM2's weights and the `smollm2_mebp`
    batch: the step without float32 rounding.

    A float32 target (ONNX, MLX, native) is held to `SMOLLM2_FLOAT64_TOLERANCE` against
    this, not against torch's float32 step: the two float32 errors would add, and torch's
    depends on the CPU's kernels (MKL, oneDNN).
    """
    import copy

    batch, _ = smollm2_mebp
    return autograd_reference(copy.deepcopy(smollm2).double(), batch)
