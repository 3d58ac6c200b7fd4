"""Liveness: the bytes a training step holds after every op, its peak, and what is live there.

The model is the one the CPU runtime follows: graph inputs are held for the whole step;
a node's value is dropped right after its last use (graph outputs are kept to the end);
a storage is held while any node that refers to it (the allocating node, or a view or
getitem of it) is still held. Live bytes at step k are counted after node k has allocated
its outputs and before anything is dropped, i.e. while the op's inputs and outputs
coexist.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass

import torch.fx as fx

from mebp_compiler.ir import INPUT_ROLES, UNHELD_ROLES, Role, TensorInfo, TrainingGraph, format_bytes

StorageKey = tuple[str, int]  # (allocating node name, output position)


@dataclass(frozen=True)
class LiveStorage:
    """One storage live at some step."""

    owner: str  # node that allocated it
    role: Role
    nbytes: int
    block: int | None


@dataclass
class MemoryProfile:
    """Live bytes per execution step, split by role.

    `bytes_by_role[role][k]` is what `role` holds at step k (executing `order[k]`), in
    bytes. Inputs (frozen weights, LoRA parameters, batch) are held throughout. Roles in
    `UNHELD_ROLES` (memory-mapped INT4 weights) are reported but not part of `total`.
    """

    order: list[str]
    bytes_by_role: dict[Role, list[int]]
    peak_step: int
    live_at_peak: list[LiveStorage]

    @property
    def total(self) -> list[int]:
        """Held bytes at every step: all roles but the unheld (memory-mapped) ones."""
        return _held_totals(self.bytes_by_role)

    @property
    def peak_bytes(self) -> int:
        """Most bytes held at any step, all held roles together."""
        return max(self.total, default=0)

    def peak_bytes_of(self, roles: tuple[Role, ...]) -> int:
        """Most bytes held at any step by tensors of the given roles together."""
        rows = [self.bytes_by_role[r] for r in roles if r in self.bytes_by_role]
        return max((sum(col) for col in zip(*rows)), default=0)

    @property
    def peak_activation_bytes(self) -> int:
        """Peak of everything the step computes (activations, gradients, loss), without its inputs."""
        return self.peak_bytes_of(tuple(r for r in Role if r not in INPUT_ROLES))

    def report(self, top: int = 10) -> str:
        lines = [
            f"peak {format_bytes(self.peak_bytes)} at step {self.peak_step} "
            f"({self.order[self.peak_step] if self.order else '-'}); computed tensors "
            f"peak {format_bytes(self.peak_activation_bytes)}",
        ]
        for role, row in self.bytes_by_role.items():
            note = " (memory-mapped file, not held)" if role in UNHELD_ROLES else ""
            lines.append(f"  {role.value:<11} {format_bytes(row[self.peak_step]):>12} at the peak{note}")
        lines.append("  largest live at the peak:")
        for s in self.live_at_peak[:top]:
            block = "-" if s.block is None else s.block
            lines.append(f"    {s.owner:<32} {s.role.value:<11} block {block!s:<4} {format_bytes(s.nbytes):>12}")
        return "\n".join(lines)


def storage_keys(graph: TrainingGraph, order: list[fx.Node] | None = None) -> dict[str, tuple[StorageKey, ...]]:
    """For every node, the storages its value refers to, one key per output position."""
    keys: dict[str, tuple[StorageKey, ...]] = {}
    for node in order or graph.module.graph.nodes:
        if node.op == "output":
            continue
        ti = graph.info[node.name]
        inputs = node.all_input_nodes
        node_keys = []
        for pos, alias in enumerate(ti.output_alias):
            if alias is None:
                node_keys.append((node.name, pos))
            elif node.target is operator.getitem:
                node_keys.append(keys[inputs[0].name][node.args[1]])
            else:
                node_keys.append(keys[inputs[alias].name][0])
        keys[node.name] = tuple(node_keys)
    return keys


def liveness(graph: TrainingGraph, order: list[str] | None = None) -> MemoryProfile:
    """Predict live bytes at every step of executing `graph` in `order` (default: graph order)."""
    by_name = {n.name: n for n in graph.module.graph.nodes}
    nodes = [by_name[name] for name in order] if order else [
        n for n in graph.module.graph.nodes if n.op != "output"
    ]
    steps = [n for n in nodes if n.op not in ("placeholder", "get_attr")]
    position = {n.name: k for k, n in enumerate(steps)}
    end = len(steps)
    keys = storage_keys(graph, nodes)

    last_use: dict[str, int] = {}
    for n in nodes:
        k = position.get(n.name, -1)
        if n.op in ("placeholder", "get_attr"):
            last_use[n.name] = end  # inputs belong to the caller
            continue
        uses = [end if u.op == "output" else position[u.name] for u in n.users]
        last_use[n.name] = max(uses, default=k)

    alloc_step: dict[StorageKey, int] = {}
    free_step: dict[StorageKey, int] = defaultdict(lambda: -1)
    size: dict[StorageKey, int] = {}
    owner_info: dict[StorageKey, TensorInfo] = {}
    for n in nodes:
        ti = graph.info[n.name]
        for pos, key in enumerate(keys[n.name]):
            if key[0] == n.name:
                alloc_step[key] = position.get(n.name, -1)
                size[key] = ti.output_nbytes[pos]
                owner_info[key] = ti
            free_step[key] = max(free_step[key], last_use[n.name])

    bytes_by_role: dict[Role, list[int]] = {}
    delta: dict[Role, list[int]] = defaultdict(lambda: [0] * (end + 1))
    for key, start in alloc_step.items():
        role = owner_info[key].role
        delta[role][max(start, 0)] += size[key]
        delta[role][min(free_step[key], end - 1) + 1] -= size[key]
    for role, d in delta.items():
        running, row = 0, []
        for k in range(end):
            running += d[k]
            row.append(running)
        bytes_by_role[role] = row
    totals = _held_totals(bytes_by_role) or [0]
    peak_step = max(range(len(totals)), key=totals.__getitem__)
    live = [
        LiveStorage(key[0], owner_info[key].role, size[key], owner_info[key].block)
        for key, start in alloc_step.items()
        if start <= peak_step <= free_step[key] and size[key] and owner_info[key].role not in UNHELD_ROLES
    ]
    live.sort(key=lambda s: -s.nbytes)
    return MemoryProfile(
        order=[n.name for n in steps],
        bytes_by_role=bytes_by_role,
        peak_step=peak_step,
        live_at_peak=live,
    )


def _held_totals(bytes_by_role: dict[Role, list[int]]) -> list[int]:
    rows = [row for role, row in bytes_by_role.items() if role not in UNHELD_ROLES]
    return [sum(col) for col in zip(*rows)]
