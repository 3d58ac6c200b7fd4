"""Apply a Schedule to a TrainingGraph: recompute clones, offload and reload nodes.

The result is a new TrainingGraph whose node order is the schedule's sequence. Every
value is dropped right after its last use (the runtime and `liveness` both follow that),
so a tensor the schedule recomputes or offloads is freed after its last forward use and
the backward reads the clone or the reloaded copy instead.
"""

from __future__ import annotations

import dataclasses

import torch.fx as fx

from mebp_compiler import offload
from mebp_compiler.ir import (Phase, Role, TensorInfo, TrainingGraph, add_node, collects_new_objects_only, copy_node,
                             graph_module)
from mebp_compiler.schedule import Decision, Schedule, ScheduleError, StepKind


@collects_new_objects_only
def rewrite(graph: TrainingGraph, schedule: Schedule) -> TrainingGraph:
    """Build the graph that executes `schedule`; raise ScheduleError if it is not valid for `graph`."""
    old_nodes = {n.name: n for n in graph.module.graph.nodes}
    info = graph.info
    new_graph = fx.Graph()
    new_info: dict[str, TensorInfo] = {}
    current: dict[str, fx.Node] = {}  # captured name -> node now holding that value
    for_backward: set[str] = set()  # captured forward names whose current node may feed the backward
    handles: dict[str, fx.Node] = {}

    for node in graph.module.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            current[node.name] = copy_node(new_graph, node)
            new_info[current[node.name].name] = info[node.name]
    for name, decision in schedule.decisions.items():
        if name not in old_nodes or info[name].phase != Phase.FORWARD:
            raise ScheduleError(f"the schedule decides on '{name}', which is not a forward tensor of this graph")
        if decision == Decision.KEEP:
            for_backward.add(name)

    computed: set[str] = set()
    for index, step in enumerate(schedule.sequence):
        node = old_nodes.get(step.tensor)
        if node is None or node.op != "call_function":
            raise ScheduleError(f"step {index} ({step.kind.value}) names '{step.tensor}', not an op of this graph")
        ti = info[node.name]
        in_backward = step.kind != StepKind.COMPUTE or ti.phase == Phase.BACKWARD

        def arg(a: fx.Node) -> fx.Node:
            if a.name not in current:
                raise ScheduleError(f"step {index} ({step.kind.value} {step.tensor}) reads '{a.name}' "
                                    "before the sequence computes it")
            if in_backward and info[a.name].phase == Phase.FORWARD and a.name not in for_backward:
                raise ScheduleError(
                    f"step {index} ({step.kind.value} {step.tensor}) reads forward tensor '{a.name}' in "
                    f"the backward, but the schedule {_fate(schedule, a.name)} and the sequence does "
                    "not bring it back before this step"
                )
            return current[a.name]

        if step.kind == StepKind.COMPUTE:
            if node.name in computed:
                raise ScheduleError(f"step {index} computes '{node.name}' a second time; use recompute")
            new = copy_node(new_graph, node, arg)
            new_info[new.name] = ti
            computed.add(node.name)
        elif step.kind == StepKind.RECOMPUTE:
            if ti.phase != Phase.FORWARD:
                raise ScheduleError(f"step {index} recomputes '{node.name}', which is not a forward op")
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), arg)
            new = add_node(new_graph, "call_function", node.target, args, kwargs,
                           name=f"{node.name}_recompute")
            new.meta.update(node.meta)
            new_info[new.name] = dataclasses.replace(ti, phase=Phase.BACKWARD, recompute_of=node.name)
            for_backward.add(node.name)
        elif step.kind == StepKind.OFFLOAD:
            if node.name not in current or len(ti.output_nbytes) != 1:
                raise ScheduleError(f"step {index} offloads '{node.name}' before it is computed "
                                    "or it is not a single tensor")
            new = add_node(new_graph, "call_function", offload.offload, (current[node.name], node.name),
                           name=f"offload_{node.name}")
            new.meta["val"] = None
            new_info[new.name] = TensorInfo(
                role=Role.OFFLOADED, phase=ti.phase, shape=None, dtype=None,
                output_nbytes=(), output_alias=(), block=ti.block, part=ti.part, module=ti.module,
            )
            handles[node.name] = new
            continue
        elif step.kind == StepKind.RELOAD:
            if node.name not in handles:
                raise ScheduleError(f"step {index} reloads '{node.name}', which was never offloaded")
            new = add_node(new_graph, "call_function", offload.reload, (handles[node.name],),
                           name=f"reload_{node.name}")
            new.meta["val"] = node.meta.get("val")
            new_info[new.name] = dataclasses.replace(
                ti, phase=Phase.BACKWARD, output_nbytes=(sum(ti.output_nbytes),), output_alias=(None,),
                flops=0, recompute_of=node.name,
            )
            for_backward.add(node.name)
        else:
            raise ScheduleError(f"step {index}: unknown step kind {step.kind!r}")
        current[node.name] = new

    old_output = graph.module.graph.output_node()
    missing = [a.name for a in old_output.all_input_nodes if a.name not in current]
    if missing:
        raise ScheduleError(f"the sequence never computes the outputs {missing[:5]}")
    new_graph.output(fx.node.map_arg(old_output.args[0], lambda a: current[a.name]))
    module = graph_module(graph.module, new_graph)
    return graph.replace(module=module, info=new_info, meta={**graph.meta, "schedule": schedule.policy})


def _fate(schedule: Schedule, name: str) -> str:
    decision = schedule.decisions.get(name)
    if decision is None:
        return "has no decision for it (so it is dropped after the forward)"
    return f"marks it '{decision.value}'"
