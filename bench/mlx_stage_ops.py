#!/usr/bin/env python
"""Where an exported stage's seconds go in MLX, per ATen op kind, one thread.

    LD_PRELOAD=/tmp/libmebpblas.so python bench/mlx_stage_ops.py [--model smollm2-135m] [--kinds ...]

(the preload binds MLX's matmuls to OpenBLAS as in `mebp-native`; bench/mlx_ops.py's docstring
builds the library). Compiles the model as bench/native.py does (INT4 g64, 64 vocabulary
slices, `mebp` with disk checkpoints, fused AdamW, seq 256), takes the first stage of each kind
from the partition and runs its MLX translation (`targets.mlx.rule`s, what the export traces)
on random normal inputs (integer inputs: zeros), each ATen op evaluated alone (`mx.eval`) and
timed, best of --runs. Prints, per stage, the milliseconds of each op kind (summed over the
stage's ops of that kind), its share of the op-by-op total, and the lazy run of the whole stage
function in the plan's op order (what `mebp-native` runs) beside it.
"""

from __future__ import annotations

import argparse
import collections
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))


def op_seconds(module, inputs, runs: int) -> dict[str, float]:
    """Seconds per op kind of `module`'s ops evaluated one by one (best of `runs` per op)."""
    import mlx_interpret  # first: it sets MLX_BFS_MAX_WIDTH before MLX is loaded

    from mebp_compiler.targets import fx_stage

    seconds: dict[str, float] = collections.defaultdict(float)
    for node, evaluate in mlx_interpret.each_op(module, inputs):
        best = float("inf")
        for _ in range(runs):
            started = time.perf_counter()
            evaluate()
            best = min(best, time.perf_counter() - started)
        seconds[fx_stage.rule_name(node.target)] += best
    return dict(seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--kinds", default="block_forward,block_backward,head_forward,head_backward")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)

    import mlx_interpret  # first: it sets MLX_BFS_MAX_WIDTH before MLX is loaded

    import mlx.core as mx

    from mebp_compiler.targets import mlx as target

    with open("/proc/self/maps") as maps:
        blas = "OpenBLAS (preloaded)" if "scipy_openblas" in maps.read() else "the mlx wheel's reference BLAS"
    print(f"MLX matmuls on {blas}; one thread, load {os.getloadavg()[0]:.1f}")
    part = mlx_interpret.build_partition(args.model, "mebp-stage-ops-")
    for kind in args.kinds.split(","):
        stage = next(s for s in part.stages if s.spec.kind == kind)
        inputs = mlx_interpret.stage_inputs(stage, part.manifest.values, random=True)
        function = target.stage_function(stage.module)
        lazy = float("inf")
        for _ in range(args.runs):
            started = time.perf_counter()
            mx.eval(function(*inputs))
            lazy = min(lazy, time.perf_counter() - started)
        by_kind = op_seconds(stage.module, inputs, args.runs)
        total = sum(by_kind.values())
        print(f"\n{stage.spec.name}: lazy run {lazy * 1e3:.1f} ms, op by op {total * 1e3:.1f} ms\n")
        print("| op | ms | share |\n|---|---:|---:|")
        for name, s in sorted(by_kind.items(), key=lambda item: -item[1]):
            if s / total >= 0.005:
                print(f"| {name} | {s * 1e3:.2f} | {100 * s / total:.1f}% |", flush=True)
        del inputs
    return 0


if __name__ == "__main__":
    sys.exit(main())
