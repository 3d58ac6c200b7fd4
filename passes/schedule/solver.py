"""CP-SAT formulation: keep / recompute / offload per tensor under a hard memory budget.

Variables per decidable tensor: keep k, recompute r, offload o (booleans).
- A tensor the backward reads gets exactly one of them; any other may get at most one.
- A recomputation needs its inputs at the start of its segment: each input is kept, or
  itself recomputed or reloaded no later than that.
- Every checkpoint of the problem: fixed + sum(size k) + sum(size (r + o)) <= budget.
Objective: predicted step time = base compute + recompute + flash I/O that compute cannot
hide (I/O is assumed to run concurrently with `io_overlap` x the step's compute time).
Checkmate (Jain et al., MLSys 2020) and POET (Patil et al., ICML 2022) write remat and
paging as a MILP over a fixed order; this is that idea restricted to the order the
backward already has, which keeps the model small enough to solve in seconds.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from ortools.sat.python import cp_model

from mebp_compiler.device import DeviceProfile
from mebp_compiler.ir import format_bytes
from mebp_compiler.schedule import Decision
from mebp_compiler.passes.schedule.problem import SchedulingProblem

NANOS = 1_000_000_000  # the objective is integer nanoseconds


class SolverTimeout(RuntimeError):
    """The solver proved nothing useful within its time limit; more time may help."""


class BudgetInfeasible(ValueError):
    """No schedule fits the budget; `least_budget_bytes` is the least one that does."""

    def __init__(self, budget_bytes: int, least_budget_bytes: int, dominated_by: list[tuple[str, int]],
                 least: Solution | None = None) -> None:
        top = ", ".join(f"{name} ({format_bytes(nbytes)})" for name, nbytes in dominated_by[:6])
        super().__init__(
            f"no schedule fits {format_bytes(budget_bytes)}: the least feasible budget is "
            f"{format_bytes(least_budget_bytes)} ({least_budget_bytes} bytes), dominated by {top}. "
            "Raise the budget, shorten the sequence, or shrink what is always held (weights, head)."
        )
        self.budget_bytes = budget_bytes
        self.least_budget_bytes = least_budget_bytes
        self.dominated_by = dominated_by
        self.least = least  # the least-memory solution, when the solver computed it


@dataclass
class Solution:
    """Decisions for the problem's decidable tensors and what the solver proved about them."""

    decisions: dict[str, Decision]
    objective_s: float  # predicted step time
    bound_s: float  # proven lower bound on the step time (same model)
    model_peak_bytes: int  # the model's (upper-bound) peak for these decisions
    status: str
    solve_s: float
    stats: dict = field(default_factory=dict)

    @property
    def gap(self) -> float:
        """Relative optimality gap (0 = proven optimal)."""
        return 0.0 if self.objective_s <= 0 else max(0.0, (self.objective_s - self.bound_s) / self.objective_s)


def solve(
    problem: SchedulingProblem,
    budget_bytes: int,
    device: DeviceProfile,
    *,
    time_limit_s: float = 20.0,
    workers: int = 2,
    hint: dict[str, Decision] | None = None,
    offload: bool = True,
) -> Solution:
    """Least-time decisions whose modelled peak fits `budget_bytes`; raise BudgetInfeasible otherwise.

    With `offload=False` nothing is paged to flash (keep or recompute only).
    """
    model, var, costs = _build(problem, device, offload)
    budget = model.NewConstant(int(budget_bytes))
    peak = _add_memory(model, problem, var)
    for expr in peak:
        model.Add(expr <= budget)
    model.Minimize(costs.total)
    if hint:
        _add_hint(model, var, hint)
    solver = _solver(time_limit_s, workers)
    start = time.perf_counter()
    status = solver.Solve(model)
    elapsed = time.perf_counter() - start
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        least = least_budget(problem, device, time_limit_s=time_limit_s, workers=workers, offload=offload)
        if status == cp_model.UNKNOWN and least.model_peak_bytes <= budget_bytes:
            # No time-optimised schedule within the limit, but the least-memory one fits.
            return dataclasses.replace(least, objective_s=_time_of(problem, device, least.decisions),
                                       bound_s=costs.constant / NANOS, status="FEASIBLE (least-memory fallback)",
                                       solve_s=time.perf_counter() - start)
        if least.status != "OPTIMAL":
            raise SolverTimeout(f"no schedule under {format_bytes(budget_bytes)} found in {time_limit_s:g} s, and "
                                f"the least-memory solve only reached {format_bytes(least.model_peak_bytes)} "
                                "unproven; raise time_limit_s (--time-limit) or the budget")
        raise BudgetInfeasible(budget_bytes, least.model_peak_bytes, _dominant(problem, least.decisions), least)
    decisions = _read(solver, var)
    return Solution(
        decisions=decisions,
        objective_s=(solver.ObjectiveValue() + costs.constant) / NANOS,
        bound_s=(solver.BestObjectiveBound() + costs.constant) / NANOS,
        model_peak_bytes=model_peak(problem, decisions),
        status=solver.StatusName(status),
        solve_s=elapsed,
        stats={"variables": len(var), "checkpoints": len(problem.checkpoints)},
    )


def least_budget(
    problem: SchedulingProblem, device: DeviceProfile, *, time_limit_s: float = 20.0,
    workers: int = 2, offload: bool = True, start: Mapping[str, Decision] | None = None,
) -> Solution:
    """The decisions with the least modelled peak (time is ignored).

    `start` (e.g. MeBP's decisions) is a low-memory point to start the search from; a
    saved tensor it leaves out is kept, and tensors it names that the problem does not
    decide are ignored.

    Status OPTIMAL: no decisions have a lower peak. FEASIBLE: the time limit ran out first,
    so the peak is only an upper bound of the least. Raises SolverTimeout when not even
    the keep-everything hint was confirmed in time.
    """
    model, var, costs = _build(problem, device, offload)
    upper = sum(problem.size.values()) + max((c.fixed_bytes for c in problem.checkpoints), default=0)
    peak_var = model.NewIntVar(0, int(upper), "peak")
    for expr in _add_memory(model, problem, var):
        model.Add(expr <= peak_var)
    model.Minimize(peak_var)
    hint = {v: Decision.KEEP for v in problem.saved}  # always feasible
    hint.update({v: d for v, d in (start or {}).items() if v in var})
    _add_hint(model, var, hint)
    model.AddHint(peak_var, model_peak(problem, hint))  # a complete hint: found at once on big graphs
    solver = _solver(time_limit_s, workers)
    start = time.perf_counter()
    status = solver.Solve(model)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        raise SolverTimeout(f"the least-memory model found no solution in {time_limit_s:g} s "
                            f"({solver.StatusName(status)}); raise time_limit_s (--time-limit)")
    decisions = _read(solver, var)
    return Solution(decisions, 0.0, 0.0, model_peak(problem, decisions), solver.StatusName(status),
                    time.perf_counter() - start)


def model_peak(problem: SchedulingProblem, decisions: dict[str, Decision]) -> int:
    """The model's peak for given decisions (an upper bound of what the realised sequence holds)."""
    best = 0
    for c in problem.checkpoints:
        total = c.fixed_bytes
        total += sum(problem.size[v] for v in c.kept if decisions.get(v) == Decision.KEEP)
        total += sum(problem.size[v] for v in c.materialized
                     if decisions.get(v) in (Decision.RECOMPUTE, Decision.OFFLOAD))
        best = max(best, total)
    return best


def _time_of(problem: SchedulingProblem, device: DeviceProfile, decisions: dict[str, Decision]) -> float:
    """The model's step time for given decisions, in seconds."""
    recompute = sum(problem.compute_s[v] + device.op_overhead_s for v, d in decisions.items()
                    if d == Decision.RECOMPUTE)
    io = sum(device.offload_s(problem.size[v]) for v, d in decisions.items() if d == Decision.OFFLOAD)
    return problem.base_compute_s + recompute + max(0.0, io - device.io_overlap * problem.base_compute_s)


@dataclass
class _Costs:
    total: cp_model.LinearExpr
    constant: int  # base compute time (microseconds), not part of the CP objective


def _build(problem: SchedulingProblem, device: DeviceProfile, offload: bool = True):
    model = cp_model.CpModel()
    var = {}
    recompute_us, io_us = [], []
    for v in problem.decidable:
        k, r = model.NewBoolVar(f"k_{v}"), model.NewBoolVar(f"r_{v}")
        o = model.NewBoolVar(f"o_{v}") if offload and problem.offloadable[v] else None
        choices = [x for x in (k, r, o) if x is not None]
        if v in problem.saved:
            model.AddExactlyOne(choices)
        else:
            model.AddAtMostOne(choices)
        var[v] = (k, r, o)
        recompute_us.append((r, int(round((problem.compute_s[v] + device.op_overhead_s) * NANOS))))
        if o is not None:
            io_us.append((o, int(round(device.offload_s(problem.size[v]) * NANOS))))
    for v, inputs in problem.needs.items():
        r_v = var[v][1]
        for w in inputs:
            k_w, r_w, o_w = var[w]
            if problem.group[w] <= problem.group[v]:
                model.Add(r_v <= sum(x for x in (k_w, r_w, o_w) if x is not None))
            else:
                model.Add(r_v <= k_w)
    base_us = int(round(problem.base_compute_s * NANOS))
    recompute = sum(c * x for x, c in recompute_us)
    io_total = sum(c * x for x, c in io_us)
    unhidden = model.NewIntVar(0, sum(c for _, c in io_us), "unhidden_io")
    model.Add(unhidden >= io_total - int(device.io_overlap * base_us))
    return model, var, _Costs(recompute + unhidden, base_us)


def _add_memory(model, problem: SchedulingProblem, var) -> list:
    exprs = []
    for c in problem.checkpoints:
        terms, coefs = [], []
        for v in c.kept:
            terms.append(var[v][0])
            coefs.append(problem.size[v])
        for v in c.materialized:
            for x in var[v][1:]:
                if x is not None:
                    terms.append(x)
                    coefs.append(problem.size[v])
        exprs.append(cp_model.LinearExpr.WeightedSum(terms, coefs) + c.fixed_bytes)
    return exprs


def _add_hint(model, var, hint: dict[str, Decision]) -> None:
    for v, (k, r, o) in var.items():
        d = hint.get(v)
        for x, want in ((k, Decision.KEEP), (r, Decision.RECOMPUTE), (o, Decision.OFFLOAD)):
            if x is not None:
                model.AddHint(x, d == want)


def _solver(time_limit_s: float, workers: int) -> cp_model.CpSolver:
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = float(time_limit_s)
    solver.parameters.num_workers = workers
    # The memory rows are long (thousands of terms each); CP-SAT's presolve spends longer on
    # them than the search needs (SmolLM2, seq 256: proven optimal in ~4 s without it,
    # 6% gap after 20 s with it).
    solver.parameters.cp_model_presolve = False
    return solver


def _read(solver, var) -> dict[str, Decision]:
    out = {}
    for v, (k, r, o) in var.items():
        if solver.Value(k):
            out[v] = Decision.KEEP
        elif solver.Value(r):
            out[v] = Decision.RECOMPUTE
        elif o is not None and solver.Value(o):
            out[v] = Decision.OFFLOAD
    return out


def _dominant(problem: SchedulingProblem, decisions: dict[str, Decision]) -> list[tuple[str, int]]:
    """The biggest decided tensors held at the binding checkpoint of `decisions`."""
    worst = max(problem.checkpoints, key=lambda c: c.fixed_bytes + sum(
        problem.size[v] for v in c.kept if decisions.get(v) == Decision.KEEP) + sum(
        problem.size[v] for v in c.materialized if decisions.get(v) in (Decision.RECOMPUTE, Decision.OFFLOAD)))
    held = [(v, problem.size[v]) for v in worst.kept if decisions.get(v) == Decision.KEEP]
    held += [(v, problem.size[v]) for v in worst.materialized
             if decisions.get(v) in (Decision.RECOMPUTE, Decision.OFFLOAD)]
    held.append((f"always-held (inputs, gradients, live forward tensors) at step {worst.position}",
                 worst.fixed_bytes))
    return sorted(held, key=lambda kv: -kv[1])
