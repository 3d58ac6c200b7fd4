#!/usr/bin/env python
"""Where the RSS of a backend="mebp" step goes: per-op samples of the process and glibc's heap.

    python bench/backend_heap.py --model smollm2-135m --seq-len 128 --budget 200MB

Runs the step twice, each in a fresh subprocess (MALLOC_MMAP_THRESHOLD_=65536,
OMP_NUM_THREADS=1, as bench/backend.py): with trim_heap=False and with trim_heap=True; then
times both settings side by side in a third. `python bench/backend_heap.py --help` says
what each number is. Linux with glibc only.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import time

from memory import CHILD_ENV, MIB, allocator_peak, malloc_trim, progress, read_status, reset_peak_rss

DESCRIPTION = """\
Each subprocess builds the LoRA model, compiles it with backend="mebp" at --budget, runs a
warm-up step, then gc.collect() and malloc_trim(0) and reads the base; then one step with a
probe after every op of the compiled forward and backward graphs (an fx node inserted after
each op) that reads /proc/self/statm and glibc's mallinfo2(). Printed, in MiB:

  base heap      glibc's heap after compile: arena (bytes obtained with brk/sbrk and
                 arenas' heaps) and the free bytes inside it (fordblks)
  RSS over base  VmHWM after the probed step minus VmRSS before it (as in bench/backend.py)
  allocator peak the torch profiler's peak of bytes the step allocates (bench/memory.py),
                 one more step
  at the highest sampled RSS, growth over base of:
    anon         resident anonymous pages (statm resident - shared)
    file         resident file-backed pages (statm shared: memory-mapped offload files)
    mmapped      bytes in chunks glibc mapped for themselves (mallinfo2 hblkhd): allocations
                 >= the mmap threshold that no free heap chunk could serve
    heap in use  bytes allocated from the heap (uordblks)
    other anon   anon - mmapped - heap in use: free heap pages still resident, plus anything
                 mapped outside malloc (Python's object arenas, thread stacks)

Time: a third subprocess compiles two copies of the model, one with trim_heap=True and one
with False, and alternates their steps (--steps each, after a warm-up step of each); the
ratio of the medians is the trimming's cost.
"""


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def run_child(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(1)
    import mebp_compiler.backend as mebp_backend
    from mebp_compiler.app import models

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _MallInfo2
    page = os.sysconf("SC_PAGE_SIZE")
    statm = open("/proc/self/statm", "rb", buffering=0)
    samples: list[tuple[int, ...]] = []
    labels: list[str] = []
    active = [False]

    def sample() -> tuple[int, ...]:
        statm.seek(0)
        fields = statm.read().split()
        info = libc.mallinfo2()
        resident, shared = int(fields[1]) * page, int(fields[2]) * page
        return resident - shared, shared, info.hblkhd, info.uordblks

    def probe(label: str) -> None:
        if active[0]:
            samples.append(sample())
            labels.append(label)

    compile_graph = mebp_backend.boxed_nop

    def probed(gm, example_inputs):
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and node.target is not mebp_backend.release_freed_memory:
                with gm.graph.inserting_after(node):
                    gm.graph.call_function(probe, (f"{node.name} ({node.target})",))
        gm.recompile()
        return compile_graph(gm, example_inputs)

    mebp_backend.boxed_nop = probed  # both graphs are compiled through this name
    torch.manual_seed(0)
    model = models.add_lora(models.load(args.model))
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq_len), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone()}
    lora = [p for p in model.parameters() if p.requires_grad]
    options = {"activation_budget": args.budget, "work_limit": args.work_limit, "trim_heap": args.trim}
    compiled = torch.compile(model, backend="mebp", options=options)

    def step() -> None:
        compiled(**batch).loss.backward()
        for p in lora:
            p.grad = None

    t0 = time.perf_counter()
    step()
    progress(f"trim_heap={args.trim}: compiled in {time.perf_counter() - t0:.0f} s, measuring")
    gc.collect()
    malloc_trim()
    heap = libc.mallinfo2()
    base_rss = read_status()["VmRSS"]
    base = sample()
    reset_peak_rss()
    active[0] = True
    step()
    active[0] = False
    rss_over_base = read_status()["VmHWM"] - base_rss
    peak, _ = allocator_peak(step)
    growth = [[(v - b) / MIB for v, b in zip(s, base)] for s in samples]
    at = max(range(len(growth)), key=lambda i: growth[i][0] + growth[i][1])
    anon, file, mmapped, in_use = growth[at]
    return {
        "trim_heap": args.trim, "budget": args.budget,
        "base_heap_arena_mib": heap.arena / MIB, "base_heap_free_mib": heap.fordblks / MIB,
        "rss_over_base_mib": rss_over_base / MIB, "allocator_peak_mib": peak / MIB,
        "samples": len(samples), "peak_sample": at, "peak_op": labels[at],
        "anon_mib": anon, "file_mib": file, "mmapped_mib": mmapped, "heap_in_use_mib": in_use,
        "other_anon_mib": anon - mmapped - in_use,
        "last_other_anon_mib": growth[-1][0] - growth[-1][2] - growth[-1][3],
        "max_file_mib": max(g[1] for g in growth),
    }


def time_child(args: argparse.Namespace) -> dict:
    import copy
    import statistics

    import torch

    torch.set_num_threads(1)
    from mebp_compiler.app import models

    torch.manual_seed(0)
    model = models.add_lora(models.load(args.model))
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq_len), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone()}
    steps = {}
    for trim in (True, False):
        net = model if trim else copy.deepcopy(model)
        options = {"activation_budget": args.budget, "work_limit": args.work_limit, "trim_heap": trim}
        compiled = torch.compile(net, backend="mebp", options=options)
        lora = [p for p in net.parameters() if p.requires_grad]

        def step(compiled=compiled, lora=lora) -> float:
            t0 = time.perf_counter()
            compiled(**batch).loss.backward()
            for p in lora:
                p.grad = None
            return time.perf_counter() - t0

        step()
        steps[trim] = step
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.steps):
        for trim in (True, False):
            times[trim].append(steps[trim]())
    trimmed, untrimmed = statistics.median(times[True]), statistics.median(times[False])
    return {"trimmed_s": times[True], "untrimmed_s": times[False], "ratio": trimmed / untrimmed}


def main(argv: list[str] | None = None) -> int:
    from mebp_compiler.passes.scheduler.solver import DEFAULT_WORK_LIMIT

    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--budget", default="200MB")
    parser.add_argument("--work-limit", type=float, default=DEFAULT_WORK_LIMIT)
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each setting, alternated")
    parser.add_argument("--trim", type=lambda v: v == "True", help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=("memory", "time"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args) if args.child == "memory" else time_child(args)))
        return 0
    rows = []
    for child, trim in (("memory", False), ("memory", True), ("time", True)):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", child, "--trim", str(trim), "--model",
               args.model, "--seq-len", str(args.seq_len), "--budget", args.budget, "--work-limit",
               str(args.work_limit), "--steps", str(args.steps)]
        proc = subprocess.run(cmd, env={**os.environ, **CHILD_ENV}, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    timing = rows.pop()
    print(f"step time, trim_heap=True over False, alternated in one process: {timing['ratio']:.3f} "
          f"(medians of {args.steps}; seconds: {[round(t, 2) for t in timing['trimmed_s']]} vs "
          f"{[round(t, 2) for t in timing['untrimmed_s']]})")
    for row in rows:
        print(f"trim_heap={row['trim_heap']}: base heap {row['base_heap_arena_mib']:.1f} MiB, "
              f"{row['base_heap_free_mib']:.1f} free; RSS over base {row['rss_over_base_mib']:.1f}, "
              f"allocator peak {row['allocator_peak_mib']:.1f}; at the highest sample ({row['peak_op']}, "
              f"op {row['peak_sample']} of {row['samples']}): anon +{row['anon_mib']:.1f} = mmapped "
              f"{row['mmapped_mib']:.1f} + heap in use {row['heap_in_use_mib']:.1f} + other "
              f"{row['other_anon_mib']:.1f}; file +{row['file_mib']:.1f} (max {row['max_file_mib']:.1f}); "
              f"other anon after the last op {row['last_other_anon_mib']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
