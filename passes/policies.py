"""Fixed scheduling policies, and the sequence that realises any set of decisions.

- `none`: keep every tensor the backward reads (plain autograd's memory).
- `mebp`: keep only what crosses a transformer-block boundary (each block's input, and
  tensors computed outside the blocks); recompute everything else inside a block just
  before the backward needs it (MeBP, Song & Tang 2025, block-level checkpointing).
  With `checkpoints="disk"` the kept block boundaries go to memory-mapped files instead of
  RAM (MeBP's memory-mapped checkpoints).
"""

from __future__ import annotations

from typing import Literal

from mebp_compiler.ir import Phase, TrainingGraph
from mebp_compiler.schedule import Decision, Schedule, Step, StepKind


def none_schedule(graph: TrainingGraph) -> Schedule:
    """Keep everything the backward reads: the memory of plain autograd."""
    decisions = {name: Decision.KEEP for name in graph.saved_activations()}
    return Schedule("none", decisions, sequence_from_decisions(graph, decisions))


def mebp_schedule(graph: TrainingGraph, checkpoints: Literal["ram", "disk"] = "ram") -> Schedule:
    """MeBP's block checkpointing: keep block boundaries, recompute each block in the backward."""
    boundary = set(block_boundaries(graph))
    checkpoint = Decision.OFFLOAD if checkpoints == "disk" else Decision.KEEP
    decisions: dict[str, Decision] = {}
    for name in graph.saved_activations():
        if graph.info[name].block is None:
            decisions[name] = Decision.KEEP
        elif name not in boundary:
            decisions[name] = Decision.RECOMPUTE
    for name in boundary:
        decisions[name] = checkpoint if graph.info[name].block is not None else Decision.KEEP
    return Schedule(f"mebp-{checkpoints}" if checkpoints == "disk" else "mebp", decisions,
                    sequence_from_decisions(graph, decisions))


def block_boundaries(graph: TrainingGraph) -> list[str]:
    """Forward tensors read by a forward op of another block (or of no block).

    These are the block inputs of MeBP (each block's output hidden state) plus what is
    computed outside the blocks and read inside them (rotary tables, attention masks).
    """
    info = graph.info
    out = []
    for node in graph.module.graph.nodes:
        ti = info.get(node.name)
        if ti is None or ti.phase != Phase.FORWARD or not ti.output_nbytes:
            continue
        for user in node.users:
            uti = info.get(user.name)
            if uti is not None and uti.phase == Phase.FORWARD and uti.block != ti.block:
                out.append(node.name)
                break
    return out


def sequence_from_decisions(graph: TrainingGraph, decisions: dict[str, Decision]) -> list[Step]:
    """The execution sequence that realises `decisions` with recomputation as late as possible.

    The forward runs as traced; an offloaded tensor is written right after it is produced.
    The backward runs as traced; before each backward op, every forward tensor it reads
    that is not kept is brought back: reloaded if offloaded, else recomputed (with its
    own missing inputs, recursively) just before its first backward use.
    """
    info = graph.info
    nodes = [n for n in graph.module.graph.nodes if n.op == "call_function"]
    sequence: list[Step] = []
    for node in nodes:
        if info[node.name].phase != Phase.FORWARD:
            continue
        sequence.append(Step(StepKind.COMPUTE, node.name))
        if decisions.get(node.name) == Decision.OFFLOAD:
            sequence.append(Step(StepKind.OFFLOAD, node.name))

    ready = {name for name, d in decisions.items() if d == Decision.KEEP}
    for node in nodes:
        if info[node.name].phase != Phase.BACKWARD:
            continue
        for arg in node.all_input_nodes:
            _bring_back(arg, info, decisions, ready, sequence)
        sequence.append(Step(StepKind.COMPUTE, node.name))
        ready.add(node.name)
    return sequence


def _bring_back(root, info, decisions, ready: set[str], sequence: list[Step]) -> None:
    """Emit the steps that make forward tensor `root` available to the backward (iterative DFS)."""
    stack = [(root, False)]
    while stack:
        node, inputs_done = stack.pop()
        if node.name in ready or info[node.name].phase != Phase.FORWARD:
            continue
        if decisions.get(node.name) == Decision.OFFLOAD:
            sequence.append(Step(StepKind.RELOAD, node.name))
            ready.add(node.name)
        elif inputs_done:
            sequence.append(Step(StepKind.RECOMPUTE, node.name))
            ready.add(node.name)
        else:
            stack.append((node, True))
            stack.extend((arg, False) for arg in reversed(node.all_input_nodes))
