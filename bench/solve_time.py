"""Capture plus first solve, timed in process CPU time and wall time (issue 15.2's targets).

One model per process, planning only (meta device, no weights), one torch thread. The
first solve is `optimal` at `mebp`'s peak, or with `--least` the least feasible budget
(`policies.least_memory`; "proven" when its status is OPTIMAL). The machine's load
average is printed beside the times: wall time counts the other jobs' share of the cores,
CPU time mostly does not.

    python bench/solve_time.py --model qwen2.5-0.5b --vocab-slices 64 --mlp-chunks 4 --fuse-update
    python bench/solve_time.py --model qwen2.5-3b
    python bench/solve_time.py --model gemma3-4b --least

`--whole-trace` captures without stamping repeated blocks (`capture(by_block=False)`);
`--compare-capture N` instead alternates the two captures N times in this process and prints
their CPU times (the stamped one first in each round). `--compare-least N` alternates, on one
captured problem, `least_budget` as `--least` runs it (one pattern per block class, ended by
`peak_lower_bound` when it meets it) with the flat model's least-memory search alone
(`block_templates=0`), N times, and prints their CPU times and results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from mebp_compiler.app import models
from mebp_compiler.capture import capture
from mebp_compiler.device import DeviceProfile
from mebp_compiler.ir import format_bytes
from mebp_compiler.passes.fuse_update import fuse_lora_update
from mebp_compiler.passes.liveness import liveness
from mebp_compiler.passes.policies import (known_starts, least_memory, mebp_schedule, optimal_schedule,
                                           scheduling_problem)
from mebp_compiler.passes.rewrite import rewrite
from mebp_compiler.passes.scheduler.solver import DEFAULT_BLOCK_TEMPLATES, DEFAULT_WORK_LIMIT, least_budget


def clocks() -> tuple[float, float]:
    """(process CPU seconds, wall seconds)."""
    return time.process_time(), time.perf_counter()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-0.5b")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--device", default="iphone15promax")
    parser.add_argument("--work-limit", type=float, default=DEFAULT_WORK_LIMIT)
    parser.add_argument("--vocab-slices", type=int, default=0)
    parser.add_argument("--mlp-chunks", type=int, default=0)
    parser.add_argument("--fuse-update", action="store_true")
    parser.add_argument("--least", action="store_true", help="first solve: the least feasible budget")
    parser.add_argument("--whole-trace", action="store_true", help="trace every block (no stamping)")
    parser.add_argument("--compare-capture", type=int, default=0, metavar="N",
                        help="only alternate stamped and whole captures N times and print their CPU seconds")
    parser.add_argument("--compare-least", type=int, default=0, metavar="N",
                        help="only alternate the least-memory search with and without block patterns N times")
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = DeviceProfile.load(args.device)
    load_before = os.getloadavg()[0]
    if args.compare_capture:
        return compare_capture(args)
    if args.compare_least:
        return compare_least(args, device)

    t0 = clocks()
    model = models.add_lora(models.load(args.model, device="meta"))
    ids = torch.zeros((1, args.seq_len), dtype=torch.int64, device="meta")
    graph = capture(model, {"input_ids": ids, "labels": ids}, vocab_slices=args.vocab_slices,
                    mlp_chunks=args.mlp_chunks, by_block=not args.whole_trace)
    if args.fuse_update:
        graph = fuse_lora_update(graph)
    captured = clocks()
    budget = None if args.least else liveness(rewrite(graph, mebp_schedule(graph))).peak_bytes
    t1 = clocks()  # mebp's peak, the budget, is not part of the solve
    problem = scheduling_problem(graph, device)
    t2 = clocks()
    if args.least:
        solution = least_memory(graph, device, work_limit=args.work_limit, problem=problem)
        result = {"least_bytes": solution.model_peak_bytes, "status": solution.status, "work": solution.work,
                  "bound_bytes": solution.stats["peak_bound_bytes"]}
    else:
        schedule = optimal_schedule(graph, budget, device, work_limit=args.work_limit, problem=problem)
        result = {"budget_bytes": budget, "status": schedule.stats["solver_status"], "work": schedule.stats["work"],
                  "model_time_s": schedule.stats["model_time_s"], "gap": schedule.stats["gap"]}
    t3 = clocks()
    result.update({
        "model": args.model, "nodes": len(graph.nodes()), "traced_blocks": graph.meta.get("traced_blocks"), "capture_cpu_s": captured[0] - t0[0],
        "capture_wall_s": captured[1] - t0[1], "problem_cpu_s": t2[0] - t1[0], "solve_cpu_s": t3[0] - t2[0],
        "solve_wall_s": t3[1] - t2[1], "total_cpu_s": captured[0] - t0[0] + t3[0] - t1[0],
        "total_wall_s": captured[1] - t0[1] + t3[1] - t1[1],
        "load_before": load_before, "load_after": os.getloadavg()[0],
        "command": " ".join(sys.argv),
    })
    least = f", least {format_bytes(result['least_bytes'])}" if args.least else ""
    print(f"{args.model}: {result['nodes']} nodes; capture {result['capture_cpu_s']:.1f} s CPU / "
          f"{result['capture_wall_s']:.1f} s wall; problem {result['problem_cpu_s']:.1f} s CPU, first solve "
          f"{result['solve_cpu_s']:.1f} s CPU / {result['solve_wall_s']:.1f} s wall; total "
          f"{result['total_cpu_s']:.1f} s CPU / {result['total_wall_s']:.1f} s wall ({result['status']}{least}, work {result['work']:.2f}); "
          f"load {load_before:.1f} -> {result['load_after']:.1f}", file=sys.stderr)
    print(json.dumps(result))
    return 0


def compare_capture(args: argparse.Namespace) -> int:
    """Alternate `capture` with and without stamping; print each one's process CPU seconds per round."""
    model = models.add_lora(models.load(args.model, device="meta"))
    ids = torch.zeros((1, args.seq_len), dtype=torch.int64, device="meta")
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.compare_capture):
        for by_block in (True, False):
            start = time.process_time()
            graph = capture(model, {"input_ids": ids, "labels": ids}, vocab_slices=args.vocab_slices,
                            mlp_chunks=args.mlp_chunks, by_block=by_block)
            times[by_block].append(time.process_time() - start)
            print(f"{'stamped' if by_block else 'whole'}: {times[by_block][-1]:.1f} s CPU, {len(graph.nodes())} nodes, "
                  f"traced blocks {graph.meta.get('traced_blocks', 'all')}; load {os.getloadavg()[0]:.1f}",
                  file=sys.stderr)
    print(json.dumps({"model": args.model, "stamped_cpu_s": times[True], "whole_cpu_s": times[False],
                      "command": " ".join(sys.argv)}))
    return 0


def compare_least(args: argparse.Namespace, device: DeviceProfile) -> int:
    """Alternate the least-memory search as `--least` runs it and the flat model's alone; print CPU seconds."""
    model = models.add_lora(models.load(args.model, device="meta"))
    ids = torch.zeros((1, args.seq_len), dtype=torch.int64, device="meta")
    graph = capture(model, {"input_ids": ids, "labels": ids}, vocab_slices=args.vocab_slices,
                    mlp_chunks=args.mlp_chunks)
    if args.fuse_update:
        graph = fuse_lora_update(graph)
    problem = scheduling_problem(graph, device)
    starts = known_starts(graph, problem)
    runs: dict[str, list[dict]] = {"patterns": [], "flat": []}
    for _ in range(args.compare_least):
        for name, templates in (("patterns", DEFAULT_BLOCK_TEMPLATES), ("flat", 0)):
            start = time.process_time()
            solution = least_budget(problem, device, work_limit=args.work_limit, starts=starts,
                                    block_templates=templates)
            runs[name].append({"cpu_s": time.process_time() - start, "least_bytes": solution.model_peak_bytes,
                               "bound_bytes": solution.stats["peak_bound_bytes"], "status": solution.status})
            print(f"{name}: {runs[name][-1]['cpu_s']:.1f} s CPU, least {solution.model_peak_bytes} B "
                  f"({solution.status}); load {os.getloadavg()[0]:.1f}", file=sys.stderr)
    print(json.dumps({"model": args.model, **runs, "command": " ".join(sys.argv)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
