"""The memory / time trade-off of a captured step: optimal schedules over a sweep of budgets.

Each point is (budget, predicted step time, predicted peak), all on the same device cost
model (`passes.cost.step_cost`) and memory analysis (`passes.liveness`), with the fixed
`none` and `mebp` policies evaluated the same way so they can be drawn on the same axes.
"""

from __future__ import annotations

from dataclasses import dataclass

from mebp_compiler.device import DeviceProfile
from mebp_compiler.ir import TrainingGraph
from mebp_compiler.passes.cost import step_cost
from mebp_compiler.passes.liveness import liveness
from mebp_compiler.passes.policies import (
    least_feasible_budget,
    mebp_schedule,
    none_schedule,
    optimal_schedule,
    scheduling_problem,
)
from mebp_compiler.passes.rewrite import rewrite
from mebp_compiler.passes.scheduler.solver import DEFAULT_WORK_LIMIT
from mebp_compiler.schedule import Schedule


@dataclass(frozen=True)
class ParetoPoint:
    """One schedule on the trade-off. Bytes are the whole step's peak; seconds on the device."""

    policy: str  # "optimal", "none" or "mebp"
    budget_bytes: int | None  # None for the fixed policies
    predicted_time_s: float
    extra_time_s: float  # recomputation + un-hidden flash I/O
    predicted_peak_bytes: int
    predicted_peak_activation_bytes: int
    schedule: Schedule


def evaluate(graph: TrainingGraph, schedule: Schedule, device: DeviceProfile,
             budget_bytes: int | None = None) -> ParetoPoint:
    """Predicted time and peak of `schedule` applied to the captured `graph`."""
    profile = liveness(rewrite(graph, schedule))
    cost = step_cost(graph, schedule, device)
    return ParetoPoint(schedule.policy, budget_bytes, cost.total_s, cost.extra_s, profile.peak_bytes,
                       profile.peak_activation_bytes, schedule)


def pareto_frontier(
    graph: TrainingGraph,
    device: DeviceProfile,
    *,
    points: int = 6,
    work_limit: float = DEFAULT_WORK_LIMIT,
    offload: bool = True,
) -> list[ParetoPoint]:
    """`points` optimal schedules at budgets evenly spread from the least feasible to `none`'s
    peak, followed by the `none` and `mebp` policies' own points. `work_limit` is per solve
    (CP-SAT deterministic time, `passes.scheduler.solver`)."""
    if points < 2:
        raise ValueError(f"points must be at least 2, got {points}")
    problem = scheduling_problem(graph, device)
    none = evaluate(graph, none_schedule(graph), device)
    mebp = evaluate(graph, mebp_schedule(graph), device)
    least = least_feasible_budget(graph, device, work_limit=work_limit, offload=offload, problem=problem)
    top = max(none.predicted_peak_bytes, least)
    budgets = [least + (top - least) * i // (points - 1) for i in range(points)]
    frontier = [
        evaluate(graph, optimal_schedule(graph, b, device, work_limit=work_limit, offload=offload,
                                         problem=problem), device, b)
        for b in budgets
    ]
    return frontier + [none, mebp]
