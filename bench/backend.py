#!/usr/bin/env python
"""Side by side: eager, torch.compile with activation_memory_budget, and backend="mebp" at budgets.

    python bench/backend.py --model smollm2-135m --seq-len 128 --amb 0.5,0.1 --budgets 340MB,200MB,130MB

Every method runs in its own fresh subprocess (this script with --method), one after the
other, under MALLOC_MMAP_THRESHOLD_=65536 and OMP_NUM_THREADS=1 (bench/memory.py's recipe).
`python bench/backend.py --help` says what each column means.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from memory import CHILD_ENV, MIB, allocator_peak, malloc_trim, progress, read_status, reset_peak_rss

DESCRIPTION = """\
One LoRA training step (batch 1: forward, loss.backward(), LoRA grads) of one model at one
sequence length, each method in a fresh subprocess with MALLOC_MMAP_THRESHOLD_=65536 and
OMP_NUM_THREADS=1, torch.set_num_threads(1).

methods:
  eager          model(**batch).loss.backward()
  amb-R          torch.compile(model, backend="aot_eager_decomp_partition") with
                 torch._functorch.config.activation_memory_budget = R: PyTorch's min-cut
                 partitioner saves about R x the activation bytes it would save unconstrained
                 (a ratio, not a bound); graphs run as plain fx code, like ours
  mebp-SIZE      torch.compile(model, backend="mebp", options={"activation_budget": SIZE}); the
                 scheduler's device profile is cpu-local, or DEVICE for mebp-SIZE@DEVICE;
                 mebp-SIZE-untrimmed also sets trim_heap=False (no malloc_trim between
                 layers), to show what the heap keeps without it

columns (MiB = 2^20 bytes):
  saved for bw   unique storages handed from the forward to the backward, counted in the
                 measured step by a torch.autograd.graph.saved_tensors_hooks pack hook (it
                 sees eager autograd's saves and the compiled function's
                 ctx.save_for_backward), parameters excluded; for mebp also without the
                 offloaded tensors (they live in memory-mapped files)
  offloaded      mebp only: bytes of the saved tensors written to memory-mapped files
  allocator peak peak bytes of the tensors the step allocates (torch profiler memory
                 events summed in time order; see bench/memory.py). Memory-mapped offloaded
                 tensors count here as allocations although their pages are file-backed
  RSS over base  process peak RSS during the steps minus RSS before them; the base is read
                 after building the model and one warm-up step (which compiles forward and
                 backward), gc.collect() and malloc_trim(0); VmHWM reset through
                 /proc/self/clear_refs (TOOLCHAIN-NOTES' recipe)
  step / eager   median wall time of the timed steps over eager's median, same run
  compile s      the warm-up step (trace, partition, scheduling, first step)

Checks (non-zero exit): every method's loss equals eager's (1e-4) and its LoRA-gradient
norm too (1e-3 relative); for mebp the saved-for-backward bytes (offloaded excluded), the
scheduler's model peak and the RSS over base are within the budget.
"""

LOSS_TOLERANCE = 1e-4
GRAD_NORM_TOLERANCE = 1e-3


def run_method(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    from mebp_compiler.app import models

    method = args.method
    rec: dict[str, Any] = {"method": method, "failures": []}
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = models.add_lora(models.load(args.model))
    lora = {k: p for k, p in model.named_parameters() if p.requires_grad}
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in lora.items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq_len), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone()}
    rec["load_s"] = time.perf_counter() - t0

    backend = None
    forward = model
    if method.startswith("amb-"):
        torch._functorch.config.activation_memory_budget = float(method[4:])
        forward = torch.compile(model, backend="aot_eager_decomp_partition")
    elif method.startswith("mebp-"):
        from mebp_compiler.backend import backend_for

        spec = method[5:]
        untrimmed = spec.endswith("-untrimmed")
        budget, _, device = spec.removesuffix("-untrimmed").partition("@")
        options = {"activation_budget": budget, "work_limit": args.work_limit, "device": device or "cpu-local",
                   "trim_heap": not untrimmed}
        forward = torch.compile(model, backend="mebp", options=options)
        backend = backend_for(options)

    def clear_grads() -> None:
        for p in lora.values():
            p.grad = None

    def step() -> float:
        loss = forward(**batch).loss
        loss.backward()
        return float(loss)

    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def counted_step() -> tuple[float, int]:
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in parameters:
                saved[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = step()
        return loss, sum(saved.values())

    t0 = time.perf_counter()
    with torch.no_grad():
        model(**batch)
    rec["loss"] = step()
    rec["compile_s"] = time.perf_counter() - t0
    rec["lora_grad_norm"] = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in lora.values()))
    clear_grads()
    progress(f"{method}: built and compiled in {time.perf_counter() - t0:.1f} s, measuring")

    gc.collect()
    malloc_trim()
    rec["base_rss_bytes"] = read_status()["VmRSS"]
    reset_peak_rss()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        clear_grads()
    status = read_status()
    rec["rss_over_base_bytes"] = status["VmHWM"] - rec["base_rss_bytes"]
    rec["step_times_s"] = times
    rec["step_median_s"] = statistics.median(times)

    _, rec["saved_hook_bytes"] = counted_step()
    clear_grads()
    rec["allocator_peak_bytes"], _ = allocator_peak(step)
    clear_grads()
    if backend is not None:
        rec["budget_bytes"] = backend.options.activation_budget_bytes
        rec["graphs"] = [{"budget_bytes": g.budget_bytes, "model_peak_bytes": g.model_peak_bytes,
                          "kept_bytes": g.kept_bytes, "last_saved_bytes": g.last_saved_bytes,
                          "offloaded_bytes": g.last_offloaded_bytes, "decisions": g.counts(),
                          "solver_status": g.solver_status, "solve_s": g.solve_s,
                          "heap_trims": g.heap_trims} for g in backend.graphs]
        rec["saved_bytes"] = sum(g.last_saved_bytes for g in backend.graphs)
        rec["offloaded_bytes"] = sum(g.last_offloaded_bytes for g in backend.graphs)
        if rec["saved_bytes"] > rec["budget_bytes"]:
            rec["failures"].append(f"{method}: saved {rec['saved_bytes']} bytes > budget {rec['budget_bytes']}")
        if rec["rss_over_base_bytes"] > rec["budget_bytes"]:
            rec["failures"].append(f"{method}: RSS over base {rec['rss_over_base_bytes']} bytes > budget "
                                   f"{rec['budget_bytes']}")
        for g in rec["graphs"]:
            if g["model_peak_bytes"] > g["budget_bytes"]:
                rec["failures"].append(f"{method}: model peak {g['model_peak_bytes']} > share {g['budget_bytes']}")
    else:
        rec["saved_bytes"] = rec["saved_hook_bytes"]
    return rec


def spawn(args: argparse.Namespace, method: str) -> tuple[dict[str, Any] | None, str]:
    """Run one method in a fresh subprocess; its record (or None) and the tail of its output."""
    with tempfile.TemporaryDirectory(prefix="mebp-bench-") as tmp:
        result_file = pathlib.Path(tmp) / "result.json"
        cmd = [sys.executable, os.path.abspath(__file__), "--model", args.model, "--seq-len", str(args.seq_len),
               "--steps", str(args.steps), "--work-limit", str(args.work_limit), "--method", method,
               "--result-file", str(result_file)]
        try:
            proc = subprocess.run(cmd, env={**os.environ, **CHILD_ENV}, capture_output=True, text=True,
                                  timeout=args.timeout)
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        except subprocess.TimeoutExpired:
            tail = f"(timed out after {args.timeout} s)"
        for line in tail.splitlines():
            if line.startswith("[bench]"):
                print(line, file=sys.stderr, flush=True)
        record = json.loads(result_file.read_text()) if result_file.exists() else None
        return record, tail


def mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / MIB:.1f}"


def build_table(records: dict[str, dict[str, Any]]) -> str:
    header = ["method", "budget (MiB)", "saved for bw (MiB)", "offloaded (MiB)", "allocator peak (MiB)",
              "RSS over base (MiB)", "step / eager", "compile s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    eager = records.get("eager")
    for method, rec in records.items():
        if rec.get("error"):
            lines.append(f"| {method} | " + " | ".join(["FAILED"] * (len(header) - 1)) + " |")
            continue
        ratio = f"{rec['step_median_s'] / eager['step_median_s']:.2f}x" if eager and not eager.get("error") else "n/a"
        lines.append("| " + " | ".join([
            method, mib(rec.get("budget_bytes")), mib(rec["saved_bytes"]), mib(rec.get("offloaded_bytes")),
            mib(rec["allocator_peak_bytes"]), mib(rec["rss_over_base_bytes"]), ratio, f"{rec['compile_s']:.0f}",
        ]) + " |")
    return "\n".join(lines)


def cross_checks(records: dict[str, dict[str, Any]]) -> list[str]:
    failures = []
    ref = records.get("eager")
    if not ref or ref.get("error"):
        return failures
    for method, rec in records.items():
        if rec.get("error"):
            continue
        if abs(rec["loss"] - ref["loss"]) > LOSS_TOLERANCE:
            failures.append(f"{method}: loss {rec['loss']:.6f} differs from eager's {ref['loss']:.6f}")
        a, b = rec["lora_grad_norm"], ref["lora_grad_norm"]
        if abs(a - b) > GRAD_NORM_TOLERANCE * max(abs(b), 1e-12):
            failures.append(f"{method}: LoRA grad norm {a:.6g} differs from eager's {b:.6g}")
    return failures


def main(argv: list[str] | None = None) -> int:
    from mebp_compiler.passes.scheduler.solver import DEFAULT_WORK_LIMIT

    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up step")
    parser.add_argument("--amb", default="0.5,0.1", help="activation_memory_budget ratios, comma-separated")
    parser.add_argument("--budgets", default="340MB,200MB,130MB",
                        help="mebp budgets, comma-separated; SIZE@DEVICE schedules for another device profile, "
                             "SIZE-untrimmed runs without trim_heap")
    parser.add_argument("--work-limit", type=float, default=DEFAULT_WORK_LIMIT,
                        help="scheduler limit per graph, CP-SAT deterministic time")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per method")
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.method:
        rec = run_method(args)
        pathlib.Path(args.result_file).write_text(json.dumps(rec))
        return 0

    methods = (["eager"] + [f"amb-{r}" for r in args.amb.split(",") if r]
               + [f"mebp-{b}" for b in args.budgets.split(",") if b])
    progress(f"{args.model} seq {args.seq_len}: {len(methods)} methods, each in a fresh subprocess with "
             + " ".join(f"{k}={v}" for k, v in CHILD_ENV.items()))
    records: dict[str, dict[str, Any]] = {}
    failures: list[str] = []
    for i, method in enumerate(methods, 1):
        progress(f"[{i}/{len(methods)}] {method}: starting")
        record, tail = spawn(args, method)
        if record is None:
            records[method] = {"method": method, "error": tail}
            failures.append(f"{method}: the subprocess failed:\n{tail}")
            continue
        records[method] = record
        failures += record["failures"]
    failures += cross_checks(records)
    table = build_table(records)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"backend-{args.model}-seq{args.seq_len}"
    command = "python bench/backend.py " + " ".join(sys.argv[1:] if argv is None else argv)
    (out / f"{stem}.md").write_text(f"{table}\n\n`{command}`, {' '.join(f'{k}={v}' for k, v in CHILD_ENV.items())}\n")
    (out / f"{stem}.json").write_text(json.dumps({"command": command, "records": records}, indent=1))
    print(table)
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
