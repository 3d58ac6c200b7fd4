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
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("MLX_BFS_MAX_WIDTH", "1")
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
    import mlx.core as mx

    from mebp_compiler.targets import fx_stage
    from mebp_compiler.targets import mlx as target

    nodes = [n for n in module.graph.nodes if n.op != "output"]
    last_use = {a: k for k, n in enumerate(nodes) for a in n.all_input_nodes}
    env, placeholders = {}, iter(inputs)
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    for k, node in enumerate(nodes):
        if node.op == "placeholder":
            env[node] = next(placeholders)
            continue
        if node.op == "get_attr":
            value = module
            for part in node.target.split("."):
                value = getattr(value, part)
            env[node] = target._to_mx(value)
        elif fx_stage.is_getitem(node):
            env[node] = env[node.args[0]][node.args[1]]
        else:
            ctx = fx_stage.op_context(node)
            env[node] = target._finish(ctx, target.RULES[node.target](ctx, **fx_stage.schema_kwargs(node, env.__getitem__)))
            mx.eval(env[node])
        for a in node.all_input_nodes:
            if last_use.get(a) == k and a.op != "placeholder":
                del env[a]
    peak = mx.get_peak_memory() - base
    env.clear()
    return peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--kinds", default="block_forward,block_backward,head_forward,head_backward")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    import mlx.core as mx

    import native
    from mebp_compiler.targets import mlx as target

    settings = native.parse_args(["--configs", f"{args.model}:int4:mebp:fused"])
    with tempfile.TemporaryDirectory(prefix="mebp-stage-memory-") as scratch:
        _, _, _, part, _ = native.build(settings, args.model, "int4", "mebp", True, pathlib.Path(scratch))
    mx.set_cache_limit(0)
    print("| stage | plan (internal peak) | no limit | limit at plan | limit 0 | op by op, freed at last use |")
    print("|---|---:|---:|---:|---:|---:|")
    kinds = args.kinds.split(",")
    for kind in kinds:
        stage = next(s for s in part.stages if s.spec.kind == kind)
        inputs = [target._to_mx(x) for x in stage.example_inputs(part.manifest.values)]
        mx.eval(inputs)
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
