#!/usr/bin/env python
"""Whole-process memory and step time of the native driver (`mebp-native`), each
configuration in a fresh process, next to the plan's prediction and eager torch.

    python bench/native.py [--configs smollm2-135m:fp32:mebp,...] [--seq-len 256]

Run with --help for what every column means and how it is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from memory import CHILD_ENV  # noqa: E402

MIB = 2**20
MB = 10**6
#: Published whole-process peaks of LoRA training on an iPhone 15 Pro Max, Qwen2.5-0.5B,
#: seq 256, LoRA r=8 on all 7 projections, 4-bit base weights: MeBP (Song & Tang, Apple,
#: 2025) about 320-361 MB, its follow-up MeSP 136 MB (as restated in this project's issue
#: 13). Neither paper reports SmolLM2-135M.
PUBLISHED = {"qwen2.5-0.5b": {"MeBP": "320-361 MB", "MeSP": "136 MB"}}
#: The issue's targets: native anonymous RSS (bytes) per model, and native step / eager torch.
RSS_TARGETS = {"qwen2.5-0.5b": 136 * MB, "smollm2-135m": 100 * MB}
STEP_RATIO_TARGET = 2.0
#: The issue's configurations: SmolLM2-135M on its own GGUF blocks and Qwen2.5-0.5B at MeSP's
#: setting (INT4 g64), fused AdamW, each under mebp and under optimal at its least budget.
DEFAULT_CONFIGS = ("smollm2-135m:gguf:mebp:fused,smollm2-135m:gguf:optimal:fused,"
                   "qwen2.5-0.5b:int4:mebp:fused,qwen2.5-0.5b:int4:optimal:fused")
#: --quick: the two models under mebp only (no least-budget solve).
QUICK_CONFIGS = "smollm2-135m:gguf:mebp:fused,qwen2.5-0.5b:int4:mebp:fused"

DESCRIPTION = f"""\
Each configuration MODEL:WEIGHTS:PLAN[:fused] (WEIGHTS fp32, int4 (INT4 group --group-size) or
gguf (the model's own GGUF Q4_1/Q8_0 blocks, decoded in the stages: smollm2-135m);
PLAN mebp with disk checkpoints, or optimal at the least budget the scheduler proves, AdamW
state reserved, iphone15promax cost model, offload on; ":fused": AdamW applied inside the
stages as each gradient is final, its moments step inputs and outputs) runs in its own fresh Python process
(MALLOC_MMAP_THRESHOLD_=65536, one thread), which compiles the step, exports it with
`--target mlx` (stages, manifest, weights.safetensors) and then alternates, --rounds times:
one eager torch step (model(**batch).loss.backward() + AdamW), one CPU-runtime step
(plan.step + AdamW) and one run of the native driver (`mebp-native`, its own process,
OMP_NUM_THREADS=1) of --steps steps. Batch 1, seq --seq-len, LoRA r=--lora-r on all 7
projections, seeded random token ids; SmolLM2 has its real weights, Qwen2.5 random ones
(memory and time do not depend on the values).

columns (MiB = 2^20 bytes, MB = 10^6 bytes):
  predicted held      the manifest's predicted peak (max over stages of held before the
                      stage + the stage's internal peak); frozen fp32 weights count, mapped
                      INT4 weights do not
  + AdamW             the same plus AdamW's two moments, which the driver holds (fused:
                      the moments are step inputs, already in predicted held)
  native held         the driver's staged peak (its own ledger; equal to predicted held)
  VmHWM               the native process's peak resident set (/proc/PID/status), all of it
  anon peak           the most anonymous resident memory (RssAnon) of the native process:
                      the larger of what the driver saw when each stage returned and what
                      this bench sampled from /proc/PID/status every ~1 ms (a stage's
                      transient peak can fall between samples: a lower bound)
  file peak           the most file-backed resident memory (RssFile) seen the same way:
                      the mapped weights file's touched pages, offload files, libraries
  native step         median over rounds of the native driver's median step (steps after
                      its first), seconds: stages, offload traffic, AdamW in C++
  / eager, / runtime  per round native step / that round's eager torch step and CPU-
                      runtime step (same process, alternating); median over rounds

Checks (non-zero exit): the driver's held bytes equal the manifest's in every run and its
losses are finite. Targets the issue sets (reported, not an exit status): native anonymous
RSS below 136 MB (Qwen2.5-0.5B, MeSP's figure) and 100 MB (SmolLM2-135M); native step at
most 2x eager torch.
"""


# --------------------------------------------------------------------------- the child


class StatusSampler:
    """Samples RssAnon / RssFile / VmHWM of another process from /proc/PID/status until it exits."""

    def __init__(self, pid: int, period_s: float = 0.001) -> None:
        self.pid, self.period_s = pid, period_s
        self.peaks: dict[str, int] = {}
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        path = f"/proc/{self.pid}/status"
        while True:
            try:
                with open(path) as f:
                    text = f.read()
            except OSError:
                return
            for line in text.splitlines():
                key, _, rest = line.partition(":")
                if key in ("RssAnon", "RssFile", "VmHWM") and rest.strip():
                    self.peaks[key] = max(self.peaks.get(key, 0), int(rest.split()[0]) * 1024)
            time.sleep(self.period_s)


def run_native(driver: pathlib.Path, directory: pathlib.Path, tokens: pathlib.Path, scratch: pathlib.Path,
               lr: float, fused: bool) -> dict:
    """One native run of every step in `tokens`: the driver's JSON line plus the sampled peaks.
    Fused artifacts carry their optimizer settings; otherwise the driver applies AdamW at `lr`."""
    command = [str(driver), str(directory), "--tokens", str(tokens), "--out", str(scratch / "lora.safetensors"),
               "--offload-dir", str(scratch / "flash")]
    if not fused:
        command += ["--optimizer", "adamw", "--lr", str(lr)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    sampler = StatusSampler(process.pid)
    out, err = process.communicate()
    sampler.thread.join()
    if process.returncode != 0:
        raise RuntimeError(f"mebp-native failed: {err.strip()}")
    report = json.loads(out.strip().splitlines()[-1])
    report["sampled"] = sampler.peaks
    return report


def build(args: argparse.Namespace, model_name: str, weights: str, plan_name: str, fused: bool,
          offload_dir: pathlib.Path):
    """(model, batch, plan, partition, budget) of one configuration, compiled here."""
    import torch

    import mebp_compiler
    from mebp_compiler.app import models
    from mebp_compiler.device import DeviceProfile
    from mebp_compiler.passes.fuse_update import OptimizerSettings
    from mebp_compiler.passes.partition import partition
    from mebp_compiler.passes.policies import least_feasible_budget
    from mebp_compiler.plan import optimizer_state_bytes

    torch.manual_seed(0)
    model = models.add_lora(models.load(model_name), models.LoraSettings(r=args.lora_r, alpha=2 * args.lora_r))
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq_len), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone()}
    offload_dir.mkdir(parents=True, exist_ok=True)
    gguf_file = models.gguf_file_of(model_name) if weights == "gguf" else None
    if weights == "gguf" and gguf_file is None:
        raise ValueError(f"{model_name} is not loaded from a GGUF file: WEIGHTS gguf needs smollm2-135m")
    options = dict(checkpoints="disk", offload_dir=str(offload_dir),
                   int4=weights in ("int4", "gguf"), group_size=args.group_size, head_chunks=args.head_chunks,
                   gguf_file=gguf_file, vocab_slices=args.vocab_slices, fuse_update=fused)
    plan = mebp_compiler.compile(model, batch, "mebp", **options)
    budget = None
    if plan_name == "optimal":
        device = DeviceProfile.load(args.device)
        # AdamW's moments are held beside the captured step (fused or not: they become step
        # inputs only in the exported stages), so the budget reserves them as compile does.
        budget = least_feasible_budget(plan.captured, device, work_limit=args.work_limit) \
            + optimizer_state_bytes(model, "adamw")
        plan = mebp_compiler.compile(model, batch, "optimal", budget=budget, device=device,
                                     work_limit=args.work_limit, **options)
    settings = OptimizerSettings(name="adamw", lr=args.lr) if fused else None
    return model, batch, plan, partition(plan.graph, model=model_name, target="mlx", optimizer=settings), budget


def run_config(args: argparse.Namespace) -> dict:
    """Compile, export and time one configuration in this (fresh) process; return its record."""
    import torch

    torch.set_num_threads(1)
    model_name, weights, plan_name, *fused = args.config.split(":")
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="mebp-native-bench-"))
    try:
        return measure(args, model_name, weights, plan_name, bool(fused), scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def measure(args: argparse.Namespace, model_name: str, weights: str, plan_name: str, fused: bool,
            scratch: pathlib.Path) -> dict:
    import torch

    from mebp_compiler.plan import optimizer_state_bytes
    from mebp_compiler.targets import load_target, native_driver
    from mebp_compiler.targets.artifacts import step_weights, write_artifacts
    from mebp_compiler.plan import make_optimizer

    start = time.perf_counter()
    model, batch, plan, part, budget = build(args, model_name, weights, plan_name, fused, scratch / "plan")
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    write_artifacts(part, load_target("mlx"), scratch / "artifacts", weights=step_weights(model, part, plan.weights),
                    progress=False)
    export_s = time.perf_counter() - start
    numpy_batch = {k: v.numpy() for k, v in batch.items()}
    tokens = native_driver.write_tokens(scratch / "tokens.bin", [numpy_batch] * args.steps)
    driver = native_driver.ensure_built()

    # Eager torch trains the float model, INT4 or not (the plan reads its own INT4 file); the
    # two share the LoRA parameters, each with its own AdamW (the values do not change the time).
    eager_optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], "adamw", args.lr)
    runtime_params = plan.lora_parameters()
    runtime_optimizer = make_optimizer(runtime_params.values(), "adamw", args.lr)

    def eager_step() -> float:
        t0 = time.perf_counter()
        model(**batch).loss.backward()
        eager_optimizer.step()
        eager_optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    def runtime_step() -> float:
        t0 = time.perf_counter()
        if fused:  # the step applies AdamW to each parameter itself
            plan.step(batch, runtime_optimizer)
            return time.perf_counter() - t0
        result = plan.step(batch)
        for name, param in runtime_params.items():
            param.grad = result.grads[name]
        runtime_optimizer.step()
        runtime_optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    eager_step(), runtime_step()  # warm-up
    rounds = []
    for _ in range(args.rounds):
        eager_s, runtime_s = eager_step(), runtime_step()
        native = run_native(driver, scratch / "artifacts", tokens, scratch, args.lr, fused)
        rounds.append({"eager_s": eager_s, "runtime_s": runtime_s, "native": native})
    manifest = part.manifest
    native_step = [statistics.median(r["native"]["step_seconds"][1:] or r["native"]["step_seconds"]) for r in rounds]
    last = rounds[-1]["native"]
    anon = max(max(r["native"]["rss_anon_peak_bytes"], r["native"]["sampled"].get("RssAnon", 0)) for r in rounds)
    file = max(max(r["native"]["rss_file_peak_bytes"], r["native"]["sampled"].get("RssFile", 0)) for r in rounds)
    return {
        "config": args.config, "model": model_name, "weights": weights, "plan": plan_name, "fused": fused,
        "budget_bytes": budget, "compile_s": compile_s, "export_s": export_s,
        "stages": len(manifest.stages), "artifacts": len(manifest.unique_artifacts()),
        "predicted_peak_bytes": manifest.predicted_peak_bytes, "plan_peak_bytes": manifest.plan_peak_bytes,
        "adamw_state_bytes": 0 if fused else optimizer_state_bytes(model, "adamw"),
        "weights_file_bytes": (scratch / "artifacts" / manifest.weights_file).stat().st_size,
        "mapped_bytes": sum(v.nbytes for v in manifest.values.values() if v.kind == "mapped"),
        "frozen_bytes": sum(v.nbytes for v in manifest.values.values() if v.kind == "frozen"),
        "held_as_predicted": all(r["native"]["held_before_bytes"] == [s.held_before_bytes for s in manifest.stages]
                                 and r["native"]["staged_peak_bytes"] == manifest.predicted_peak_bytes
                                 for r in rounds),
        "native_staged_peak_bytes": last["staged_peak_bytes"],
        "vm_hwm_bytes": max(r["native"]["vm_hwm_bytes"] for r in rounds),
        "rss_anon_peak_bytes": anon, "rss_file_peak_bytes": file,
        "flash_bytes_written_per_step": last["flash_bytes_written"] // args.steps,
        "native_step_s": statistics.median(native_step),
        "eager_step_s": statistics.median(r["eager_s"] for r in rounds),
        "runtime_step_s": statistics.median(r["runtime_s"] for r in rounds),
        "native_over_eager": statistics.median(n / r["eager_s"] for n, r in zip(native_step, rounds)),
        "native_over_runtime": statistics.median(n / r["runtime_s"] for n, r in zip(native_step, rounds)),
        "native_seconds_by_stage_kind": seconds_by_kind(manifest, last),
        "mlx_peak_by_stage_kind": peak_by_kind(manifest, last.get("stage_mlx_peak_bytes", [])),
        "predicted_stage_peak_by_kind": peak_by_kind(
            manifest, [s.held_before_bytes + s.internal_peak_bytes for s in manifest.stages]),
        "mlx_peak_bytes": last.get("mlx_peak_bytes"), "mlx_cache_bytes": last.get("mlx_cache_bytes"),
        "losses": last["losses"],
        "rounds": rounds,
    }


def seconds_by_kind(manifest, native: dict) -> dict[str, float]:
    """The native run's last step, in seconds per stage kind (embed, block forward, ...); the rest
    of the step (AdamW over the LoRA parameters, the gradients' copies) as "optimizer and rest"."""
    by_kind: dict[str, float] = {}
    for stage, seconds in zip(manifest.stages, native.get("stage_seconds", [])):
        by_kind[stage.kind] = by_kind.get(stage.kind, 0.0) + seconds
    if by_kind:
        by_kind["optimizer and rest"] = native["step_seconds"][-1] - sum(by_kind.values())
    return by_kind


def peak_by_kind(manifest, per_stage: list[int]) -> dict[str, int]:
    """The largest of `per_stage` (bytes, one per manifest stage) per stage kind."""
    peaks: dict[str, int] = {}
    for stage, nbytes in zip(manifest.stages, per_stage):
        peaks[stage.kind] = max(peaks.get(stage.kind, 0), nbytes)
    return peaks


# --------------------------------------------------------------------------- the parent


def mib(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / MIB:.1f}"


def build_table(records: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"Native driver, seq {args.seq_len}, batch 1, LoRA r={args.lora_r} (all 7 projections), AdamW applied by "
        f"the driver after the step or (fused) by the stages; INT4 group {args.group_size}; head in {args.vocab_slices} vocabulary slices"
        f"{f', {args.head_chunks} sequence chunks' if args.head_chunks else ''} (MiB; MB = 10^6 bytes):",
        "",
        "| model | weights | plan | predicted held | + AdamW | native held | VmHWM | anon peak | file peak | "
        "target (anon) | native step | / eager | / runtime | published |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for r in records:
        target = RSS_TARGETS.get(r["model"])
        verdict = "-" if target is None else (
            f"< {target / MB:.0f} MB: met" if r["rss_anon_peak_bytes"] < target
            else f"< {target / MB:.0f} MB: missed by {(r['rss_anon_peak_bytes'] - target) / MB:.0f} MB")
        published = "; ".join(f"{k} {v}" for k, v in PUBLISHED.get(r["model"], {}).items()) or "none"
        plan = r["plan"] if r["budget_bytes"] is None else f"optimal@least ({mib(r['budget_bytes'])})"
        plan += ", fused AdamW" if r.get("fused") else ""
        lines.append(
            f"| {r['model']} | {r['weights']} | {plan} | {mib(r['predicted_peak_bytes'])} | "
            f"{mib(r['predicted_peak_bytes'] + r['adamw_state_bytes'])} | {mib(r['native_staged_peak_bytes'])} | "
            f"{mib(r['vm_hwm_bytes'])} | {mib(r['rss_anon_peak_bytes'])} | {mib(r['rss_file_peak_bytes'])} | "
            f"{verdict} | {r['native_step_s']:.2f} s | {r['native_over_eager']:.2f}x | "
            f"{r['native_over_runtime']:.2f}x | {published} |")
    kinds = sorted({k for r in records for k in r.get("native_seconds_by_stage_kind", {})})
    if kinds:
        lines += ["", "Where the native step's seconds go (last step of the last run, seconds; MLX's own "
                  "allocator peak beside the anonymous RSS):", "",
                  "| model | weights | plan | " + " | ".join(kinds) + " | MLX allocator peak (MiB) |",
                  "|---|---|---|" + "---:|" * (len(kinds) + 1)]
        for r in records:
            by_kind = r.get("native_seconds_by_stage_kind", {})
            lines.append(f"| {r['model']} | {r['weights']} | {r['plan']} | "
                         + " | ".join(f"{by_kind[k]:.2f}" if k in by_kind else "-" for k in kinds)
                         + f" | {mib(r.get('mlx_peak_bytes'))} |")
    if any(r.get("mlx_peak_by_stage_kind") for r in records):
        lines += ["", "MLX's allocator peak per stage kind against the plan's (held before the stage + its "
                  "internal peak), the largest stage of each kind, MiB (mapped INT4 weights count in neither):", "",
                  "| model | plan | " + " | ".join(kinds) + " |", "|---|---|" + "---:|" * len(kinds)]
        for r in records:
            mlx, plan = r.get("mlx_peak_by_stage_kind", {}), r.get("predicted_stage_peak_by_kind", {})
            lines.append(f"| {r['model']} | {r['config'].split(':', 2)[2]} | " + " | ".join(
                f"{mib(mlx[k])} / {mib(plan[k])}" if k in mlx else "-" for k in kinds) + " |")
    return "\n".join(lines)


def write_results(records: list[dict], failures: list[str], args: argparse.Namespace, argv: list[str]) -> str:
    """The table (markdown, with the command line) and every number (JSON) in --out; returns the table."""
    command_line = "bench/native.py " + shlex.join(argv)
    table = build_table(records, args) + f"\n\nCommand: `{command_line}`\n"
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"native-seq{args.seq_len}-r{args.lora_r}-slices{args.vocab_slices}"
    (out / f"{stem}.md").write_text(table)
    (out / f"{stem}.json").write_text(json.dumps({"command": command_line, "records": records,
                                                  "failures": failures}, indent=2))
    return table


def run_all(args: argparse.Namespace, argv: list[str]) -> int:
    records, failures = [], []
    for config in args.configs.split(","):
        print(f"[bench] {config} ...", file=sys.stderr, flush=True)
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
            result_file = handle.name
        command = [sys.executable, __file__, "--child", config, "--result-file", result_file, *argv]
        done = subprocess.run(command, env={**os.environ, **CHILD_ENV}, text=True, capture_output=True)
        if done.returncode != 0:
            failures.append(f"{config}: exit {done.returncode}: {done.stderr[-3000:]}")
            continue
        record = json.loads(pathlib.Path(result_file).read_text())
        os.unlink(result_file)
        records.append(record)
        print(f"[bench] {config}: anon {mib(record['rss_anon_peak_bytes'])} MiB, step {record['native_step_s']:.2f} s "
              f"({record['native_over_eager']:.2f}x eager)", file=sys.stderr, flush=True)
        if not record["held_as_predicted"]:
            failures.append(f"{config}: the driver's held bytes differ from the manifest's")
        if not all(isinstance(x, float) and x == x and abs(x) != float("inf") for x in record["losses"]):
            failures.append(f"{config}: non-finite loss {record['losses']}")
        write_results(records, failures, args, argv)  # so far: a long run keeps what it measured
    print(write_results(records, failures, args, argv))
    for failure in failures:
        print(f"[bench] FAILED {failure}", file=sys.stderr)
    return 1 if failures else 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    from mebp_compiler.passes.scheduler.solver import DEFAULT_WORK_LIMIT

    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", help=f"comma-separated MODEL:fp32|int4|gguf:mebp|optimal[:fused] (default "
                        f"{DEFAULT_CONFIGS}; with --quick {QUICK_CONFIGS})")
    parser.add_argument("--quick", action="store_true",
                        help="one round of one native run, and the --quick configurations unless --configs says")
    parser.add_argument("--seq-len", type=int, default=256, help="sequence length (batch is 1)")
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank, alpha = 2r (default 8, MeSP's)")
    parser.add_argument("--group-size", type=int, default=64, help="INT4 group size (default 64, MeSP's)")
    parser.add_argument("--vocab-slices", type=int, default=64,
                        help="LM head + loss over this many vocabulary slices (default 64; 0: whole)")
    parser.add_argument("--head-chunks", type=int, default=0, help="LM head + loss in this many sequence chunks")
    parser.add_argument("--device", default="iphone15promax", help="device profile for the optimal plans")
    parser.add_argument("--work-limit", type=float, default=DEFAULT_WORK_LIMIT,
                        help="scheduler limit per solve, CP-SAT deterministic time")
    parser.add_argument("--steps", type=int, default=3, help="steps per native run (the first is not timed)")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of eager, runtime and native")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate, all three")
    parser.add_argument("--out", default="bench/results", help="folder for the .md and .json")
    parser.add_argument("--child", metavar="CONFIG", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.configs = args.configs or (QUICK_CONFIGS if args.quick else DEFAULT_CONFIGS)
    if args.quick:
        args.rounds = 1
    for config in args.configs.split(","):
        parts = config.split(":")
        if (len(parts) not in (3, 4) or parts[1] not in ("fp32", "int4", "gguf") or parts[2] not in ("mebp", "optimal")
                or parts[3:] not in ([], ["fused"])):
            parser.error(f"--configs: {config!r} is not MODEL:fp32|int4|gguf:mebp|optimal[:fused]")
    args.config = args.child
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child:
        pathlib.Path(args.result_file).write_text(json.dumps(run_config(args)))
        return 0
    return run_all(args, argv)


if __name__ == "__main__":
    sys.exit(main())
