"""CPU runtime: execute a TrainingGraph op by op with exact accounting of the bytes it holds.

Each node's value is dropped right after its last use. The runtime counts the unique
storages its environment refers to (a view and its base count once), measured from the
real tensors, after every op has produced its outputs and before anything is dropped:
the same instant `passes.liveness` predicts. Op-internal scratch memory of a kernel is not
a tensor the runtime holds and is not counted; the benchmark's process RSS covers it.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from mebp_compiler.heap import release_freed_memory
from mebp_compiler.ir import UNHELD_ROLES, Role, TrainingGraph
from mebp_compiler.offload import OffloadStore, using_store
from mebp_compiler.passes.fuse_update import Updater, using_updater


@dataclass
class StepResult:
    """What one executed step returns. Bytes are what the runtime held, measured.

    `held_peak_bytes` leaves out the roles in `UNHELD_ROLES` (weights read from a
    memory-mapped file); `held_by_role` still shows them.
    """

    loss: torch.Tensor
    grads: dict[str, torch.Tensor]
    held_peak_bytes: int
    held_bytes: list[int] = field(repr=False)
    held_by_role: dict[Role, list[int]] = field(repr=False)

    def held_peak_bytes_of(self, roles: tuple[Role, ...]) -> int:
        rows = [self.held_by_role[r] for r in roles if r in self.held_by_role]
        return max((sum(col) for col in zip(*rows)), default=0)


class _HeldStorages:
    """Reference counts of the storages the runtime's environment refers to, by role."""

    def __init__(self) -> None:
        self.refs: dict[int, int] = {}
        self.owner: dict[int, tuple[Role, int]] = {}
        self.bytes_by_role: dict[Role, int] = defaultdict(int)

    def add(self, value: Any, role: Role) -> None:
        for storage in _storages(value):
            key = storage.data_ptr()
            if key in self.refs:
                self.refs[key] += 1
                continue
            nbytes = storage.nbytes()
            self.refs[key] = 1
            self.owner[key] = (role, nbytes)
            self.bytes_by_role[role] += nbytes

    def drop(self, value: Any) -> None:
        for storage in _storages(value):
            key = storage.data_ptr()
            self.refs[key] -= 1
            if self.refs[key] == 0:
                del self.refs[key]
                role, nbytes = self.owner.pop(key)
                self.bytes_by_role[role] -= nbytes


def _storages(value: Any):
    if isinstance(value, torch.Tensor):
        yield value.untyped_storage()
    elif isinstance(value, (list, tuple)):
        for v in value:
            if isinstance(v, torch.Tensor):
                yield v.untyped_storage()


class Runtime:
    """Executes one TrainingGraph; build once, run every step.

    With `trim_heap` the C heap's freed pages go back to the OS before each op that starts
    a new segment (its block, or its part of a block, changes; `heap.release_freed_memory`):
    the process's RSS then follows the held bytes more closely, for some step time.
    """

    def __init__(self, graph: TrainingGraph, offload_dir: str | None = None, trim_heap: bool = False) -> None:
        self.graph = graph
        self.store = OffloadStore(offload_dir)
        self.trim_heap = trim_heap
        nodes = list(graph.module.graph.nodes)
        self._placeholders = [n for n in nodes if n.op == "placeholder"]
        self._constants = [n for n in nodes if n.op == "get_attr"]
        self._steps = [n for n in nodes if n.op == "call_function"]
        segments = [graph.info[n.name].segment for n in self._steps]
        self._segment_starts = {k for k in range(len(segments)) if k == 0 or segments[k] != segments[k - 1]}
        self._output = graph.module.graph.output_node()
        position = {n: k for k, n in enumerate(self._steps)}
        self._drop_after: list[list[fx.Node]] = [[] for _ in self._steps]
        for n in self._steps:
            uses = [position[u] for u in n.users if u.op != "output"]
            if self._output in n.users:
                continue  # outputs are handed to the caller
            self._drop_after[max(uses, default=position[n])].append(n)

    @property
    def steps(self) -> list[fx.Node]:
        """The call nodes in the order they run."""
        return list(self._steps)

    def run(self, inputs: list[torch.Tensor], updater: Updater | None = None,
            op_times: list[float] | None = None) -> StepResult:
        """Execute the step on `inputs` (one tensor per graph placeholder, in order).

        `updater` applies the LoRA updates of a graph with fused updates
        (`passes.fuse_update`); such a step returns no gradients. With `op_times` (a list),
        the process CPU seconds of each call node are appended to it, in `steps` order
        (`mebp calibrate`).
        """
        info = self.graph.info
        env: dict[fx.Node, Any] = {}
        held = _HeldStorages()
        for node, value in zip(self._placeholders, inputs, strict=True):
            env[node] = value
            held.add(value, info[node.name].role)
        for node in self._constants:
            env[node] = getattr(self.graph.module, node.target)
            held.add(env[node], info[node.name].role)
        trace_total: list[int] = []
        trace_role: dict[Role, list[int]] = defaultdict(list)
        roles = list(Role)
        lookup = env.__getitem__
        with torch.no_grad(), using_store(self.store), using_updater(updater):
            for k, node in enumerate(self._steps):
                if self.trim_heap and k in self._segment_starts:
                    release_freed_memory()
                args, kwargs = fx.node.map_arg((node.args, node.kwargs), lookup)
                if op_times is None:
                    value = node.target(*args, **kwargs)
                else:
                    start = time.process_time()
                    value = node.target(*args, **kwargs)
                    op_times.append(time.process_time() - start)
                env[node] = value
                held.add(value, info[node.name].role)
                for role in roles:
                    trace_role[role].append(held.bytes_by_role.get(role, 0))
                trace_total.append(sum(b for r, b in held.bytes_by_role.items() if r not in UNHELD_ROLES))
                for dead in self._drop_after[k]:
                    held.drop(env.pop(dead))
        outputs = fx.node.map_arg(self._output.args[0], lookup)
        names = self.graph.outputs
        by_name = dict(zip(names, outputs, strict=True))
        loss = by_name.pop("loss")
        return StepResult(
            loss=loss,
            grads=by_name,
            held_peak_bytes=max(trace_total, default=0),
            held_bytes=trace_total,
            held_by_role={r: row for r, row in trace_role.items() if any(row)},
        )
