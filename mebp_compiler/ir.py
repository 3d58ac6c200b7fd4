"""The one IR: a whole training step as a torch.fx graph plus per-node `TensorInfo`.

Every pass after capture reads and writes `TrainingGraph`; none reaches back into the
nn.Module. Node order in `module.graph` is the execution order.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import gc
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

import torch.fx as fx
from torch.fx import _lazy_graph_module


class Role(str, enum.Enum):
    """What a tensor is, for memory accounting."""

    FROZEN = "frozen"  # base-model weight or buffer: a graph input, never trained
    LORA = "lora"  # trainable LoRA parameter: a graph input
    BATCH = "batch"  # input ids / labels: a graph input
    ACTIVATION = "activation"  # computed in the forward (or recomputed for the backward)
    GRADIENT = "gradient"  # computed in the backward, including the LoRA gradients
    LOSS = "loss"  # the scalar loss
    OFFLOADED = "offloaded"  # a handle to a tensor that lives in a file on disk
    DEQUANTIZED = "dequantized"  # a frozen weight decompressed from INT4 for the op about to use it
    MAPPED = "mapped"  # an INT4 frozen weight read from a memory-mapped file: clean pages, not held
    OPTIMIZER = "optimizer"  # optimizer state (AdamW's moments, step count): a graph input of an exported fused step
    UPDATE = "update"  # a LoRA parameter or optimizer state after its fused update: a graph output


INPUT_ROLES = (Role.FROZEN, Role.LORA, Role.BATCH, Role.MAPPED, Role.OPTIMIZER)
#: Roles whose bytes are reported but not held: clean file-backed pages the OS may drop and
#: read again (what MeBP's memory-mapped weights rely on; iOS does not charge them to the app).
UNHELD_ROLES = (Role.MAPPED,)


class Phase(str, enum.Enum):
    INPUT = "input"
    FORWARD = "forward"
    BACKWARD = "backward"


@dataclass(frozen=True)
class TensorInfo:
    """What the scheduler and the memory accounting need to know about one node's output.

    Outputs are by position: one for a tensor, one per element for a tuple (non-tensor
    elements have 0 bytes). `output_nbytes[i]` is the size in bytes of the storage behind
    output i, and
    `output_alias[i]` is None when output i is a fresh allocation or the index into
    `node.all_input_nodes` of the input whose storage it shares (views). A `getitem`
    node shares the storage of the element it selects. `flops` is an estimate of the
    floating-point operations of the op (matmuls exactly, element-wise ops as one per
    output element). `part` numbers the sequence chunk of a chunked MLP an op belongs to
    (None elsewhere): the backward of one block runs in segments of equal (block, part)
    (`segment`), so a schedule brings back one chunk's activations at a time.
    """

    role: Role
    phase: Phase
    shape: tuple[int, ...] | None
    dtype: str | None
    output_nbytes: tuple[int, ...]
    output_alias: tuple[int | None, ...]
    flops: int = 0
    block: int | None = None
    module: str = ""
    recompute_of: str | None = None
    part: int | None = None

    @property
    def segment(self) -> tuple[int | None, int | None]:
        """The backward segment of a backward op: its block, and its part within the block."""
        return self.block, self.part

    @property
    def alloc_bytes(self) -> int:
        """Bytes this node newly allocates when it runs (0 for a pure view)."""
        return sum(n for n, a in zip(self.output_nbytes, self.output_alias) if a is None)

    @property
    def is_view(self) -> bool:
        return bool(self.output_alias) and all(a is not None for a in self.output_alias)


@dataclass(frozen=True)
class InputSpec:
    """A graph placeholder: where its value comes from at run time."""

    name: str  # placeholder node name
    role: Role
    source: str  # parameter/buffer qualified name, or batch key ("input_ids", "labels")


@dataclass
class TrainingGraph:
    """A whole training step: inputs = frozen weights, LoRA params, batch; outputs = loss, LoRA grads.

    `outputs` names what each graph output is: "loss" or the qualified name of the LoRA
    parameter whose gradient it is.
    """

    module: fx.GraphModule
    info: dict[str, TensorInfo]
    inputs: list[InputSpec]
    outputs: list[str]
    num_blocks: int
    batch_shape: tuple[int, ...] = ()
    meta: dict = field(default_factory=dict)

    def nodes(self) -> list[fx.Node]:
        """Nodes in execution order."""
        return list(self.module.graph.nodes)

    _nodes_by_name: dict[str, fx.Node] = field(default_factory=dict, init=False, repr=False, compare=False)

    def node(self, name: str) -> fx.Node:
        """The node called `name`. The name index is rebuilt only when it misses or is stale (the
        graph was edited since), so looking up every node costs one pass, not one per lookup."""
        found = self._nodes_by_name.get(name)
        if found is None or found._erased or found.graph is not self.module.graph:
            self._nodes_by_name = {n.name: n for n in self.module.graph.nodes}
            found = self._nodes_by_name[name]
        return found

    def names_by_role(self, role: Role) -> list[str]:
        return [name for name, ti in self.info.items() if ti.role == role]

    def names_in_block(self, block: int, phase: Phase | None = None) -> list[str]:
        return [
            name
            for name, ti in self.info.items()
            if ti.block == block and (phase is None or ti.phase == phase)
        ]

    def bytes_by_role(self) -> dict[Role, int]:
        """Bytes allocated over the whole step, by role (every allocation counted once)."""
        totals: dict[Role, int] = defaultdict(int)
        for ti in self.info.values():
            totals[ti.role] += ti.alloc_bytes
        return dict(totals)

    def saved_activations(self) -> list[str]:
        """Forward tensors that some backward node reads: what autograd would save."""
        saved = []
        for node in self.module.graph.nodes:
            ti = self.info.get(node.name)
            if ti is None or ti.phase != Phase.FORWARD or not ti.output_nbytes:
                continue
            if any(self.info[u.name].phase == Phase.BACKWARD for u in node.users if u.op != "output"):
                saved.append(node.name)
        return saved

    def summary(self) -> str:
        """A short human-readable description: nodes, blocks, bytes by role."""
        ops = Counter(n.op for n in self.module.graph.nodes)
        phases = Counter(ti.phase.value for ti in self.info.values())
        lines = [
            f"TrainingGraph: {len(self.module.graph.nodes)} nodes "
            f"({ops['placeholder']} inputs, {phases['forward']} forward, "
            f"{phases['backward']} backward), {self.num_blocks} blocks, batch {self.batch_shape}",
        ]
        for role, nbytes in sorted(self.bytes_by_role().items(), key=lambda kv: -kv[1]):
            lines.append(f"  {role.value:<11} {format_bytes(nbytes):>12} allocated")
        flops = sum(ti.flops for ti in self.info.values())
        lines.append(f"  {'flops':<11} {flops / 1e9:>10.2f} G")
        return "\n".join(lines)

    def replace(self, **changes) -> TrainingGraph:
        return dataclasses.replace(self, **changes)


def graph_module(root: fx.GraphModule, graph: fx.Graph) -> fx.GraphModule:
    """`fx.GraphModule(root, graph)` whose Python code is generated on first call (or `.code`), not now.

    Generating and compiling the code of a 20,000-node step takes about a second, and the
    passes that build graphs for planning (stamping, rewriting, fusing) never run them.
    """
    with _lazy_graph_module._use_lazy_graph_module(True):
        return _lazy_graph_module._make_graph_module(root, graph)


def add_node(graph: fx.Graph, op: str, target: Any, args: tuple = (), kwargs: dict | None = None,
             name: str | None = None, type_expr: Any = None) -> fx.Node:
    """`graph.create_node(op, target, args, kwargs, name, type_expr)` without torch's scan of the arguments.

    Since torch 2.13 `create_node` walks every argument with pytree to warn about raw
    SymInts (about 15 us a node; a third of stamping, fusing and rewriting a 22k-node
    step). Captured graphs have static shapes, so the node is created with no arguments
    and then given them as `fx.Node.__init__` gives them (one `_update_args_kwargs`, not
    the `args` setter, whose `Node.__setattr__` re-files the node in fx's lookup table):
    the same node, the same users in the same order.
    """
    node = graph.create_node(op, target, (), None, name, type_expr)
    if args or kwargs:
        node._update_args_kwargs(args, kwargs or node.kwargs)
    return node


def copy_node(graph: fx.Graph, node: fx.Node, arg_transform: Callable[[fx.Node], Any] = lambda a: a) -> fx.Node:
    """`graph.node_copy(node, arg_transform)` through `add_node`, its meta a shallow copy of `node.meta`."""
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), arg_transform)
    new = add_node(graph, node.op, node.target, args, kwargs, node.name, node.type)
    new.meta.update(node.meta)
    return new


_P = ParamSpec("_P")
_R = TypeVar("_R")


def collects_new_objects_only(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """`fn` run with the objects alive at the call frozen (`gc.freeze`), then unfrozen.

    A planning pass allocates hundreds of thousands of objects (fx nodes, their meta, the
    problem's lists), so CPython runs full collections during it, and each one walks every
    object of the process: torch's and transformers' modules, the model, the graphs of the
    passes before. On a 22k-node step that was about 1 s CPU of a 10 s capture plus solve.
    Frozen objects are not walked; what the pass makes is collected as before, and what
    was frozen is collected after it returns. Inside another such call (something already
    frozen) it changes nothing.
    """

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        if gc.get_freeze_count():
            return fn(*args, **kwargs)
        gc.freeze()
        try:
            return fn(*args, **kwargs)
        finally:
            gc.unfreeze()

    return wrapper


def format_bytes(nbytes: float) -> str:
    """Bytes as a human size with binary prefixes, e.g. 1536 -> '1.5 KiB'."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
