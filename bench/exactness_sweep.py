#!/usr/bin/env python
"""The randomized exactness sweep over many seeds: each tiny configuration exact vs autograd, held = predicted.

    python bench/exactness_sweep.py [--seeds 100] [--first 0] [--out docs/exactness-sweep.md]

Runs `tests.sweep.run_case(make_case(seed))` for each seed (tests/sweep.py says what a case
draws and checks), counts failures without stopping, and writes a Markdown report with the
command, the machine, each case's configuration and result, and a summary. A failing seed
reproduces with `python -c "from tests.sweep import *; run_case(make_case(SEED))"`.
The fast subset of these seeds runs in CI (tests/test_sweep.py). Exit code 1 if a case failed.
"""

from __future__ import annotations

import argparse
import pathlib
import platform
import sys
import time
import warnings

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from mebp_compiler.files import atomic_write_text  # noqa: E402
from tests.conftest import cpu_model  # noqa: E402
from tests.sweep import make_case, run_case  # noqa: E402


def flags(case) -> str:
    """The options of a case that differ from a plain step, as a short list."""
    on = [name for name in ("head_chunks", "vocab_slices", "mlp_chunks") if getattr(case, name)]
    on = [f"{name.split('_')[0]}x{getattr(case, name)}" for name in on]
    on += ["int4"] * case.int4 + ["fused"] * case.fuse_update + ["lora-head"] * ("lm_head" in case.lora_targets)
    return " ".join(on) or "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=100, help="how many seeds (default: %(default)s)")
    parser.add_argument("--first", type=int, default=0, help="first seed (default: %(default)s)")
    parser.add_argument("--out", default="docs/exactness-sweep.md", help="report (default: %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    rows, failures = [], []
    start = time.perf_counter()
    for seed in range(args.first, args.first + args.seeds):
        case = make_case(seed)
        t = time.perf_counter()
        try:
            result = run_case(case)
            outcome = (f"ok | {result.grad_error:.1e} | {result.loss_error:.1e} | {result.held_peak_bytes} | "
                       f"{result.held_drift_bytes}")
        except Exception as exc:  # a failing case is recorded, the sweep goes on
            message = " ".join(str(exc).split())[:200].replace("|", "/")
            outcome = f"**FAIL** {type(exc).__name__}: {message} | | | |"
            failures.append(seed)
        seconds = time.perf_counter() - t
        padding = case.padding if case.padding == "none" else f"{case.padding}-pad"
        policy = case.policy + (f" {case.checkpoints}" if case.policy == "mebp" else "")
        policy += f" @{case.budget_fraction:.2f}" if case.policy == "optimal" else ""
        rows.append(f"| {seed} | {case.model} | {case.layers} | {case.heads}/{case.kv_heads}x{case.head_dim} | "
                    f"{case.intermediate} | {case.vocab} | {case.batch}x{case.seq} | {padding} | "
                    f"r{case.lora_r} {len(case.lora_targets)} | {policy} | {flags(case)} | {outcome} | "
                    f"{seconds:.1f} |")
        print(rows[-1], flush=True)
    total = time.perf_counter() - start
    command = " ".join(["python", "bench/exactness_sweep.py", *sys.argv[1:]])
    summary = (f"{args.seeds - len(failures)} of {args.seeds} cases passed"
               + (f"; failed seeds: {', '.join(map(str, failures))}" if failures else "") + f", in {total:.0f} s.")
    report = "\n".join([
        "# Randomized exactness sweep",
        "",
        "Each seed draws one tiny configuration (tests/sweep.py) and runs one compiled step. A case passes",
        "when its loss and every LoRA gradient equal eager autograd's on the same weights (on the",
        "dequantized weights under INT4) within the project's tolerance - max gradient difference",
        "<= 1e-5 x the largest gradient, loss within 1e-5 x max(1, loss) (tests/conftest.py) - and the",
        "bytes the CPU runtime held after every op equal liveness' prediction exactly; an optimal",
        "plan's predicted peak plus SGD's (empty) state must also fit its budget, drawn between the",
        "least feasible budget (@0) and MeBP's peak (@1).",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {cpu_model()} ({platform.machine()}), torch {torch.__version__}, 1 thread.",
        "",
        f"**Result: {summary}**",
        "",
        "Times (last column) are wall-clock seconds per case under whatever load the machine had.",
        "",
        "Columns: layers; heads/kv heads x head dim; MLP width; vocabulary; batch x sequence; padding",
        "(through attention_mask); LoRA rank and number of target modules; policy (optimal: where its",
        "budget lies); options; worst gradient difference over the largest gradient and loss difference",
        "over max(1, loss), both to hold at or below 1e-5; held peak bytes; largest |held - predicted|.",
        "",
        "| seed | model | layers | heads | mlp | vocab | tokens | padding | lora | policy | options | result | "
        "grad err | loss err | held peak B | drift B | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ])
    out = pathlib.Path(args.out)
    atomic_write_text(out, report)
    print(summary)
    print(f"wrote {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
