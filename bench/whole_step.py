#!/usr/bin/env python
"""Whole-step memory of INT4 LoRA training, weights included, each plan in a fresh process.

    python bench/whole_step.py --model qwen2.5-0.5b --seq-len 256 --lora-r 8 --budgets least

Run with --help for what every column means and how it is measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pathlib
import shlex
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from memory import CHILD_ENV, PREDICTION_TOLERANCE, malloc_trim, read_status, reset_peak_rss  # noqa: E402

MIB = 2**20
#: Published whole-step peaks on an iPhone 15 Pro Max, Qwen2.5-0.5B, seq 256, LoRA r=8 on
#: all 7 projections, 4-bit base weights: MeBP (Song & Tang, 2025) about 320-361 MB, and
#: its follow-up MeSP 136 MB (as restated in this project's issue 4).
PUBLISHED = {"MeBP (iPhone 15 Pro Max)": "320-361 MB", "MeSP (iPhone 15 Pro Max)": "136 MB"}

DESCRIPTION = """\
Whole-step memory of LoRA training with INT4 base weights (group size --group-size),
the LM head and loss streamed over --vocab-slices vocabulary slices, and LoRA updates
fused into the step (AdamW), for the `mebp` plan and the `optimal` plan at each of
--budgets ("least" = the least budget the scheduler can meet, or sizes such as 150MB).
Batch 1, random token ids, random weights of the real architecture (memory does not
depend on the values). Each plan runs in its own subprocess with MALLOC_MMAP_THRESHOLD_=
65536 and one torch thread.

columns (MiB = 2^20 bytes):
  predicted / held      the liveness pass's predicted peak and the runtime's measured peak
                        of everything the step holds: resident float weights (norms,
                        rotary tables), LoRA parameters, gradients, activations, INT4
                        weights being decompressed, batch. Not the mapped INT4 file.
  + AdamW state         held plus the optimizer's two moments per LoRA parameter (held by
                        torch.optim outside the step): the whole-step total
  at the held peak      what each role holds at that moment
  mapped INT4           the INT4 weight file, memory-mapped: clean file-backed pages the OS
                        can drop and read again, not counted as held (iOS does not charge
                        them to the app, which is why MeBP maps its weights)
  RSS anon over base    peak anonymous RSS (RssAnon, sampled every 2 ms) during the steps
                        minus RssAnon before them, after the model's float copies of the
                        quantized weights were released (the plan reads only the INT4 file)
                        and gc + malloc_trim: what the process itself allocated for the step
  RSS file              peak file-backed RSS (RssFile, sampled) during the steps: the mapped
                        INT4 pages touched, plus the shared libraries
  base                  RssAnon before the steps: the interpreter, torch, the model's
                        remaining tensors, the compiled plan

With --predict MODEL[,MODEL...] nothing runs: each model is built on the meta device (no
weights), compiled the same way, and the predicted held peak, the whole-step total with
AdamW state, and the size of the mapped INT4 file are reported (planning only; the
prediction equals the runtime's held bytes wherever a plan has been run).

Checks (non-zero exit when one fails): the runtime's held peak equals the prediction
within 2% in every plan, and the optimal plan's total is within its budget.
"""


def sample_rss(stop: threading.Event, peaks: dict[str, int]) -> None:
    while not stop.is_set():
        status = read_status()
        for key in ("RssAnon", "RssFile"):
            peaks[key] = max(peaks.get(key, 0), status.get(key, 0))
        time.sleep(0.002)


def run_plan(args: argparse.Namespace) -> dict:
    """Compile and run one plan in this process; return its measurements."""
    import torch

    torch.set_num_threads(1)
    import mebp_compiler
    from mebp_compiler.app import models
    from mebp_compiler.device import DeviceProfile, parse_size
    from mebp_compiler.ir import UNHELD_ROLES, Role
    from mebp_compiler.passes.policies import least_feasible_budget
    from mebp_compiler.passes.quantize import release_float_weights
    from mebp_compiler.plan import optimizer_state_bytes
    from mebp_compiler.plan import make_optimizer

    torch.manual_seed(0)
    model = models.add_lora(models.load(args.model), models.LoraSettings(r=args.lora_r, alpha=2 * args.lora_r))
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq_len), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone()}  # two tensors, as a data loader gives
    options = dict(int4=True, group_size=args.group_size, vocab_slices=args.vocab_slices, fuse_update=True,
                   offload_dir=tempfile.mkdtemp(prefix="mebp-bench-"),
                   gguf_file=models.smollm2_gguf_path() if args.gguf_blocks else None)
    reserved = optimizer_state_bytes(model, "adamw")
    start = time.perf_counter()
    budget = None
    if args.plan == "mebp":
        plan = mebp_compiler.compile(model, batch, "mebp", **options)
    else:
        device = DeviceProfile.load(args.device)
        if args.budget == "least":
            probe = mebp_compiler.compile(model, batch, "mebp", **options)
            budget = least_feasible_budget(probe.captured, device, work_limit=args.work_limit) + reserved
            del probe
        else:
            budget = parse_size(args.budget)
        plan = mebp_compiler.compile(model, batch, "optimal", budget=budget, device=device,
                                     work_limit=args.work_limit, **options)
    compile_s = time.perf_counter() - start
    released = release_float_weights(model, plan.weights)
    plan.runtime.trim_heap = args.trim_heap
    optimizer = make_optimizer(plan.lora_parameters().values(), "adamw", 1e-4)

    gc.collect()
    malloc_trim()
    base = read_status()
    reset_peak_rss()
    peaks: dict[str, int] = {}
    stop = threading.Event()
    sampler = threading.Thread(target=sample_rss, args=(stop, peaks), daemon=True)
    sampler.start()
    results, step_s = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        results.append(plan.step(batch, optimizer))
        step_s.append(time.perf_counter() - t0)
    stop.set()
    sampler.join()
    status = read_status()

    result = results[-1]
    peak_step = max(range(len(result.held_bytes)), key=result.held_bytes.__getitem__)
    at_peak = {role.value: row[peak_step] for role, row in result.held_by_role.items() if role not in UNHELD_ROLES}
    return {
        "plan": args.plan if args.plan == "mebp" else f"optimal@{args.budget}",
        "budget_bytes": budget,
        "predicted_peak_bytes": plan.predicted_peak_bytes,
        "held_peak_bytes": result.held_peak_bytes,
        "optimizer_state_bytes": reserved,
        "total_bytes": result.held_peak_bytes + reserved,
        "held_at_peak_by_role": at_peak,
        "mapped_int4_bytes": plan.profile.bytes_by_role.get(Role.MAPPED, [0])[0],
        "offloaded_bytes_written": plan.runtime.store.bytes_written,
        "float_weights_released_bytes": released,
        "rss_anon_base_bytes": base.get("RssAnon", 0),
        "rss_anon_over_base_bytes": peaks.get("RssAnon", 0) - base.get("RssAnon", 0),
        "rss_file_peak_bytes": peaks.get("RssFile", 0),
        "vm_hwm_over_base_bytes": status["VmHWM"] - base["VmRSS"],
        "compile_s": compile_s,
        "step_s": step_s,
        "losses": [float(r.loss) for r in results],
        "stats": plan.schedule.stats,
    }


def predict(model_name: str, args: argparse.Namespace) -> list[dict]:
    """Predicted whole-step memory of the mebp and optimal@least plans, on the meta device."""
    import torch

    import mebp_compiler
    from mebp_compiler.app import models
    from mebp_compiler.device import DeviceProfile
    from mebp_compiler.ir import Role
    from mebp_compiler.passes.policies import least_feasible_budget
    from mebp_compiler.plan import optimizer_state_bytes

    model = models.add_lora(models.load(model_name, device="meta"),
                            models.LoraSettings(r=args.lora_r, alpha=2 * args.lora_r))
    ids = torch.zeros((1, args.seq_len), dtype=torch.int64, device="meta")
    batch = {"input_ids": ids, "labels": ids}
    options = dict(int4=True, group_size=args.group_size, vocab_slices=args.vocab_slices, fuse_update=True)
    reserved = optimizer_state_bytes(model, "adamw")
    device = DeviceProfile.load(args.device)
    start = time.perf_counter()
    plans = [("mebp", mebp_compiler.compile(model, batch, "mebp", **options))]
    least = least_feasible_budget(plans[0][1].captured, device, work_limit=args.work_limit) + reserved
    plans.append(("optimal@least", mebp_compiler.compile(model, batch, "optimal", budget=least, device=device,
                                                         work_limit=args.work_limit, **options)))
    seconds = time.perf_counter() - start
    return [{"model": model_name, "plan": name, "predicted_peak_bytes": plan.predicted_peak_bytes,
             "total_bytes": plan.predicted_peak_bytes + reserved, "optimizer_state_bytes": reserved,
             "mapped_int4_bytes": plan.profile.bytes_by_role[Role.MAPPED][0], "plan_s": seconds}
            for name, plan in plans]


def run_predictions(args: argparse.Namespace, argv: list[str]) -> int:
    rows = []
    for name in args.predict.split(","):
        print(f"[bench] predicting {name} ...", file=sys.stderr, flush=True)
        rows += predict(name, args)
    lines = [f"Predicted (meta device), seq {args.seq_len}, batch 1, LoRA r={args.lora_r} (all 7 projections), "
             f"INT4 group {args.group_size}, head in {args.vocab_slices} vocabulary slices, fused AdamW (MiB):", "",
             "| model | plan | predicted held | + AdamW state = total | mapped INT4 file | mebp + optimal planning |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['plan']} | {mib(r['predicted_peak_bytes'])} | {mib(r['total_bytes'])} | "
                     f"{mib(r['mapped_int4_bytes'])} | {r['plan_s']:.0f} s |")
    command_line = "bench/whole_step.py " + shlex.join(argv)
    table = "\n".join(lines) + f"\n\nCommand: `{command_line}`\n"
    print(table)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"whole-step-predicted-seq{args.seq_len}-r{args.lora_r}.md").write_text(table)
    (out / f"whole-step-predicted-seq{args.seq_len}-r{args.lora_r}.json").write_text(
        json.dumps({"command": command_line, "rows": rows}, indent=2))
    return 0


def mib(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / MIB:.1f}"


def weights_label(args: argparse.Namespace) -> str:
    if args.gguf_blocks:
        return "the GGUF file's own blocks (Q4_1 weights, Q8_0 embedding)"
    return f"INT4 group {args.group_size}"


def build_table(records: list[dict], args: argparse.Namespace) -> str:
    roles = ("frozen", "lora", "gradient", "activation", "dequantized")
    lines = [
        f"{args.model}, seq {args.seq_len}, batch 1, LoRA r={args.lora_r} (all 7 projections), "
        f"{weights_label(args)}, head in {args.vocab_slices} vocabulary slices, fused AdamW updates (MiB):",
        "",
        "| plan | predicted | held | + AdamW state = total | " + " | ".join(f"{r} at peak" for r in roles)
        + " | mapped INT4 | RSS anon over base | RSS file peak | base (anon) |",
        "|---|" + "---:|" * (7 + len(roles)),
    ]
    for r in records:
        cells = [r["plan"], mib(r["predicted_peak_bytes"]), mib(r["held_peak_bytes"]), mib(r["total_bytes"])]
        cells += [mib(r["held_at_peak_by_role"].get(role, 0)) for role in roles]
        cells += [mib(r["mapped_int4_bytes"]), mib(r["rss_anon_over_base_bytes"]), mib(r["rss_file_peak_bytes"]),
                  mib(r["rss_anon_base_bytes"])]
        lines.append("| " + " | ".join(cells) + " |")
    if args.model == "qwen2.5-0.5b":
        lines += ["", "Published for this model and setting: "
                  + "; ".join(f"{k}: {v}" for k, v in PUBLISHED.items()) + "."]
    return "\n".join(lines)


def run_all(args: argparse.Namespace, argv: list[str]) -> int:
    plans = [("mebp", None)] + [("optimal", b) for b in args.budgets.split(",") if b]
    records, failures = [], []
    for plan, budget in plans:
        label = plan if budget is None else f"optimal@{budget}"
        print(f"[bench] {label} ...", file=sys.stderr, flush=True)
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
            result_file = handle.name
        command = [sys.executable, __file__, "--child", "--plan", plan, "--result-file", result_file,
                   *(["--budget", budget] if budget else []), *argv]
        done = subprocess.run(command, env={**os.environ, **CHILD_ENV}, text=True, capture_output=True)
        if done.returncode != 0:
            failures.append(f"{label}: exit {done.returncode}: {done.stderr[-2000:]}")
            continue
        record = json.loads(pathlib.Path(result_file).read_text())
        os.unlink(result_file)
        records.append(record)
        drift = abs(record["held_peak_bytes"] - record["predicted_peak_bytes"]) / record["predicted_peak_bytes"]
        if drift > PREDICTION_TOLERANCE:
            failures.append(f"{label}: held {mib(record['held_peak_bytes'])} vs predicted "
                            f"{mib(record['predicted_peak_bytes'])} MiB")
        if record["budget_bytes"] is not None and record["total_bytes"] > record["budget_bytes"]:
            failures.append(f"{label}: total {mib(record['total_bytes'])} MiB over the budget")
    table = build_table(records, args)
    command_line = "bench/whole_step.py " + shlex.join(argv)
    print(table + f"\n\nCommand: `{command_line}`")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = (f"whole-step-{args.model}-seq{args.seq_len}-r{args.lora_r}" + ("-gguf" if args.gguf_blocks else "")
            + ("-trimmed" if args.trim_heap else ""))
    (out / f"{stem}.md").write_text(table + f"\n\nCommand: `{command_line}`\n")
    (out / f"{stem}.json").write_text(json.dumps({"command": command_line, "records": records,
                                                  "failures": failures}, indent=2))
    for failure in failures:
        print(f"[bench] FAILED {failure}", file=sys.stderr)
    return 1 if failures else 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    from mebp_compiler.passes.scheduler.solver import DEFAULT_WORK_LIMIT

    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-0.5b", help="a name from mebp_compiler.app.models.MODEL_NAMES")
    parser.add_argument("--seq-len", type=int, default=256, help="sequence length (batch is 1)")
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank, alpha = 2r (default 8, MeSP's)")
    parser.add_argument("--group-size", type=int, default=64, help="INT4 group size (default 64, MeSP's)")
    parser.add_argument("--trim-heap", action="store_true",
                        help="return freed heap pages to the OS at each segment (Runtime.trim_heap)")
    parser.add_argument("--gguf-blocks", action="store_true",
                        help="smollm2-135m only: keep its GGUF file's Q4_1/Q8_0 blocks instead of INT4")
    parser.add_argument("--vocab-slices", type=int, default=64, help="LM head + loss vocabulary slices (default 64)")
    parser.add_argument("--budgets", default="least", help="comma-separated budgets for optimal plans ('least' or sizes)")
    parser.add_argument("--device", default="iphone15promax", help="device profile for the optimal plans")
    parser.add_argument("--work-limit", type=float, default=DEFAULT_WORK_LIMIT,
                        help="scheduler limit per solve, CP-SAT deterministic time")
    parser.add_argument("--steps", type=int, default=2, help="steps per plan (the last one is reported)")
    parser.add_argument("--out", default="bench/results", help="folder for the .md and .json")
    parser.add_argument("--predict", metavar="MODELS",
                        help="comma-separated models to plan on the meta device instead of running --model")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--plan", choices=("mebp", "optimal"), help=argparse.SUPPRESS)
    parser.add_argument("--budget", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.gguf_blocks and (args.model != "smollm2-135m" or args.predict):
        parser.error("--gguf-blocks needs --model smollm2-135m (the one model loaded from a GGUF file), "
                     "without --predict")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child:
        pathlib.Path(args.result_file).write_text(json.dumps(run_plan(args)))
        return 0
    if args.predict:
        return run_predictions(args, argv)
    return run_all(args, argv)


if __name__ == "__main__":
    sys.exit(main())
