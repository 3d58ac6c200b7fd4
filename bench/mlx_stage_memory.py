#!/usr/bin/env python
"""MLX's bytes of arrays inside one exported stage of each kind, against the plan's internal peak.

    python bench/mlx_stage_memory.py [--model smollm2-135m] [--kinds block_forward,block_backward]

Compiles the model as bench/native.py does (INT4 g64, 64 vocabulary slices, `mebp` with disk
checkpoints, fused AdamW, seq 256), takes the first stage of each kind from the partition, and
runs its MLX translation (`targets.mlx.stage_function`, what the export traces) on zero inputs,
with MLX's buffer cache off and MLX_BFS_MAX_WIDTH=1 (the native driver's settings). Prints the
peak of MLX's arrays above the stage's inputs (MiB, `mx.get_peak_memory`) with no memory limit,
with the limit at the stage's planned internal peak (what `mebp-native` sets per stage), with a
limit of 0 (every kernel waited for), and op by op (each ATen op evaluated alone, each value
freed after its last use: the plan's model plus MLX's temporaries inside each op), beside the
seconds of each lazy run (one run each: not a timing comparison on a loaded machine).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

MIB = 2**20


def lazy_peak(function, inputs, limit_above: int | None) -> tuple[int, float]:
    """(peak bytes of arrays above `inputs`, seconds) of one lazy run under a memory limit."""
    import mlx.core as mx

    base = mx.get_active_memory()
    mx.set_memory_limit(2**40 if limit_above is None else max(base + limit_above, 1))
    mx.reset_peak_memory()
    started = time.perf_counter()
    outputs = function(*inputs)
    mx.eval(outputs)
    seconds = time.perf_counter() - started
    peak = mx.get_peak_memory() - base
    del outputs
    mx.set_memory_limit(2**40)
    return peak, seconds


def op_by_op_peak(module, inputs) -> int:
    """Peak bytes of arrays above `inputs` when each op is evaluated alone and freed after its last use."""
    import mlx_interpret  # first: it sets MLX_BFS_MAX_WIDTH before MLX is loaded

    import mlx.core as mx

    base = mx.get_active_memory()
    mx.reset_peak_memory()
    for _, evaluate in mlx_interpret.each_op(module, inputs):
        evaluate()
    return mx.get_peak_memory() - base


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--kinds", default="block_forward,block_backward,head_forward,head_backward")
    args = parser.parse_args(argv)

    import mlx_interpret  # first: it sets MLX_BFS_MAX_WIDTH before MLX is loaded

    from mebp_compiler.targets import mlx as target

    part = mlx_interpret.build_partition(args.model, "mebp-stage-memory-")
    print("| stage | plan (internal peak) | no limit | limit at plan | limit 0 | op by op, freed at last use |")
    print("|---|---:|---:|---:|---:|---:|")
    kinds = args.kinds.split(",")
    for kind in kinds:
        stage = next(s for s in part.stages if s.spec.kind == kind)
        inputs = mlx_interpret.stage_inputs(stage, part.manifest.values)
        function = target.stage_function(stage.module)
        planned = stage.spec.internal_peak_bytes
        runs = [lazy_peak(function, inputs, limit) for limit in (None, planned, 0)]
        op_by_op = op_by_op_peak(stage.module, inputs)
        print(f"| {stage.spec.name} | {planned / MIB:.1f} | "
              + " | ".join(f"{peak / MIB:.1f} ({seconds:.2f} s)" for peak, seconds in runs)
              + f" | {op_by_op / MIB:.1f} |", flush=True)
        del inputs
    return 0


if __name__ == "__main__":
    sys.exit(main())
