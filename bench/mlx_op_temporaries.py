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
import os
import pathlib
import sys
import tempfile

os.environ.setdefault("MLX_BFS_MAX_WIDTH", "1")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

MIB = 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-0.5b")
    parser.add_argument("--kind", default="block_backward")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    import mlx.core as mx

    import native
    from mebp_compiler.targets import fx_stage
    from mebp_compiler.targets import mlx as target

    settings = native.parse_args(["--configs", f"{args.model}:int4:mebp:fused"])
    with tempfile.TemporaryDirectory(prefix="mebp-op-temporaries-") as scratch:
        _, _, _, part, _ = native.build(settings, args.model, "int4", "mebp", True, pathlib.Path(scratch))
    mx.set_cache_limit(0)
    stage = [s for s in part.stages if s.spec.kind == args.kind][-1]
    inputs = [target._to_mx(x) for x in stage.example_inputs(part.manifest.values)]
    mx.eval(inputs)
    module = stage.module
    nodes = [n for n in module.graph.nodes if n.op != "output"]
    last_use = {a: k for k, n in enumerate(nodes) for a in n.all_input_nodes}
    env, placeholders, rows = {}, iter(inputs), []
    base = mx.get_active_memory()
    limit = mx.set_memory_limit(1)
    for k, node in enumerate(nodes):
        if node.op == "placeholder":
            env[node] = next(placeholders)
            continue
        if node.op == "get_attr":
            value = module
            for name in node.target.split("."):
                value = getattr(value, name)
            env[node] = target._to_mx(value)
        elif fx_stage.is_getitem(node):
            env[node] = env[node.args[0]][node.args[1]]
        else:
            before = mx.get_active_memory()
            mx.reset_peak_memory()
            ctx = fx_stage.op_context(node)
            env[node] = target._finish(ctx, target.RULES[node.target](ctx, **fx_stage.schema_kwargs(node, env.__getitem__)))
            mx.eval(env[node])
            output = env[node].nbytes if isinstance(env[node], mx.array) else 0
            peak = mx.get_peak_memory()
            rows.append((peak - before - output, peak - base, output, node.name, str(node.target)))
        for a in node.all_input_nodes:
            if last_use.get(a) == k and a.op != "placeholder":
                del env[a]
    mx.set_memory_limit(limit)
    print(f"{stage.spec.name}: plan internal peak {stage.spec.internal_peak_bytes / MIB:.1f} MiB, op by op "
          f"{max(r[1] for r in rows) / MIB:.1f} MiB above the inputs")
    print("| op | target | temp | above inputs | output |\n|---|---|---:|---:|---:|")
    for temp, above, output, name, op in sorted(rows, reverse=True)[:args.top]:
        print(f"| {name} | {op} | {temp / MIB:.2f} | {above / MIB:.2f} | {output / MIB:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
