"""The cost model against this machine: predicted vs measured step time per policy, side by side.

One captured LoRA step (real weights for SmolLM2-135M), scheduled four ways - `none`,
`mebp`, `optimal` at `mebp`'s predicted peak and `optimal` at the least budget found - on
a device profile, each run by the CPU runtime, beside the same step as eager autograd and
with transformers' gradient checkpointing (`app.baselines`, on the same model and batch).
The six steps are alternated in one process, `--rounds` times, after one warm-up round;
medians are kept. Measured is process CPU time
(what the step computed; ops are calibrated in it) and the wall clock (what flash I/O
waits are in); predicted is `passes.cost.step_cost`. Extra time is a plan's time over
`none`'s. `--device calibrate` first runs `mebp calibrate`'s measurement on the same step
and writes the profile next to the results. `--by-class` adds, for `none`, predicted vs
measured seconds per op class (each op timed where it runs).

Every step's loss is checked against `none`'s (the plain step) before any time is kept.
Peaks are of the computed tensors (activations, gradients, loss; not weights or batch):
predicted by `liveness` (plans), held as the runtime counts its storages (plans), and the
allocator peak of one more step under `torch.profiler` (every method, op scratch included).
Solve time is the process CPU time of the load and capture (shared) plus each `optimal`
row's own first solve (building the problem, then `least_memory` for the least budget, then
`optimal_schedule`). The side-by-side table's extra time is over eager's for the baselines
and over `none`'s for the plans.

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
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from mebp_compiler.app import calibrate
from mebp_compiler.app.baselines import BASELINES, allocator_peak, autograd_step, baseline_mode
from mebp_compiler.device import DeviceProfile
from mebp_compiler.ir import INPUT_ROLES, Role, format_bytes
from mebp_compiler.passes.cost import seconds_by_class, step_cost
from mebp_compiler.passes.liveness import liveness
from mebp_compiler.passes.policies import least_memory, mebp_schedule, none_schedule, optimal_schedule, scheduling_problem
from mebp_compiler.passes.rewrite import rewrite
from mebp_compiler.passes.scheduler.solver import DEFAULT_WORK_LIMIT
from mebp_compiler.runtime import Runtime
from mebp_compiler.schedule import Decision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from solve_time import clocks  # noqa: E402

#: The roles of computed tensors (activations, gradients, loss): what the peaks here count.
COMPUTED = tuple(role for role in Role if role not in INPUT_ROLES)
AT_PEAK, AT_LEAST = "optimal @ mebp's peak", "optimal @ least"


@dataclass(frozen=True)
class Method:
    """One way to run the step: `run()` computes it and returns its loss; `mode()` is entered around each run."""

    run: Callable[[], torch.Tensor]
    mode: Callable[[], AbstractContextManager] = nullcontext


def since(start: tuple[float, float]) -> tuple[float, float]:
    """(CPU, wall) seconds since `start`, a `clocks()` reading."""
    now = clocks()
    return now[0] - start[0], now[1] - start[1]


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

    started = clocks()
    model, graph, inputs = calibrate.model_step(args.model, args.seq_len)
    capture_s = since(started)
    batch = {spec.source: tensor for spec, tensor in zip(graph.inputs, inputs) if spec.role == Role.BATCH}
    if args.device == "calibrate":
        calibration = calibrate.calibrate(graph, inputs, name=f"calibrated-{stem}", rounds=args.calibration_rounds,
                                          offload_dir=out, description=f"bench/cost_model.py on {stem}")
        device_path = calibrate.write_profile(calibration, out / f"calibrated-{stem}.json")
        print(calibrate.describe(calibration), file=sys.stderr)
        device = calibration.profile
    else:
        device_path, device = args.device, DeviceProfile.load(args.device)

    started = clocks()
    problem = scheduling_problem(graph, device)
    problem_s = since(started)
    none, mebp = none_schedule(graph), mebp_schedule(graph)
    mebp_peak = liveness(rewrite(graph, mebp)).peak_bytes
    started = clocks()
    at_peak = optimal_schedule(graph, mebp_peak, device, work_limit=args.work_limit, problem=problem)
    at_peak_s = since(started)
    started = clocks()
    least = least_memory(graph, device, work_limit=args.work_limit, problem=problem).model_peak_bytes
    at_least = optimal_schedule(graph, least, device, work_limit=args.work_limit, problem=problem)
    at_least_s = since(started)
    plans = {"none": none, "mebp": mebp, AT_PEAK: at_peak, AT_LEAST: at_least}
    first_solve_s = {AT_PEAK: at_peak_s, AT_LEAST: at_least_s}

    with tempfile.TemporaryDirectory(prefix=".bench-offload-", dir=out) as flash:
        runtimes = {label: Runtime(rewrite(graph, s), os.path.join(flash, str(k)))
                    for k, (label, s) in enumerate(plans.items())}
        methods = {name: Method(lambda: autograd_step(model, batch), lambda name=name: baseline_mode(model, name))
                   for name in BASELINES}
        methods.update({label: Method(lambda runtime=runtime: runtime.run(inputs).loss)
                        for label, runtime in runtimes.items()})
        reference = runtimes["none"].run(inputs).loss
        held = {}
        for label, method in methods.items():  # warm-up round, and every step computes the plain step's loss
            if label in runtimes:
                result = runtimes[label].run(inputs)
                loss, held[label] = result.loss, result.held_peak_bytes_of(COMPUTED)
                del result  # it holds the LoRA gradients
            else:
                with method.mode():
                    loss = method.run()
            if not torch.allclose(loss, reference, rtol=1e-5, atol=1e-6):
                raise AssertionError(f"{label}: loss {loss.item()} differs from the plain step's {reference.item()}")
        cpu = {label: [] for label in methods}
        wall = {label: [] for label in methods}
        for r in range(args.rounds):
            for label, method in methods.items():
                with method.mode():
                    started = clocks()
                    method.run()
                    c, w = since(started)
                cpu[label].append(c)
                wall[label].append(w)
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in cpu.items()),
                  file=sys.stderr)
        allocated = {}
        for label, method in methods.items():
            with method.mode():
                allocated[label] = allocator_peak(method.run)
        by_class = None
        if args.by_class:
            op_seconds, between_s = calibrate.time_ops(graph, inputs, args.rounds, runtime=runtimes["none"])
            measured = calibrate.timings_by_class(graph, op_seconds)
            predicted = seconds_by_class(graph, device)
            by_class = {c: {"ops": measured[c].ops, "predicted_s": predicted.get(c, 0.0),
                            "measured_s": measured[c].seconds} for c in measured}
            by_class["runtime, between ops"] = {"ops": len(op_seconds), "predicted_s": 0.0,
                                                "measured_s": between_s}

    rows = {label: {"measured_cpu_s": statistics.median(cpu[label]), "measured_wall_s": statistics.median(wall[label]),
                    "allocator_peak_bytes": allocated[label], "cpu_rounds_s": cpu[label], "wall_rounds_s": wall[label]}
            for label in methods}
    for label, schedule in plans.items():
        cost = step_cost(graph, schedule, device)
        profile = liveness(rewrite(graph, schedule))
        rows[label].update({"predicted_s": cost.total_s, "predicted_extra_s": cost.extra_s,
                            "peak_bytes": profile.peak_bytes, "predicted_peak_computed_bytes": profile.peak_activation_bytes,
                            "held_peak_computed_bytes": held[label],
                            "offloaded": len(schedule.tensors_with(Decision.OFFLOAD)),
                            "recomputed": len(schedule.tensors_with(Decision.RECOMPUTE))})
    for label, (solve_cpu, solve_wall) in first_solve_s.items():
        rows[label].update({"first_solve_cpu_s": problem_s[0] + solve_cpu, "first_solve_wall_s": problem_s[1] + solve_wall})
    for label, row in rows.items():
        row["extra_over"] = "eager" if label in BASELINES else "none"
        for clock in ("cpu", "wall"):
            row[f"measured_extra_{clock}_s"] = row[f"measured_{clock}_s"] - rows[row["extra_over"]][f"measured_{clock}_s"]
    ratio = {clock: rows[AT_PEAK][f"measured_extra_{clock}_s"] / rows["mebp"][f"measured_extra_{clock}_s"]
             for clock in ("cpu", "wall")}
    ratio["predicted"] = rows[AT_PEAK]["predicted_extra_s"] / rows["mebp"]["predicted_extra_s"]

    load = os.getloadavg()
    result = {"model": args.model, "seq_len": args.seq_len, "device": str(device_path), "rounds": args.rounds,
              "load_average": list(load), "capture_cpu_s": capture_s[0], "capture_wall_s": capture_s[1],
              "plans": rows, "by_class": by_class, "optimal_at_mebp_peak_extra_over_mebp": ratio,
              "command": " ".join(sys.argv)}
    (out / f"cost-model-{stem}.json").write_text(json.dumps(result, indent=2))
    notes = (f"Medians of {args.rounds} alternated rounds in one process, process CPU time; load average "
             f"{load[0]:.1f} at the end.")
    table = side_by_side(rows, capture_s[0], f"{args.model} seq {args.seq_len}, profile {device_path}")
    table += ["", f"Peaks are of computed tensors (not weights). {notes} Solve: load and capture "
                  f"{capture_s[0]:.1f} s CPU + the row's first solve.", "",
              f"### Predicted vs measured step time, {args.model} seq {args.seq_len}, profile {device_path}", "",
              "| plan | peak | offloaded / recomputed | predicted | measured, CPU | error | measured, wall | error "
              "| extra: predicted / CPU / wall |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label in plans:
        row = rows[label]
        table.append(f"| {label} | {format_bytes(row['peak_bytes'])} | {row['offloaded']} / {row['recomputed']} "
                     f"| {row['predicted_s']:.3f} s | {row['measured_cpu_s']:.3f} s "
                     f"| {row['predicted_s'] / row['measured_cpu_s'] - 1:+.1%} | {row['measured_wall_s']:.3f} s "
                     f"| {row['predicted_s'] / row['measured_wall_s'] - 1:+.1%} | {row['predicted_extra_s'] * 1e3:.0f} / "
                     f"{row['measured_extra_cpu_s'] * 1e3:.0f} / {row['measured_extra_wall_s'] * 1e3:.0f} ms |")
    table += ["", f"optimal @ mebp's peak, extra time over mebp's: predicted {ratio['predicted']:.2f}x, measured "
                  f"{ratio['cpu']:.2f}x (CPU) / {ratio['wall']:.2f}x (wall). Error = predicted / measured - 1. {notes}",
              f"Command: `{result['command']}`"]
    if by_class:
        table += ["", "| op class (plan none) | ops | predicted | measured, CPU | error |", "|---|---:|---:|---:|---:|"]
        for c, row in sorted(by_class.items(), key=lambda kv: -kv[1]["measured_s"]):
            error = f"{row['predicted_s'] / row['measured_s'] - 1:+.1%}" if row["predicted_s"] else "in the overhead"
            table.append(f"| {c} | {row['ops']} | {row['predicted_s']:.3f} s | {row['measured_s']:.3f} s | {error} |")
    (out / f"cost-model-{stem}.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return 0


def side_by_side(rows: dict[str, dict], capture_cpu_s: float, title: str) -> list[str]:
    """The markdown table of every method: peaks, measured step and extra time, predicted extra, solve time."""
    def cell(row: dict, key: str, show: Callable[[float], str]) -> str:
        return show(row[key]) if key in row else "-"

    lines = [f"### Side by side, {title}", "",
             "| method | peak, predicted | peak, held | peak, allocator | step, CPU | extra, measured (over eager / none) | extra, predicted "
             "| capture + first solve, CPU |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, row in rows.items():
        name = BASELINES.get(label, f"`{label}`")
        extra = "-" if label == row["extra_over"] else f"{row['measured_extra_cpu_s'] * 1e3:+.0f} ms"
        solve = cell(row, "first_solve_cpu_s", lambda s: f"{capture_cpu_s:.1f} + {s:.1f} s")
        predicted_extra = "-" if label == "none" else cell(row, "predicted_extra_s", lambda s: f"{s * 1e3:+.0f} ms")
        lines.append(f"| {name} | {cell(row, 'predicted_peak_computed_bytes', format_bytes)} "
                     f"| {cell(row, 'held_peak_computed_bytes', format_bytes)} | {format_bytes(row['allocator_peak_bytes'])} "
                     f"| {row['measured_cpu_s']:.3f} s | {extra} | {predicted_extra} | {solve} |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
