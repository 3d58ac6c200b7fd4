"""Capture by the block: trace a few decoder blocks, stamp the repeated ones out to the full depth.

A transformer is one block N times, and tracing the whole step (`make_fx` over fake
tensors) costs about the same for every block. So `capture` traces the model with its
block stack cut to its first `depth` blocks (`stamp_depth`), then builds the full step's
graph from that trace: the prefix (embedding, masks, rotary tables), each block's forward,
the head and loss, each block's backward and the outputs, in the order a full trace has
them. Block 0 and the last block are copied as traced (the first block's backward computes
no gradient of its input; the last block reads the head's gradient); every other block is
a copy of a traced middle block of the same kind (its per-layer config entries, its
parameters' names, shapes and dtypes, its modules' classes), its parameters and node names
renamed, its links to the neighbouring blocks (the residual stream, its gradient) re-linked.

It is shown, not assumed, that the blocks repeat: every traced middle block must equal the
first traced middle block of its kind op for op (targets, argument structure with the links
to its own nodes, its neighbours, its own parameters and the shared nodes, sizes, dtypes,
TensorInfo), and every kind of the full model's middle blocks must be traced twice. Where
any of that fails, or the trace is not laid out prefix / forward blocks / head / backward
blocks, `stamp` returns None and `capture` traces the whole model. tests/test_stamp.py
checks the stamped graph against the full trace on small configs of several families: the
same nodes, names, targets, arguments and TensorInfo, and the same loss and gradients as
plain autograd when it runs.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx as fx

from mebp_compiler.ir import InputSpec, Phase, Role, TensorInfo, TrainingGraph, add_node, graph_module

#: meta keys a stamped copy does not carry over from the traced block it copies: they name
#: the traced block's modules and source lines, not the copy's.
_TRACE_ONLY_META = ("nn_module_stack", "stack_trace", "source_fn_stack", "fwd_nn_module_stack", "fwd_source_fn_stack")


class _CannotStamp(Exception):
    """The traced blocks do not show that the full step repeats them; capture traces it whole."""


@contextlib.contextmanager
def truncated(layers: torch.nn.ModuleList | torch.nn.Sequential, depth: int) -> Iterator[None]:
    """While active, the block stack `layers` holds only its first `depth` blocks (restored on exit)."""
    full = layers._modules
    layers._modules = type(full)(list(full.items())[:depth])
    try:
        yield
    finally:
        layers._modules = full


def block_kinds(model: torch.nn.Module, layers: Sequence[torch.nn.Module]) -> list[tuple]:
    """A key per block that equal blocks share: the block's entries of every per-layer list in
    the model's config (`layer_types`, ...), its parameters' and buffers' names, shapes, dtypes
    and trainability, and its modules' names, classes and plain settings (`_settings`)."""
    count = len(layers)
    configs = [m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "to_dict")]
    per_layer = []
    for config in configs[:1]:
        for key, value in sorted(config.to_dict().items()):
            if isinstance(value, (list, tuple)) and len(value) == count:
                per_layer.append((key, value))
    kinds = []
    for i, layer in enumerate(layers):
        tensors = tuple((n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in layer.named_parameters())
        buffers = tuple((n, tuple(b.shape), b.dtype) for n, b in layer.named_buffers())
        modules = tuple((n, type(m).__name__, _settings(m)) for n, m in layer.named_modules())
        kinds.append((tuple((key, repr(value[i])) for key, value in per_layer), tensors, buffers, modules))
    return kinds


def _settings(module: torch.nn.Module) -> tuple:
    """A module's plain settings (numbers, strings, flags: an epsilon, a window, a sliding flag),
    except its block number (`layer_idx`), which every block has its own of."""
    return tuple(sorted((k, repr(v)) for k, v in vars(module).items()
                        if isinstance(v, (int, float, bool, str, type(None))) and k != "layer_idx"))


def stamp_depth(kinds: Sequence[tuple]) -> int | None:
    """The fewest first blocks to trace so that the full stack can be stamped from them: every
    kind of the full stack's middle blocks twice among the traced middle blocks, and the last
    traced block of the full stack's last block's kind. None when that is the whole stack."""
    count = len(kinds)
    needed = set(kinds[1:count - 1])
    for depth in range(4, count):
        middle = list(kinds[1:depth - 1])
        if kinds[depth - 1] == kinds[count - 1] and all(middle.count(k) >= 2 for k in needed):
            return depth
    return None


@dataclass
class _Layout:
    """Where a traced step's nodes are: shared ones (prefix, head and loss, suffix) and each block's."""

    placeholders: list[fx.Node]
    prefix: list[fx.Node]
    forward: list[list[fx.Node]]
    middle: list[fx.Node]
    backward: list[list[fx.Node]]
    suffix: list[fx.Node]
    position: dict[fx.Node, tuple[int, int, int]]  # node -> (block, segment 0 forward / 1 backward, index)
    #: (block, segment) -> the segment's nodes that other blocks or shared nodes read, in order: its interface
    exports: dict[tuple[int, int], list[fx.Node]]
    export_rank: dict[fx.Node, int]


def _layout(graph: TrainingGraph) -> _Layout:
    depth = graph.num_blocks
    placeholders, prefix, middle, suffix = [], [], [], []
    forward: list[list[fx.Node]] = [[] for _ in range(depth)]
    backward: list[list[fx.Node]] = [[] for _ in range(depth)]
    position = {}
    stage = 0  # 0 prefix, 1 forward blocks, 2 middle, 3 backward blocks, 4 suffix
    last_block = -1
    for node in graph.module.graph.nodes:
        if node.op == "output":
            continue
        if node.op == "placeholder":
            placeholders.append(node)
            continue
        if node.op == "get_attr" and stage == 0:
            prefix.append(node)
            continue
        if node.op != "call_function":
            raise _CannotStamp(f"{node.op} node {node.name}")
        ti = graph.info[node.name]
        block = ti.block if ti.block is not None and ti.block < depth else None
        if ti.phase == Phase.FORWARD and block is not None:
            if stage > 1 or block not in (last_block, last_block + 1):
                raise _CannotStamp(f"forward of block {block} out of order at {node.name}")
            stage, last_block = 1, block
            position[node] = (block, 0, len(forward[block]))
            forward[block].append(node)
        elif ti.phase == Phase.BACKWARD and block is not None:
            if stage > 3 or (stage < 3 and block != depth - 1) or \
                    (stage == 3 and block not in (last_block, last_block - 1)):
                raise _CannotStamp(f"backward of block {block} out of order at {node.name}")
            stage, last_block = 3, block
            position[node] = (block, 1, len(backward[block]))
            backward[block].append(node)
        elif stage == 0:
            prefix.append(node)
        elif stage in (1, 2):
            if stage == 1 and last_block != depth - 1:
                raise _CannotStamp(f"shared node {node.name} between blocks")
            stage = 2
            middle.append(node)
        else:
            if last_block != 0:
                raise _CannotStamp(f"shared node {node.name} between blocks' backward")
            stage = 4
            suffix.append(node)
    if any(not f for f in forward) or any(not b for b in backward):
        raise _CannotStamp("a block with no forward or no backward")
    exports: dict[tuple[int, int], list[fx.Node]] = {(b, seg): [] for b in range(depth) for seg in (0, 1)}
    export_rank = {}
    for node, (block, segment, _) in position.items():
        if any(u.op == "call_function" and position.get(u, (None,))[0] != block for u in node.users):
            export_rank[node] = len(exports[block, segment])
            exports[block, segment].append(node)
    return _Layout(placeholders, prefix, forward, middle, backward, suffix, position, exports, export_rank)


class _Names:
    """Block numbers of parameter names and module names: `<stack>.<block>.<rest>`."""

    def __init__(self, stack: str) -> None:
        self.pattern = re.compile(re.escape(stack) + r"\.(\d+)(\.|$)")
        self.stack = stack

    def block_of(self, name: str) -> int | None:
        match = self.pattern.match(name)
        return int(match.group(1)) if match else None

    def renumber(self, name: str, block: int) -> str:
        return self.pattern.sub(lambda m: f"{self.stack}.{block}{m.group(2)}", name, count=1)


def _info_key(ti: TensorInfo, names: _Names) -> tuple:
    module = names.renumber(ti.module, 0) if names.block_of(ti.module) is not None else ti.module
    return (ti.role, ti.phase, ti.shape, ti.dtype, ti.output_nbytes, ti.output_alias, ti.flops, ti.part, module,
            ti.recompute_of)


def _signature(graph: TrainingGraph, layout: _Layout, names: _Names, block: int,
               source_of: dict[fx.Node, InputSpec]) -> list[tuple]:
    """Block `block`'s nodes with every argument named relative to the block."""

    def ref(a: Any) -> Any:
        if not isinstance(a, fx.Node):
            return a
        if a.op == "placeholder":
            spec = source_of[a]
            b = names.block_of(spec.source)
            return ("param", spec.role, spec.source) if b is None else \
                ("param", spec.role, names.renumber(spec.source, 0), b - block)
        where = layout.position.get(a)
        if where is None:
            return ("shared", a.name)
        if where[0] == block:
            return ("own", where[1], where[2])
        return ("block", where[0] - block, where[1], layout.export_rank[a])

    return [(n.target, fx.node.map_aggregate(n.args, ref), fx.node.map_aggregate(n.kwargs, ref),
             _info_key(graph.info[n.name], names))
            for n in (*layout.forward[block], *layout.backward[block])]


def stamp(traced: TrainingGraph, stack: str, kinds: Sequence[tuple], inputs: Sequence[tuple[Role, str]],
          lora_names: Sequence[str]) -> TrainingGraph | None:
    """The full step's graph stamped from `traced` (a capture of the model cut to its first blocks),
    or None where the traced blocks do not show that the full step repeats them.

    `stack` is the block stack's qualified module name (`...layers`), `kinds` the full stack's
    `block_kinds`, `inputs` the full step's inputs (role, source) in order and `lora_names`
    the full model's LoRA parameters (the gradients' order).
    """
    try:
        return _stamp(traced, _Names(stack), list(kinds), list(inputs), list(lora_names))
    except (_CannotStamp, KeyError, IndexError):  # a lookup that misses is a layout stamping does not know
        return None


def _stamp(traced: TrainingGraph, names: _Names, kinds: list[tuple], inputs: list[tuple[Role, str]],
           lora_names: list[str]) -> TrainingGraph:
    depth, count = traced.num_blocks, len(kinds)
    layout = _layout(traced)
    source_of = {p: spec for p, spec in zip(layout.placeholders, traced.inputs, strict=True)}
    traced_kinds = kinds[:depth]
    first_of_kind = {}
    for b in range(1, depth - 1):
        first_of_kind.setdefault(traced_kinds[b], b)
    template = [0] + [first_of_kind.get(kinds[j], -1) for j in range(1, count - 1)] + [depth - 1]
    if -1 in template or kinds[depth - 1] != kinds[count - 1]:
        raise _CannotStamp("a kind of block the trace does not hold")
    signatures = {b: _signature(traced, layout, names, b, source_of) for b in range(depth)}
    for b in range(1, depth - 1):
        if signatures[b] != signatures[first_of_kind[traced_kinds[b]]]:
            raise _CannotStamp(f"traced block {b} differs from block {first_of_kind[traced_kinds[b]]} of its kind")

    graph = fx.Graph()
    fake_mode = torch._guards.detect_fake_mode([p.meta.get("val") for p in layout.placeholders])
    placeholder_of = {(spec.role, spec.source): p for p, spec in source_of.items()}
    new_inputs: list[InputSpec] = []
    full_placeholder: dict[str, fx.Node] = {}
    info: dict[str, TensorInfo] = {}
    for k, (role, source) in enumerate(inputs):
        b = names.block_of(source)
        t = None if b is None else template[b]
        traced_source = source if b is None else names.renumber(source, t)
        old = placeholder_of.get((role, traced_source))
        if old is None:
            raise _CannotStamp(f"input {source} has no traced counterpart")
        new = graph.placeholder(f"arg{k}_1")
        new.meta = {key: v for key, v in old.meta.items() if b == t or key not in _TRACE_ONLY_META}
        if b != t and isinstance(old.meta.get("val"), torch.Tensor):
            val = old.meta["val"]
            with fake_mode:
                new.meta["val"] = torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device=val.device)
        info[new.name] = traced.info[old.name]
        full_placeholder[source] = new
        new_inputs.append(InputSpec(new.name, role, source))

    shared: dict[fx.Node, fx.Node] = {}
    copies: list[list[list[fx.Node]]] = [[[], []] for _ in range(count)]
    exported: list[list[list[fx.Node]]] = [[[], []] for _ in range(count)]  # the copies of each interface
    head_shift = count - depth

    def resolve(a: fx.Node, block: int | None) -> fx.Node:
        """The full graph's node for traced node `a`, read by a copy of the traced block `template[block]`
        placed as block `block` (None: a shared node, placed once)."""
        t = None if block is None else template[block]
        if a.op == "placeholder":
            source = source_of[a].source
            b = names.block_of(source)
            if b is None:
                return full_placeholder[source]
            if block is None or b != t:
                raise _CannotStamp(f"{a.name} read outside its block")
            return full_placeholder[names.renumber(source, block)]
        where = layout.position.get(a)
        if where is None:
            if a not in shared:
                raise _CannotStamp(f"shared node {a.name} read before it is made")
            return shared[a]
        b, segment, index = where
        if block is None:
            if b not in (0, depth - 1):
                raise _CannotStamp(f"shared node reads traced middle block {b}")
            return copies[0 if b == 0 else count - 1][segment][index]
        if b == t:
            return copies[block][segment][index]
        target = block + (b - t)
        if not 0 <= target < count or _interface(traced, layout, names, b, segment) != \
                _interface(traced, layout, names, template[target], segment):
            raise _CannotStamp(f"{a.name} of block {b} has no counterpart in block {target}")
        made = exported[target][segment]
        rank = layout.export_rank[a]
        if rank >= len(made):
            raise _CannotStamp(f"{a.name} read before it is made")
        return made[rank]

    def copy(node: fx.Node, block: int | None) -> fx.Node:
        args = _map_nodes(node.args, resolve, block)
        kwargs = _map_nodes(node.kwargs, resolve, block)
        new = add_node(graph, node.op, node.target, args, kwargs, name=re.sub(r"_\d+$", "", node.name))
        ti = traced.info[node.name]
        t = None if block is None else template[block]
        if block is None:
            new_block = ti.block + head_shift if ti.block is not None and ti.block >= depth else ti.block
            module = ti.module
        else:
            new_block = block
            module = names.renumber(ti.module, block) if names.block_of(ti.module) == t else ti.module
        if new_block == ti.block and module == ti.module:
            new.meta.update(node.meta)
        else:
            new.meta.update((k, v) for k, v in node.meta.items() if k not in _TRACE_ONLY_META)
            new.meta["custom"] = {**node.meta.get("custom", {}), "block": new_block, "module": module}
        info[new.name] = replace(ti, block=new_block, module=module)
        return new

    for node in layout.prefix:
        shared[node] = copy(node, None)
    for j in range(count):
        for node in layout.forward[template[j]]:
            copies[j][0].append(copy(node, j))
            if node in layout.export_rank:
                exported[j][0].append(copies[j][0][-1])
    for node in layout.middle:
        shared[node] = copy(node, None)
    for j in reversed(range(count)):
        for node in layout.backward[template[j]]:
            copies[j][1].append(copy(node, j))
            if node in layout.export_rank:
                exported[j][1].append(copies[j][1][-1])
    for node in layout.suffix:
        shared[node] = copy(node, None)

    old_output = traced.module.graph.output_node()
    loss, *grads = old_output.args[0]
    grad_of = dict(zip(traced.outputs[1:], grads, strict=True))
    new_grads = []
    for name in lora_names:
        b = names.block_of(name)
        old = grad_of.get(name if b is None else names.renumber(name, template[b]))
        if old is None or b is not None and layout.position.get(old, (None,))[0] != template[b]:
            raise _CannotStamp(f"no traced gradient of {name} inside its block")
        new_grads.append(resolve(old, b) if isinstance(old, fx.Node) else old)
    graph.output((resolve(loss, None), *new_grads))
    module = graph_module(traced.module, graph)
    return TrainingGraph(module=module, info=info, inputs=new_inputs, outputs=["loss", *lora_names],
                         num_blocks=count, batch_shape=traced.batch_shape, meta={**traced.meta, "traced_blocks": depth})


def _map_nodes(value: Any, fn: Any, block: int | None) -> Any:
    """`value` (an fx argument: nodes inside tuples, lists, dicts and slices) with each node `a` as `fn(a, block)`."""
    if isinstance(value, fx.Node):
        return fn(value, block)
    if isinstance(value, tuple):
        return tuple(_map_nodes(v, fn, block) for v in value)
    if isinstance(value, list):
        return [_map_nodes(v, fn, block) for v in value]
    if isinstance(value, dict):
        return {k: _map_nodes(v, fn, block) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(*(_map_nodes(v, fn, block) for v in (value.start, value.stop, value.step)))
    return value


def _interface(traced: TrainingGraph, layout: _Layout, names: _Names, block: int, segment: int) -> list[tuple]:
    """What traced block `block`'s segment gives other blocks: its exported nodes' targets and TensorInfo."""
    return [(n.target, _info_key(traced.info[n.name], names)) for n in layout.exports[block, segment]]
