#!/usr/bin/env python
"""MLX's temporaries inside each op of one exported stage, largest first.

    python bench/mlx_op_temporaries.py [--model qwen2.5-0.5b] [--kind block_backward]

Compiles the model as bench/native.py does (INT4 g64, 64 vocabulary slices, `mebp` with disk
checkpoints, fused AdamW, seq 256), takes the last stage of the kind and evaluates its MLX
translation op by op on zero inputs (MLX_BFS_MAX_WIDTH=1, no buffer cache, a memory limit of
1 byte, so MLX waits for every kernel, as the native driver past its per-stage limit), each
value freed after its last use. Per op, MiB: `temp` = MLX's peak during the op above what was
live before it and the op's output; `above inputs` = that peak above the stage's inputs.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

MIB = 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-0.5b")
    parser.add_argument("--kind", default="block_backward")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)

    import mlx_interpret  # first: it sets MLX_BFS_MAX_WIDTH before MLX is loaded

    import mlx.core as mx

    part = mlx_interpret.build_partition(args.model, "mebp-op-temporaries-")
    stage = [s for s in part.stages if s.spec.kind == args.kind][-1]
    inputs = mlx_interpret.stage_inputs(stage, part.manifest.values)
    rows = []
    base = mx.get_active_memory()
    limit = mx.set_memory_limit(1)
    for node, evaluate in mlx_interpret.each_op(stage.module, inputs):
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        value = evaluate()
        output = value.nbytes if isinstance(value, mx.array) else 0
        del value
        peak = mx.get_peak_memory()
        rows.append((peak - before - output, peak - base, output, node.name, str(node.target)))
    mx.set_memory_limit(limit)
    print(f"{stage.spec.name}: plan internal peak {stage.spec.internal_peak_bytes / MIB:.1f} MiB, op by op "
          f"{max(r[1] for r in rows) / MIB:.1f} MiB above the inputs")
    print("| op | target | temp | above inputs | output |\n|---|---|---:|---:|---:|")
    for temp, above, output, name, op in sorted(rows, reverse=True)[:args.top]:
        print(f"| {name} | {op} | {temp / MIB:.2f} | {above / MIB:.2f} | {output / MIB:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
