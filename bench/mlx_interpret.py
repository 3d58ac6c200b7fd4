"""An exported stage's MLX translation, built and walked op by op: shared by the bench/mlx_*.py scripts.

`build_partition` compiles a model as bench/native.py does (INT4 g64, 64 vocabulary slices,
`mebp` with disk checkpoints, fused AdamW, seq 256); `each_op` evaluates a stage's ATen ops one
at a time with the MLX target's own rules (`targets.mlx.RULES` and `_finish`, what
`stage_function` traces), each value freed after its last use, and hands each op to the caller
to measure. Importing this module sets MLX_BFS_MAX_WIDTH=1 (the native driver's setting) unless
the environment already sets it, so import it before anything imports MLX.
"""

from __future__ import annotations

import functools
import os
import pathlib
import tempfile
from typing import Any, Callable, Iterator, Sequence

os.environ.setdefault("MLX_BFS_MAX_WIDTH", "1")

import mlx.core as mx  # noqa: E402
import torch  # noqa: E402
from torch import fx  # noqa: E402

import native  # noqa: E402
from mebp_compiler.passes.partition import Partition, Stage, ValueSpec  # noqa: E402
from mebp_compiler.targets import fx_stage  # noqa: E402
from mebp_compiler.targets import mlx as target  # noqa: E402
from mebp_compiler.targets.fx_stage import OpContext  # noqa: E402


def build_partition(model: str, scratch_prefix: str) -> Partition:
    """`model`'s MLX partition as bench/native.py builds `MODEL:int4:mebp:fused`, on one torch
    thread, its disk checkpoints in a temporary folder whose name starts with `scratch_prefix`;
    MLX's buffer cache is off afterwards (`mx.set_cache_limit(0)`, the native driver's setting)."""
    torch.set_num_threads(1)
    settings = native.parse_args(["--configs", f"{model}:int4:mebp:fused"])
    with tempfile.TemporaryDirectory(prefix=scratch_prefix) as scratch:
        _, _, _, part, _ = native.build(settings, model, "int4", "mebp", True, pathlib.Path(scratch))
    mx.set_cache_limit(0)
    return part


def stage_inputs(stage: Stage, values: dict[str, ValueSpec], random: bool = False) -> list[mx.array]:
    """The stage's inputs as evaluated MLX arrays: zeros of their shapes and dtypes, or with
    `random` every floating input drawn from a normal of std 0.5 (torch, seed 0; integer inputs
    stay zero)."""
    generator = torch.Generator().manual_seed(0)
    inputs = []
    for x in stage.example_inputs(values):
        if random and x.is_floating_point():
            x = torch.randn(x.shape, generator=generator, dtype=x.dtype) * 0.5
        inputs.append(target._to_mx(x))
    mx.eval(inputs)
    return inputs


def each_op(module: fx.GraphModule, inputs: Sequence[mx.array]) -> Iterator[tuple[fx.Node, Callable[[], Any]]]:
    """(node, evaluate) for each ATen op of the stage `module`, in graph order, over `inputs`.

    `evaluate()` runs the op's MLX translation on its arguments' values, evaluates it
    (`mx.eval`) and returns it; call it at least once per op (the last result becomes the op's
    value) and keep no reference to the result past the op, so that, as here, every value is
    freed after its last use (the stage's inputs stay with the caller). Placeholders, constants
    (`get_attr`) and tuple items are taken without being handed out."""
    nodes = [n for n in module.graph.nodes if n.op != "output"]
    last_use = {a: k for k, n in enumerate(nodes) for a in n.all_input_nodes}
    env: dict[fx.Node, Any] = {}
    placeholders = iter(inputs)
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
            results: list[Any] = []
            kwargs = fx_stage.schema_kwargs(node, env.__getitem__)
            yield node, functools.partial(_evaluate, fx_stage.op_context(node), target.RULES[node.target], kwargs,
                                          results)
            if not results:
                raise RuntimeError(f"{node.name} ({node.target}) was handed out but never evaluated")
            env[node] = results.pop()
        for a in node.all_input_nodes:
            if last_use.get(a) == k and a.op != "placeholder":
                del env[a]


def _evaluate(ctx: OpContext, rule: Callable, kwargs: dict[str, Any], results: list[Any]) -> Any:
    value = target._finish(ctx, rule(ctx, **kwargs))
    mx.eval(value)
    results[:] = [value]
    return value
