"""Scheduler vs MeBP, side by side on one captured step (planning only: meta device, no weights).

For one model and sequence length it reports, on a device profile's cost model:
- `none` and `mebp`: predicted peak (all roles and computed tensors only) and extra time
  (recompute + un-hidden flash I/O) over the plain step;
- (a) `optimal` at the `mebp` plan's peak: its extra time as a fraction of mebp's;
- (b) `optimal` over a sweep of budgets from mebp's peak down to the least feasible one:
  the lowest peak of computed tensors whose extra time is still at most mebp's, as a
  fraction of mebp's;
- wall time of scheduling (capture + DAG + solve) for the first `optimal` solve;
- with `--compare-flat`, (a) again with the flat model (every block decided on its own,
  the solver's reference): its extra time, solve time and decision patterns per block
  class next to the default's (equal blocks decided alike unless the budget forces it).

    python bench/schedule.py --model smollm2-135m --seq-len 256 --compare-flat
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from mebp_compiler.app import models
from mebp_compiler.capture import capture
from mebp_compiler.device import DeviceProfile
from mebp_compiler.ir import format_bytes
from mebp_compiler.passes.fuse_update import fuse_lora_update
from mebp_compiler.passes.policies import (
    least_memory,
    mebp_schedule,
    none_schedule,
    optimal_schedule,
    scheduling_problem,
)
from mebp_compiler.passes.scheduler import pareto
from mebp_compiler.passes.scheduler.solver import DEFAULT_WORK_LIMIT


def evaluate(graph, schedule, device, budget=None) -> dict:
    point = pareto.evaluate(graph, schedule, device, budget)
    return {"policy": point.policy, "budget_bytes": budget, "peak_bytes": point.predicted_peak_bytes,
            "peak_activation_bytes": point.predicted_peak_activation_bytes,
            "step_s": point.predicted_time_s, "extra_s": point.extra_time_s, "stats": schedule.stats}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--device", default="iphone15promax")
    parser.add_argument("--work-limit", type=float, default=DEFAULT_WORK_LIMIT,
                        help="solver limit per solve, CP-SAT deterministic time")
    parser.add_argument("--sweep", type=int, default=4, help="budgets below mebp's peak tried for (b)")
    parser.add_argument("--no-offload", action="store_true", help="keep or recompute only, no flash")
    parser.add_argument("--head-chunks", type=int, default=0, help="LM head + loss in this many chunks (both plans)")
    parser.add_argument("--vocab-slices", type=int, default=0,
                        help="LM head + loss streamed over this many vocabulary slices (both plans)")
    parser.add_argument("--mlp-chunks", type=int, default=0,
                        help="every block's MLP on this many sequence chunks (both plans)")
    parser.add_argument("--fuse-update", action="store_true", help="LoRA updates fused into the step (both plans)")
    parser.add_argument("--compare-flat", action="store_true",
                        help="also solve (a) with the flat model (block_templates=0) and compare")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = DeviceProfile.load(args.device)
    offload = not args.no_offload

    start = time.perf_counter()
    model = models.add_lora(models.load(args.model, device="meta"))
    ids = torch.zeros((1, args.seq_len), dtype=torch.int64, device="meta")
    graph = capture(model, {"input_ids": ids, "labels": ids}, head_chunks=args.head_chunks,
                    vocab_slices=args.vocab_slices, mlp_chunks=args.mlp_chunks)
    if args.fuse_update:
        graph = fuse_lora_update(graph)
    capture_s = time.perf_counter() - start
    print(f"captured {len(graph.nodes())} nodes in {capture_s:.1f} s", file=sys.stderr)

    none = evaluate(graph, none_schedule(graph), device)
    mebp = evaluate(graph, mebp_schedule(graph), device)
    start = time.perf_counter()
    problem = scheduling_problem(graph, device)
    at_mebp_peak = evaluate(graph, optimal_schedule(graph, mebp["peak_bytes"], device, work_limit=args.work_limit,
                                                    problem=problem, offload=offload), device, mebp["peak_bytes"])
    schedule_s = capture_s + time.perf_counter() - start
    print(f"(a) optimal at mebp's peak: extra {at_mebp_peak['extra_s']:.4f} s vs {mebp['extra_s']:.4f} s, "
          f"{at_mebp_peak['stats']['block_patterns']} decision pattern(s) per block class, "
          f"solved in {at_mebp_peak['stats']['solve_s']:.1f} s", file=sys.stderr)
    flat = None
    if args.compare_flat:
        flat = evaluate(graph, optimal_schedule(graph, mebp["peak_bytes"], device, work_limit=args.work_limit,
                                                problem=problem, offload=offload, block_templates=0),
                        device, mebp["peak_bytes"])
        print(f"    flat model: extra {flat['extra_s']:.4f} s ({at_mebp_peak['step_s'] / flat['step_s'] - 1:+.2%} "
              f"step time with equal blocks alike), {flat['stats']['block_patterns']} pattern(s), "
              f"solved in {flat['stats']['solve_s']:.1f} s ({flat['stats']['solver_status']})", file=sys.stderr)

    least_solution = least_memory(graph, device, work_limit=args.work_limit, problem=problem, offload=offload)
    least, least_proven = least_solution.model_peak_bytes, least_solution.status == "OPTIMAL"
    print(f"least budget found: {format_bytes(least)} ({least_solution.status}, proven at least "
          f"{format_bytes(least_solution.stats['peak_bound_bytes'])})", file=sys.stderr)
    best = at_mebp_peak
    for k in range(1, args.sweep + 1 if least < mebp["peak_bytes"] else 1):
        budget = mebp["peak_bytes"] - (mebp["peak_bytes"] - least) * k // args.sweep  # at least `least`: never fails
        schedule = optimal_schedule(graph, budget, device, work_limit=args.work_limit, problem=problem,
                                    offload=offload)
        point = evaluate(graph, schedule, device, budget)
        print(f"    budget {format_bytes(budget)}: extra {point['extra_s']:.4f} s, computed peak "
              f"{format_bytes(point['peak_activation_bytes'])}", file=sys.stderr)
        if point["extra_s"] <= mebp["extra_s"] and point["peak_activation_bytes"] < best["peak_activation_bytes"]:
            best = point

    result = {
        "model": args.model, "seq_len": args.seq_len, "device": args.device, "work_limit": args.work_limit,
        "offload": offload, "head_chunks": args.head_chunks, "vocab_slices": args.vocab_slices,
        "mlp_chunks": args.mlp_chunks,
        "fuse_update": args.fuse_update,
        "nodes": len(graph.nodes()), "schedule_wall_s": schedule_s, "least_feasible_bytes": least,
        "least_proven": least_proven, "least_bound_bytes": least_solution.stats["peak_bound_bytes"],
        "none": none, "mebp": mebp, "optimal_at_mebp_peak": at_mebp_peak, "optimal_at_mebp_time": best,
        "flat_at_mebp_peak": flat,
        "a_extra_time_ratio": at_mebp_peak["extra_s"] / mebp["extra_s"],
        "b_peak_activation_ratio": best["peak_activation_bytes"] / mebp["peak_activation_bytes"],
        "command": " ".join(sys.argv),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = (f"schedule-{args.model}-seq{args.seq_len}" + ("" if offload else "-no-offload")
            + (f"-head{args.head_chunks}" if args.head_chunks else "")
            + (f"-slices{args.vocab_slices}" if args.vocab_slices else "")
            + (f"-mlp{args.mlp_chunks}" if args.mlp_chunks else "") + ("-fused" if args.fuse_update else ""))
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    rows = [("none", none), ("mebp", mebp), ("optimal @ mebp's peak", at_mebp_peak),
            ("optimal @ mebp's extra time", best)] + ([("flat model @ mebp's peak", flat)] if flat else [])
    table = [f"### Scheduling {args.model}, seq {args.seq_len}, cost model {args.device}"
             + ("" if offload else ", no offload")
             + (f", LM head in {args.head_chunks} chunks" if args.head_chunks else "")
             + (f", head over {args.vocab_slices} vocabulary slices" if args.vocab_slices else "")
             + (f", MLPs in {args.mlp_chunks} sequence chunks" if args.mlp_chunks else "")
             + (", fused LoRA updates" if args.fuse_update else ""), "",
             "| plan | peak, all | peak, computed tensors | extra time over the plain step | solver gap "
             "| patterns per block class | solve |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for label, row in rows:
        gap, patterns, solve_s = (row["stats"].get(key) for key in ("gap", "block_patterns", "solve_s"))
        table.append(f"| {label} | {format_bytes(row['peak_bytes'])} | {format_bytes(row['peak_activation_bytes'])} "
                     f"| {row['extra_s'] * 1e3:.1f} ms | {'-' if gap is None else f'{gap:.1%}'} "
                     f"| {'-' if patterns is None else patterns} | {'-' if solve_s is None else f'{solve_s:.1f} s'} |")
    proof = "proven least" if least_proven else \
        f"not proven least; at least {format_bytes(least_solution.stats['peak_bound_bytes'])}"
    table += ["", f"Least feasible budget: {format_bytes(least)} ({proof}).",
              f"(a) extra time of optimal at mebp's peak / mebp's: {result['a_extra_time_ratio']:.2f}; "
                  f"(b) computed-tensor peak of optimal at mebp's extra time / mebp's: "
                  f"{result['b_peak_activation_ratio']:.2f}; capture + first solve: {schedule_s:.1f} s "
                  f"({len(graph.nodes())} nodes, solver work limit {args.work_limit:g} per solve, 1 worker).",
              f"Command: `{result['command']}`"]
    (out / f"{stem}.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
