"""The cost model against this machine: predicted vs measured step time per policy, side by side.

One captured LoRA step (real weights for SmolLM2-135M), scheduled four ways - `none`,
`mebp`, `optimal` at `mebp`'s predicted peak and `optimal` at the least budget found - on
a device profile, each run by the CPU runtime. The steps are alternated in one process,
`--rounds` times, after one warm-up round; medians are kept. Measured is process CPU time
(what the step computed; ops are calibrated in it) and the wall clock (what flash I/O
waits are in); predicted is `passes.cost.step_cost`. Extra time is a plan's time over
`none`'s. `--device calibrate` first runs `mebp calibrate`'s measurement on the same step
and writes the profile next to the results. `--by-class` adds, for `none`, predicted vs
measured seconds per op class (each op timed where it runs).

Every plan's loss is checked against `none`'s (the plain step) before any time is kept.

    python bench/cost_model.py --device calibrate --by-class
    python bench/cost_model.py --device bench/results/calibrated-smollm2-135m-seq256.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from mebp_compiler.app import calibrate
from mebp_compiler.device import DeviceProfile
from mebp_compiler.ir import format_bytes
from mebp_compiler.passes.cost import seconds_by_class, step_cost
from mebp_compiler.passes.liveness import liveness
from mebp_compiler.passes.policies import least_memory, mebp_schedule, none_schedule, optimal_schedule, scheduling_problem
from mebp_compiler.passes.rewrite import rewrite
from mebp_compiler.passes.scheduler.solver import DEFAULT_WORK_LIMIT
from mebp_compiler.runtime import Runtime
from mebp_compiler.schedule import Decision


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--device", default="calibrate", help="a profile name or file, or 'calibrate' to measure first")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of alternated steps")
    parser.add_argument("--calibration-rounds", type=int, default=5)
    parser.add_argument("--work-limit", type=float, default=DEFAULT_WORK_LIMIT)
    parser.add_argument("--by-class", action="store_true", help="predicted vs measured seconds per op class")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.model}-seq{args.seq_len}"

    _, graph, inputs = calibrate.model_step(args.model, args.seq_len)
    if args.device == "calibrate":
        calibration = calibrate.calibrate(graph, inputs, name=f"calibrated-{stem}", rounds=args.calibration_rounds,
                                          offload_dir=out, description=f"bench/cost_model.py on {stem}")
        device_path = calibrate.write_profile(calibration, out / f"calibrated-{stem}.json")
        print(calibrate.describe(calibration), file=sys.stderr)
        device = calibration.profile
    else:
        device_path, device = args.device, DeviceProfile.load(args.device)

    problem = scheduling_problem(graph, device)
    none, mebp = none_schedule(graph), mebp_schedule(graph)
    mebp_peak = liveness(rewrite(graph, mebp)).peak_bytes
    at_peak = optimal_schedule(graph, mebp_peak, device, work_limit=args.work_limit, problem=problem)
    least = least_memory(graph, device, work_limit=args.work_limit, problem=problem).model_peak_bytes
    at_least = optimal_schedule(graph, least, device, work_limit=args.work_limit, problem=problem)
    plans = {"none": none, "mebp": mebp, "optimal @ mebp's peak": at_peak, "optimal @ least": at_least}

    with tempfile.TemporaryDirectory(prefix=".bench-offload-", dir=out) as flash:
        runtimes = {label: Runtime(rewrite(graph, s), os.path.join(flash, str(k)))
                    for k, (label, s) in enumerate(plans.items())}
        reference = runtimes["none"].run(inputs).loss
        for label, runtime in runtimes.items():  # warm-up round, and every plan computes the plain step's loss
            loss = runtime.run(inputs).loss
            if not torch.allclose(loss, reference, rtol=1e-5, atol=1e-6):
                raise AssertionError(f"{label}: loss {loss.item()} differs from the plain step's {reference.item()}")
        cpu = {label: [] for label in plans}
        wall = {label: [] for label in plans}
        for r in range(args.rounds):
            for label, runtime in runtimes.items():
                w, c = time.perf_counter(), time.process_time()
                runtime.run(inputs)
                cpu[label].append(time.process_time() - c)
                wall[label].append(time.perf_counter() - w)
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in cpu.items()),
                  file=sys.stderr)
        by_class = None
        if args.by_class:
            op_seconds, between_s = calibrate.time_ops(graph, inputs, args.rounds, runtime=runtimes["none"])
            measured = calibrate.timings_by_class(graph, op_seconds)
            predicted = seconds_by_class(graph, device)
            by_class = {c: {"ops": measured[c].ops, "predicted_s": predicted.get(c, 0.0),
                            "measured_s": measured[c].seconds} for c in measured}
            by_class["runtime, between ops"] = {"ops": len(op_seconds), "predicted_s": 0.0,
                                                "measured_s": between_s}

    rows = {}
    for label, schedule in plans.items():
        cost = step_cost(graph, schedule, device)
        rows[label] = {"predicted_s": cost.total_s, "predicted_extra_s": cost.extra_s,
                       "measured_cpu_s": statistics.median(cpu[label]), "measured_wall_s": statistics.median(wall[label]),
                       "peak_bytes": liveness(rewrite(graph, schedule)).peak_bytes,
                       "offloaded": len(schedule.tensors_with(Decision.OFFLOAD)),
                       "recomputed": len(schedule.tensors_with(Decision.RECOMPUTE)),
                       "cpu_rounds_s": cpu[label], "wall_rounds_s": wall[label]}
    for row in rows.values():
        row["measured_extra_cpu_s"] = row["measured_cpu_s"] - rows["none"]["measured_cpu_s"]
        row["measured_extra_wall_s"] = row["measured_wall_s"] - rows["none"]["measured_wall_s"]
    ratio = {clock: rows["optimal @ mebp's peak"][f"measured_extra_{clock}_s"] / rows["mebp"][f"measured_extra_{clock}_s"]
             for clock in ("cpu", "wall")}
    ratio["predicted"] = rows["optimal @ mebp's peak"]["predicted_extra_s"] / rows["mebp"]["predicted_extra_s"]

    result = {"model": args.model, "seq_len": args.seq_len, "device": str(device_path), "rounds": args.rounds,
              "load_average": list(os.getloadavg()), "plans": rows, "by_class": by_class,
              "optimal_at_mebp_peak_extra_over_mebp": ratio, "command": " ".join(sys.argv)}
    (out / f"cost-model-{stem}.json").write_text(json.dumps(result, indent=2))
    table = [f"### Predicted vs measured step time, {args.model} seq {args.seq_len}, profile {device_path}", "",
             "| plan | peak | offloaded / recomputed | predicted | measured, CPU | error | measured, wall | error "
             "| extra: predicted / CPU / wall |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, row in rows.items():
        table.append(f"| {label} | {format_bytes(row['peak_bytes'])} | {row['offloaded']} / {row['recomputed']} "
                     f"| {row['predicted_s']:.3f} s | {row['measured_cpu_s']:.3f} s "
                     f"| {row['predicted_s'] / row['measured_cpu_s'] - 1:+.1%} | {row['measured_wall_s']:.3f} s "
                     f"| {row['predicted_s'] / row['measured_wall_s'] - 1:+.1%} | {row['predicted_extra_s'] * 1e3:.0f} / "
                     f"{row['measured_extra_cpu_s'] * 1e3:.0f} / {row['measured_extra_wall_s'] * 1e3:.0f} ms |")
    table += ["", f"optimal @ mebp's peak, extra time over mebp's: predicted {ratio['predicted']:.2f}x, measured "
                  f"{ratio['cpu']:.2f}x (CPU) / {ratio['wall']:.2f}x (wall). Error = predicted / measured - 1. "
                  f"Medians of {args.rounds} alternated rounds; load average {os.getloadavg()[0]:.1f} at the end.",
              f"Command: `{result['command']}`"]
    if by_class:
        table += ["", "| op class (plan none) | ops | predicted | measured, CPU | error |", "|---|---:|---:|---:|---:|"]
        for c, row in sorted(by_class.items(), key=lambda kv: -kv[1]["measured_s"]):
            error = f"{row['predicted_s'] / row['measured_s'] - 1:+.1%}" if row["predicted_s"] else "in the overhead"
            table.append(f"| {c} | {row['ops']} | {row['predicted_s']:.3f} s | {row['measured_s']:.3f} s | {error} |")
    (out / f"cost-model-{stem}.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
