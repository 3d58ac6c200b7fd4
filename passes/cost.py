"""Predicted time of a scheduled step on a device: compute, recompute and flash I/O."""

from __future__ import annotations

from dataclasses import dataclass

from mebp_compiler.device import DeviceProfile
from mebp_compiler.ir import TrainingGraph
from mebp_compiler.passes.scheduler.from_graph import op_seconds
from mebp_compiler.schedule import Schedule, StepKind


@dataclass(frozen=True)
class StepCost:
    """Seconds of one step. Flash I/O overlaps `io_overlap` x the step's compute time."""

    compute_s: float  # every op of the captured step, once
    recompute_s: float  # the schedule's recomputations
    io_s: float  # flash writes and reads of offloaded tensors
    unhidden_io_s: float  # the part of io_s that compute cannot hide

    @property
    def total_s(self) -> float:
        return self.compute_s + self.recompute_s + self.unhidden_io_s

    @property
    def extra_s(self) -> float:
        """Time over the plain step: recomputation plus un-hidden I/O."""
        return self.recompute_s + self.unhidden_io_s


def step_cost(graph: TrainingGraph, schedule: Schedule, device: DeviceProfile) -> StepCost:
    """Cost of executing `schedule` on the captured `graph` (the same model for every policy)."""
    nodes = {n.name: n for n in graph.module.graph.nodes}

    def seconds(name: str) -> float:
        return op_seconds(nodes[name], graph.info[name], device) + device.op_overhead_s

    compute = sum(seconds(n.name) for n in graph.module.graph.nodes if n.op == "call_function")
    recompute = sum(seconds(s.tensor) for s in schedule.sequence if s.kind == StepKind.RECOMPUTE)
    io = sum(device.offload_s(sum(graph.info[s.tensor].output_nbytes))
             for s in schedule.sequence if s.kind == StepKind.OFFLOAD)
    return StepCost(compute, recompute, io, max(0.0, io - device.io_overlap * compute))
