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
import tempfile
import time

os.environ.setdefault("MLX_BFS_MAX_WIDTH", "1")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))


def op_seconds(module, inputs, runs: int) -> dict[str, float]:
    """Seconds per op kind of `module`'s ops evaluated one by one (best of `runs` per op)."""
    import mlx.core as mx

    from mebp_compiler.targets import fx_stage
    from mebp_compiler.targets import mlx as target

    nodes = [n for n in module.graph.nodes if n.op != "output"]
    last_use = {a: k for k, n in enumerate(nodes) for a in n.all_input_nodes}
    env, placeholders = {}, iter(inputs)
    seconds: dict[str, float] = collections.defaultdict(float)
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
            kwargs = fx_stage.schema_kwargs(node, env.__getitem__)
            best = float("inf")
            for _ in range(runs):
                started = time.perf_counter()
                value = target._finish(ctx, target.RULES[node.target](ctx, **kwargs))
                mx.eval(value)
                best = min(best, time.perf_counter() - started)
            env[node] = value
            seconds[fx_stage.rule_name(node.target)] += best
        for a in node.all_input_nodes:
            if last_use.get(a) == k and a.op != "placeholder":
                del env[a]
    env.clear()
    return dict(seconds)


def random_inputs(stage, values):
    import mlx.core as mx
    import torch

    from mebp_compiler.targets import mlx as target

    generator = torch.Generator().manual_seed(0)
    inputs = []
    for x in stage.example_inputs(values):
        if x.is_floating_point():
            x = torch.randn(x.shape, generator=generator, dtype=x.dtype) * 0.5
        inputs.append(target._to_mx(x))
    mx.eval(inputs)
    return inputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--kinds", default="block_forward,block_backward,head_forward,head_backward")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    import mlx.core as mx

    import native
    from mebp_compiler.targets import mlx as target

    with open("/proc/self/maps") as maps:
        blas = "OpenBLAS (preloaded)" if "scipy_openblas" in maps.read() else "the mlx wheel's reference BLAS"
    print(f"MLX matmuls on {blas}; one thread, load {os.getloadavg()[0]:.1f}")
    settings = native.parse_args(["--configs", f"{args.model}:int4:mebp:fused"])
    with tempfile.TemporaryDirectory(prefix="mebp-stage-ops-") as scratch:
        _, _, _, part, _ = native.build(settings, args.model, "int4", "mebp", True, pathlib.Path(scratch))
    mx.set_cache_limit(0)
    for kind in args.kinds.split(","):
        stage = next(s for s in part.stages if s.spec.kind == kind)
        inputs = random_inputs(stage, part.manifest.values)
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
