"""What the stage exporters share: reading a stage graph, its signature and its op arguments.

A *stage* is a `torch.fx.GraphModule` over ATen ops (as `mebp_compiler.capture` traces
them, without decomposition) whose placeholders are the stage inputs and whose output is
a tuple of stage outputs. Exporters walk its nodes in order and translate each op; this
module gives them each node's output shape and dtype (from the trace's fake tensors, or
propagated from example inputs when a stage lacks them), each op's arguments by schema
name with defaults filled in, and the stage's input/output signature.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.fx.operator_schemas import normalize_function
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch._subclasses.fake_tensor import FakeTensorMode


class UnsupportedStageOpError(NotImplementedError):
    """A stage contains an op the target cannot translate; the message names it."""

    def __init__(self, target: str, op: str, node: fx.Node, supported: Sequence[str]) -> None:
        super().__init__(
            f"the {target} target cannot translate op {op} (node '{node.name}'). It translates: "
            f"{', '.join(sorted(supported))}. Add a translation to targets/{target}.py or keep this "
            "op out of the stage."
        )
        self.op = op
        self.node = node.name


class StageError(ValueError):
    """The stage or its example inputs are malformed; the message says what to change."""


@dataclass(frozen=True)
class TensorSig:
    """Name, shape and dtype of one stage input or output."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


def op_name(node: fx.Node) -> str:
    """The qualified name of a node's op, e.g. 'aten.add.Tensor', as error messages show it."""
    return rule_name(node.target)


def ensure_values(stage: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> None:
    """Give every node a `meta['val']` (fake tensor) for its output shape and dtype.

    Captured graphs already carry them; a stage built without them gets them by fake
    propagation of `example_inputs` (shapes and dtypes only, no compute).
    """
    placeholders = stage_placeholders(stage)
    if len(placeholders) != len(example_inputs):
        raise StageError(
            f"the stage has {len(placeholders)} inputs but {len(example_inputs)} example inputs were given"
        )
    for p, x in zip(placeholders, example_inputs):
        if not isinstance(x, torch.Tensor):
            raise StageError(f"example input for '{p.name}' is a {type(x).__name__}, not a tensor")
        val = p.meta.get("val")
        if isinstance(val, torch.Tensor) and (tuple(val.shape) != tuple(x.shape) or val.dtype != x.dtype):
            raise StageError(
                f"example input for '{p.name}' is {x.dtype} {tuple(x.shape)} but the stage was traced "
                f"with {val.dtype} {tuple(val.shape)}"
            )
    if all("val" in n.meta for n in stage.graph.nodes if n.op not in ("output",)):
        return
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    FakeTensorProp(stage, mode).propagate(*[mode.from_tensor(x) for x in example_inputs])


def stage_placeholders(stage: fx.GraphModule) -> list[fx.Node]:
    return [n for n in stage.graph.nodes if n.op == "placeholder"]


def stage_outputs(stage: fx.GraphModule) -> list[Any]:
    """The stage's output entries (fx nodes) in order; a single output counts as a 1-tuple."""
    out = stage.graph.output_node().args[0]
    return list(out) if isinstance(out, (tuple, list)) else [out]


def input_signature(stage: fx.GraphModule) -> list[TensorSig]:
    return [TensorSig(p.name, tuple(p.meta["val"].shape), p.meta["val"].dtype) for p in stage_placeholders(stage)]


def output_signature(stage: fx.GraphModule) -> list[TensorSig]:
    """Each output named after the node that produces it (`output_<i>` when that name repeats
    or is an input's), so an output name is unique and never an input name."""
    inputs = {p.name for p in stage_placeholders(stage)}
    outputs = stage_outputs(stage)
    taken: set[str] = set()
    sigs = []
    for i, node in enumerate(outputs):
        if not isinstance(node, fx.Node) or not isinstance(node.meta.get("val"), torch.Tensor):
            raise StageError(f"stage output {i} is not a tensor node ({node!r})")
        name = node.name if node.name not in inputs and node.name not in taken else f"output_{i}"
        taken.add(name)
        val = node.meta["val"]
        sigs.append(TensorSig(name, tuple(val.shape), val.dtype))
    return sigs


def out_val(node: fx.Node) -> Any:
    """The fake value of a node's output (a tensor, or a tuple for multi-output ops)."""
    return node.meta["val"]


def schema_kwargs(node: fx.Node, convert: Callable[[Any], Any]) -> dict[str, Any]:
    """The op's arguments by schema name, defaults filled in, fx nodes replaced by `convert(node)`."""
    pair = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    if pair is None:
        raise StageError(f"cannot match the arguments of node '{node.name}' to the schema of {op_name(node)}")
    return fx.node.map_arg(pair.kwargs, convert)


def is_getitem(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is operator.getitem


def run_torch(stage: fx.GraphModule, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The stage's outputs computed by torch itself: the reference every export is checked against."""
    with torch.no_grad():
        out = stage(*inputs)
    return list(out) if isinstance(out, (tuple, list)) else [out]


@dataclass(frozen=True)
class OpContext:
    """What a translation rule knows about the node it translates besides its argument values.

    `args` holds the op's arguments by schema name as fake tensors (shapes, dtypes) and
    plain Python values; `dtype` and `shape` describe the node's output (of the first
    output for a multi-output op).
    """

    node: fx.Node
    args: dict[str, Any]

    @property
    def val(self) -> Any:
        return self.node.meta["val"]

    @property
    def dtype(self) -> torch.dtype:
        val = self.val
        return (val if isinstance(val, torch.Tensor) else val[0]).dtype

    @property
    def shape(self) -> tuple[int, ...]:
        val = self.val
        return tuple((val if isinstance(val, torch.Tensor) else val[0]).shape)

    def promoted(self, a: str, b: str) -> torch.dtype:
        """torch's type promotion of arguments `a` and `b` (tensors or scalars): the dtype the op computes in."""
        return torch.result_type(self.args[a], self.args[b])


def op_context(node: fx.Node) -> OpContext:
    return OpContext(node, schema_kwargs(node, lambda n: n.meta["val"]))


def translate(
    stage: fx.GraphModule,
    inputs: Sequence[Any],
    rules: dict[Any, Callable[..., Any]],
    target: str,
    constant: Callable[[torch.Tensor], Any],
    finish: Callable[[OpContext, Any], Any],
) -> list[Any]:
    """Evaluate `stage` node by node with `rules` (op -> rule(ctx, **args)) over target values.

    `inputs` are the target's values for the placeholders, `constant` turns a tensor held by
    the module (`get_attr`) into a target value, and `finish(ctx, value)` post-processes each
    rule's result (casts it to the node's dtype, checks its shape). Returns the target's
    values of the stage outputs. Raises UnsupportedStageOpError naming the first op without
    a rule.
    """
    env: dict[fx.Node, Any] = {}
    placeholders = iter(inputs)
    for node in stage.graph.nodes:
        if node.op == "placeholder":
            env[node] = next(placeholders)
        elif node.op == "get_attr":
            value = stage
            for part in node.target.split("."):
                value = getattr(value, part)
            env[node] = constant(value)
        elif node.op == "call_function" and is_getitem(node):
            env[node] = env[node.args[0]][node.args[1]]
        elif node.op == "call_function":
            rule = rules.get(node.target)
            if rule is None:
                raise UnsupportedStageOpError(target, op_name(node), node, [rule_name(r) for r in rules])
            ctx = op_context(node)
            env[node] = finish(ctx, rule(ctx, **schema_kwargs(node, env.__getitem__)))
        elif node.op == "output":
            return [env[n] for n in stage_outputs(stage)]
        else:
            raise StageError(f"node '{node.name}' is a '{node.op}' node; a stage holds only ATen calls")
    raise StageError("the stage graph has no output node")


def rule_name(op: Any) -> str:
    """'aten.<op>.<overload>' for an ATen op, the qualified name for a Python graph function."""
    if isinstance(op, torch._ops.OpOverload):
        return f"aten.{op.__name__}" if op.namespace == "aten" else str(op)
    return getattr(op, "__qualname__", str(op))
