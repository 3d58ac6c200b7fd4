"""A captured TrainingGraph as the scheduler's plain DAG: one node per storage.

Views and `getitem`s allocate nothing, so they are not DAG nodes: a read of a view is a
read of the storage behind it, and the rewrite recomputes a view for free from whatever
holds its storage. A decision on a DAG node is a decision on the fx node that owns the
storage (for a multi-output op, the `getitem` that selects it), so the DAG's node names
are fx node names.
"""

from __future__ import annotations

import operator

import networkx as nx

from mebp_compiler.device import DeviceProfile
from mebp_compiler.ir import UNHELD_ROLES, Phase, Role, TrainingGraph
from mebp_compiler.passes.cost import op_seconds
from mebp_compiler.passes.liveness import storage_keys


def training_dag(graph: TrainingGraph, device: DeviceProfile) -> nx.DiGraph:
    """Storage-level DAG of `graph` with sizes, compute seconds on `device`, phases and segments."""
    keys = storage_keys(graph)
    nodes = list(graph.module.graph.nodes)
    owner: dict[tuple[str, int], str] = {}  # storage key -> DAG node name
    for node in nodes:
        if node.target is operator.getitem:
            parent_key = keys[node.args[0].name][node.args[1]]
            if parent_key[0] == node.args[0].name:
                owner.setdefault(parent_key, node.name)
    outputs = {k for n in graph.module.graph.output_node().all_input_nodes for k in keys[n.name]}

    dag = nx.DiGraph()
    for node in nodes:
        if node.op == "output":
            continue
        ti = graph.info[node.name]
        for pos, alias in enumerate(ti.output_alias):
            if alias is not None:
                continue
            key = (node.name, pos)
            name = owner.get(key, node.name if len(ti.output_alias) == 1 else f"{node.name}.{pos}")
            owner[key] = name
            where = graph.info[name] if name in graph.info else ti  # a getitem's own phase and block
            held_bytes = 0 if ti.role in UNHELD_ROLES else ti.output_nbytes[pos]
            attrs = {"size_bytes": held_bytes, "phase": where.phase.value, "output": key in outputs,
                     # Reading the INT4 weight again moves 8x fewer bytes than paging its float copy;
                     # a step result is held to the end anyway, so paging it out would save nothing.
                     "offloadable": ti.role != Role.DEQUANTIZED and key not in outputs,
                     # rebuilt right before the backward op that reads it (policies.sequence_from_decisions)
                     "just_in_time": ti.role == Role.DEQUANTIZED}
            attrs["compute_s"] = 0.0 if ti.phase == Phase.INPUT else op_seconds(node, ti, device)
            if where.phase == Phase.BACKWARD:
                attrs["segment"] = where.segment
            else:
                attrs["block"] = where.block
            dag.add_node(name, **attrs)
            for arg in node.all_input_nodes:
                for arg_key in keys[arg.name]:
                    if arg_key in owner:
                        dag.add_edge(owner[arg_key], name)
    return dag
