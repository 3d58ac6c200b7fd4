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

Anytime and deterministic. Every solve knows schedules to fall back on (the caller's
`starts`, e.g. MeBP's decisions, and keep-all): the best one that fits is the incumbent the
search must beat, so a solve with a fitting start always returns a schedule, at worst that
start, with the bound the search proved. The limit is work, not wall-clock time: CP-SAT's deterministic time
(`max_deterministic_time`, a weighted count of the solver's operations scaled so that one
unit is meant to take about a second), with one search worker and a fixed seed, so the
search and where it stops are functions of the model alone: the same inputs give the
same schedule on a quiet or a loaded machine (same OR-Tools version). Several workers
would need `interleave_search`, which on these models found nothing within limits that
one worker solves. A unit is not a second: on SmolLM2 at seq 256 (ortools 9.15, 2,112
decisions) 10 units took 34 s of one core for the least-time solve and 44 s for the
least-memory one, about what the earlier 20 s wall-clock limit on 2 workers gave a quiet
2-core machine. The least-time objective was final after 2 units; the least memory was
proven after 7.7.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from ortools.sat.python import cp_model

from mebp_compiler.device import DeviceProfile
from mebp_compiler.ir import format_bytes
from mebp_compiler.passes.scheduler.limits import DEFAULT_STEP_GAP, DEFAULT_WORK_LIMIT
from mebp_compiler.passes.scheduler.problem import Checkpoint, SchedulingProblem, row_sums
from mebp_compiler.schedule import Decision

NANOS = 1_000_000_000  # the objective is integer nanoseconds
INT64_MIN = -(2**63)  # CP-SAT's lower end of an unbounded linear constraint
DEFAULT_BLOCK_TEMPLATES = 2  # decision patterns per class of equal blocks (`solve`)
KEEP_ALL = "keep-all"  # the start every solve has: keep what the backward reads


class BudgetInfeasible(ValueError):
    """No schedule fits the budget (proven); `least_budget_bytes` is the least one found that does.

    `least_proven` says whether that least is proven least too, or only the best the
    least-memory search found within its work limit.
    """

    def __init__(self, budget_bytes: int, least_budget_bytes: int, dominated_by: list[tuple[str, int]],
                 least: Solution | None = None, least_proven: bool = True) -> None:
        top = ", ".join(f"{name} ({format_bytes(nbytes)})" for name, nbytes in dominated_by[:6])
        which = "the least feasible budget is" if least_proven else "the least budget found to fit is"
        super().__init__(
            f"no schedule fits {format_bytes(budget_bytes)}: {which} {format_bytes(least_budget_bytes)} "
            f"({least_budget_bytes} bytes), dominated by {top}. "
            "Raise the budget, shorten the sequence, or shrink what is always held (weights, head)."
        )
        self.budget_bytes = budget_bytes
        self.least_budget_bytes = least_budget_bytes
        self.dominated_by = dominated_by
        self.least = least  # the least-memory solution, when the solver computed it
        self.least_proven = least_proven


class ScheduleNotFound(ValueError):
    """Within the work limit no schedule under the budget was found, and none was proven impossible.

    Only a budget below every known schedule gets here; `least_known_bytes` is the least
    budget a known schedule (`least`) fits.
    """

    def __init__(self, budget_bytes: int, work_limit: float, least_known_bytes: int,
                 least: Solution | None = None) -> None:
        super().__init__(
            f"no schedule under {format_bytes(budget_bytes)} was found within the solver's work limit "
            f"({work_limit:g}), and the search did not prove that none exists; the least budget a known "
            f"schedule fits is {format_bytes(least_known_bytes)} ({least_known_bytes} bytes). "
            "Raise the budget to that, or raise the work limit (work_limit, --work-limit)."
        )
        self.budget_bytes = budget_bytes
        self.work_limit = work_limit
        self.least_known_bytes = least_known_bytes
        self.least = least


@dataclass
class Solution:
    """Decisions for the problem's decidable tensors and what the solver proved about them."""

    decisions: dict[str, Decision]
    objective_s: float  # predicted step time
    bound_s: float  # proven lower bound on the step time (same model)
    model_peak_bytes: int  # the model's (upper-bound) peak for these decisions
    status: str  # OPTIMAL (proven), FEASIBLE, or FEASIBLE (...) saying where the decisions came from or why it stopped
    solve_s: float  # wall-clock seconds, for reports only: nothing depends on it
    work: float = 0.0  # CP-SAT deterministic time the solve used
    start: str | None = None  # the fitting known schedule the search had to beat (None: none fitted)
    stats: dict = field(default_factory=dict)
    # Decision patterns per class of equal blocks the search allowed (0: every block free).
    # With patterns, objective and bound are over such schedules only.
    templates: int = 0

    @property
    def gap(self) -> float:
        """Relative optimality gap (0 = proven optimal)."""
        return 0.0 if self.objective_s <= 0 else max(0.0, (self.objective_s - self.bound_s) / self.objective_s)


@dataclass(frozen=True)
class Progress:
    """Where a running search stands, for a progress report.

    `search` is "least time" (objective in seconds) or "least memory" (in bytes).
    `incumbent` is the best schedule's objective so far (the start's before the search
    finds one; None without a start), `bound` the proven lower bound. CP-SAT's callbacks
    carry no deterministic time with one worker (0.0 in ortools 9.15), so `elapsed_s` is
    wall-clock, for display only.
    """

    search: str
    incumbent: float | None
    bound: float | None
    solutions: int
    elapsed_s: float
    work_limit: float
    done: bool = False

    def describe(self) -> str:
        """One line: the incumbent, the bound and their gap, solutions, time so far."""
        show = format_bytes if self.search == "least memory" else (lambda s: f"{s:.4g} s")
        if self.incumbent is None:
            best = "no schedule yet"
        else:
            best = f"{'best' if self.solutions else 'start'} {show(self.incumbent)}"
        bound = "" if self.bound is None else f", bound {show(self.bound)}"
        gap = ""
        if self.incumbent and self.bound is not None:
            gap = f" (gap {max(0.0, (self.incumbent - self.bound) / self.incumbent):.2%})"
        state = "done" if self.done else f"work limit {self.work_limit:g}"
        found = f"{self.solutions} solution{'' if self.solutions == 1 else 's'}"
        return f"{self.search}: {best}{bound}{gap}, {found} found, {self.elapsed_s:.0f} s, {state}"


ProgressCallback = Callable[[Progress], None]


def solve(
    problem: SchedulingProblem,
    budget_bytes: int,
    device: DeviceProfile,
    *,
    work_limit: float = DEFAULT_WORK_LIMIT,
    starts: Mapping[str, Mapping[str, Decision]] | None = None,
    offload: bool = True,
    progress: ProgressCallback | None = None,
    block_templates: int = DEFAULT_BLOCK_TEMPLATES,
    step_gap: float = DEFAULT_STEP_GAP,
) -> Solution:
    """Least-time decisions whose modelled peak fits `budget_bytes`, the best found within `work_limit`,
    or the first proven within `step_gap` x the plain step's predicted time of the optimum (0: prove it).

    `starts` names known schedules (e.g. {"mebp": MeBP's decisions}, completed as
    `complete_decisions` does); of them and keep-all, the fastest that fits is returned
    if the search finds nothing better. With `offload=False`
    nothing is paged to flash (keep or recompute only). `progress` is called as the search
    finds schedules and bounds.

    Equal blocks (`SchedulingProblem.equal_blocks`) take equal decisions unless the
    budget forces a difference: the search first decides each class of equal blocks by
    one pattern (the blocks share its variables; the memory rows couple them as before),
    and only when no such schedule is found to fit, by 2, ..., `block_templates` patterns
    (each block assigned one), then every block on its own (the flat model, the reference;
    `block_templates=0` goes there at once). So a phone ships one artifact per distinct
    block unless the budget forces more. On SmolLM2-135M at seq 256 and MeBP's peak
    (`bench/schedule.py --compare-flat`) one pattern predicted 27.9 ms of extra time
    against the flat model's 27.1 ms (+0.22% of the step), solved in 11 s against 38 s.

    Raises BudgetInfeasible only when no schedule fits is proven, and ScheduleNotFound when
    no known schedule fits, the search found none within the limit, and none was proven
    impossible.
    """
    _check_work_limit(work_limit)
    clock = time.perf_counter()
    work = 0.0
    for templates in range(1, block_templates + 1) if problem.equal_blocks else ():
        patterned = _search(problem, budget_bytes, device, work_limit, starts, offload, progress, templates,
                            step_gap)
        if patterned.solution is not None:
            patterned.solution.work += work
            patterned.solution.solve_s = time.perf_counter() - clock
            return patterned.solution
        work += patterned.work
    flat = _search(problem, budget_bytes, device, work_limit, starts, offload, progress, 0, step_gap)
    if flat.solution is not None:
        flat.solution.work += work
        flat.solution.solve_s = time.perf_counter() - clock
        return flat.solution
    work += flat.work
    least = least_budget(problem, device, work_limit=work_limit, starts=starts, offload=offload,
                         progress=progress, block_templates=block_templates)
    if least.model_peak_bytes <= budget_bytes:  # the least-memory search found one that fits
        return Solution(least.decisions, least.objective_s, (flat.bound_ns + flat.base_ns) / NANOS,
                        least.model_peak_bytes, "FEASIBLE (least-memory search)", time.perf_counter() - clock,
                        work + least.work, None, flat.stats, least.templates)
    if flat.infeasible or least.stats["peak_bound_bytes"] > budget_bytes:
        raise BudgetInfeasible(budget_bytes, least.model_peak_bytes, _dominant(problem, least.decisions), least,
                               least_proven=least.status == "OPTIMAL")
    raise ScheduleNotFound(budget_bytes, work_limit, least.model_peak_bytes, least)


@dataclass
class _Search:
    """One least-time search: its solution (None: nothing found and no start fits) and what it proved."""

    solution: Solution | None
    infeasible: bool
    bound_ns: float
    base_ns: int
    work: float
    stats: dict


def _search(problem: SchedulingProblem, budget_bytes: int, device: DeviceProfile, work_limit: float,
            starts: Mapping[str, Mapping[str, Decision]] | None, offload: bool,
            progress: ProgressCallback | None, templates: int, step_gap: float) -> _Search:
    model, var, costs = _build(problem, device, offload, templates)
    _add_memory(model, problem, var, budget_bytes=budget_bytes)
    model.Minimize(costs.total)
    known = known_schedules(problem, starts, offload)
    fitting = [(costs.of(d), name, d) for name, d in known.items()
               if model_peak(problem, d) <= budget_bytes and (not templates or block_patterns(problem, d) <= templates)]
    # The start is the incumbent to beat, not a hint: hinted, CP-SAT stayed at MeBP's decisions
    # (SmolLM2, seq 256, at MeBP's peak: still MeBP's time after 2 units of work, against the
    # optimum within 0.01% unhinted).
    start = min(fitting, key=lambda t: t[0]) if fitting else None  # ties: the first named
    solver = _solver(work_limit)
    if step_gap > 0:
        solver.parameters.absolute_gap_limit = step_gap * costs.base_ns
    reporter = _Reporter(progress, "least time" + _templates_label(templates), costs.base_ns,
                         work_limit, None if start is None else start[0])
    status = reporter.solve(solver, model)
    bound_ns = _finite(solver.BestObjectiveBound(), 0)  # the objective is never negative
    stats = {"variables": _count_variables(var), "checkpoints": len(problem.checkpoints)}
    found = status in (cp_model.OPTIMAL, cp_model.FEASIBLE)
    if found and (start is None or solver.ObjectiveValue() <= start[0]):
        decisions, objective_ns, status_name = _read(solver, var), solver.ObjectiveValue(), solver.StatusName(status)
        if status == cp_model.OPTIMAL and objective_ns > bound_ns:  # CP-SAT calls a search ended by its gap optimal
            status_name = "FEASIBLE (within the step gap)"
    elif start is not None:
        decisions, objective_ns = start[2], start[0]
        status_name = "OPTIMAL" if objective_ns <= bound_ns else f"FEASIBLE (start {start[1]})"
    else:
        return _Search(None, status == cp_model.INFEASIBLE, bound_ns, costs.base_ns, solver.deterministic_time, stats)
    solution = Solution(
        decisions=decisions,
        objective_s=(objective_ns + costs.base_ns) / NANOS,
        bound_s=(min(bound_ns, objective_ns) + costs.base_ns) / NANOS,
        model_peak_bytes=model_peak(problem, decisions),
        status=status_name,
        solve_s=0.0,
        work=solver.deterministic_time,
        start=None if start is None else start[1],
        stats=stats,
        templates=templates,
    )
    return _Search(solution, False, bound_ns, costs.base_ns, solver.deterministic_time, stats)


def least_budget(
    problem: SchedulingProblem, device: DeviceProfile, *, work_limit: float = DEFAULT_WORK_LIMIT,
    starts: Mapping[str, Mapping[str, Decision]] | None = None, offload: bool = True,
    progress: ProgressCallback | None = None, block_templates: int = DEFAULT_BLOCK_TEMPLATES,
) -> Solution:
    """The decisions with the least modelled peak found within `work_limit` (time is ignored).

    `starts` (e.g. {"mebp": MeBP's decisions}) are known low-memory schedules; the search
    starts from the one with the least peak among them and keep-all, so it always returns
    decisions, at worst those. Status OPTIMAL: no decisions have a lower peak. FEASIBLE:
    the limit came first, so the peak is only an upper bound of the least;
    `stats["peak_bound_bytes"]` is the proven lower bound. `objective_s` is the decisions'
    predicted step time, `bound_s` the plain step's.

    With `block_templates`, the least schedule giving equal blocks equal decisions (one
    pattern, as `solve`) is found first; the flat model then starts from it and replaces
    it only by a lower peak, so the bound and status are always the flat model's. The flat
    search is skipped when the tied peak is already `peak_lower_bound`, which no schedule
    goes below. The work limit applies to each search.
    """
    _check_work_limit(work_limit)
    floor = peak_lower_bound(problem)
    if not (block_templates and problem.equal_blocks):
        return _least(problem, device, work_limit, starts, offload, progress, 0, floor)
    clock = time.perf_counter()
    tied = _least(problem, device, work_limit, starts, offload, progress, 1, floor)
    if tied.model_peak_bytes <= floor:  # no schedule, tied or not, holds less
        tied.stats["peak_bound_bytes"], tied.status = tied.model_peak_bytes, "OPTIMAL"
        return tied
    flat = _least(problem, device, work_limit, {"block templates": tied.decisions, **(starts or {})}, offload,
                  progress, 0, floor)
    flat.work += tied.work
    flat.solve_s = time.perf_counter() - clock
    return flat


def _least(problem: SchedulingProblem, device: DeviceProfile, work_limit: float,
           starts: Mapping[str, Mapping[str, Decision]] | None, offload: bool,
           progress: ProgressCallback | None, templates: int, floor: int) -> Solution:
    """One least-memory search; `floor` is `peak_lower_bound(problem)`, what any decisions hold."""
    clock = time.perf_counter()
    model, var, costs = _build(problem, device, offload, templates)
    upper = sum(problem.size.values()) + max((c.fixed_bytes for c in problem.checkpoints), default=0)
    peak_var = model.NewIntVar(0, int(upper), "peak")
    _add_memory(model, problem, var, peak=peak_var)
    model.Minimize(peak_var)
    known = known_schedules(problem, starts, offload)
    name = min(known, key=lambda n: model_peak(problem, known[n]))  # ties: the first named
    hint = known[name]
    _add_hint(model, var, hint)
    model.AddHint(costs.unhidden, costs.unhidden_of(hint))
    model.AddHint(peak_var, model_peak(problem, hint))  # a complete hint: found at once on big graphs
    solver = _solver(work_limit)
    search = "least memory" + _templates_label(templates)
    status = _Reporter(progress, search, 0, work_limit, model_peak(problem, hint)).solve(solver, model)
    decisions = hint
    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        found = _read(solver, var)
        if model_peak(problem, found) < model_peak(problem, hint):  # an equal peak keeps the start
            decisions = found
    peak = model_peak(problem, decisions)
    bound = min(peak, max(floor, int(_finite(solver.BestObjectiveBound(), floor))))
    if peak <= bound:
        status_name = "OPTIMAL"
    else:
        status_name = "FEASIBLE" if decisions is not hint else f"FEASIBLE (start {name})"
    return Solution(decisions, (costs.of(decisions) + costs.base_ns) / NANOS, costs.base_ns / NANOS, peak,
                    status_name, time.perf_counter() - clock, solver.deterministic_time, name,
                    {"variables": _count_variables(var), "checkpoints": len(problem.checkpoints),
                     "peak_bound_bytes": bound}, templates)


def peak_lower_bound(problem: SchedulingProblem) -> int:
    """A lower bound (bytes) of the modelled peak of every schedule the flat model accepts.

    The largest over checkpoints of what any decisions must hold there: the fixed bytes,
    plus each tensor the backward reads at the least it can add to that checkpoint. Such a
    tensor is kept, recomputed or reloaded (exactly one), so where it counts both if kept
    and if brought back it is held whatever is decided; every other term can be zero.
    Each checkpoint is minimised on its own, so this is a relaxation: never above the
    flat model's optimum, and often equal to it when the peak is where the backward starts
    (Gemma-3-4B at seq 256: the least budget itself, which lets `least_budget` skip the
    flat search).
    """
    if not problem.checkpoints:
        return 0
    rows = problem.memory_rows()
    n = len(problem.size)
    sizes = np.array(list(problem.size.values()), dtype=np.int64)
    saved = np.array([v in problem.saved for v in problem.size], dtype=bool)

    def counted(columns: np.ndarray, start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Distinct (checkpoint, tensor) keys of a row layout and how often each is counted."""
        row = np.repeat(np.arange(len(start) - 1, dtype=np.int64), np.diff(start))
        return np.unique(row * n + columns, return_counts=True)

    kept, kept_times = counted(rows.kept, rows.kept_start)
    restored, restored_times = counted(rows.materialized, rows.materialized_start)
    both, i, j = np.intersect1d(kept, restored, assume_unique=True, return_indices=True)
    tensor = both % n
    forced = np.where(saved[tensor], sizes[tensor] * np.minimum(kept_times[i], restored_times[j]), 0)
    held = rows.fixed.copy()
    np.add.at(held, both // n, forced)
    return int(held.max())


def known_schedules(problem: SchedulingProblem, starts: Mapping[str, Mapping[str, Decision]] | None,
                    offload: bool = True) -> dict[str, dict[str, Decision]]:
    """`starts`, each completed (`complete_decisions`), then keep-all: schedules every solve knows."""
    known = {name: complete_decisions(problem, decisions, offload) for name, decisions in (starts or {}).items()}
    known.setdefault(KEEP_ALL, {v: Decision.KEEP for v in problem.saved})
    return known


def complete_decisions(problem: SchedulingProblem, decisions: Mapping[str, Decision],
                       offload: bool = True) -> dict[str, Decision]:
    """`decisions` made into ones the model accepts, each change to KEEP or to a recomputation.

    Tensors the problem does not decide are dropped; a tensor the backward reads that is
    not decided is kept; an offload the model does not allow becomes a keep. A recomputed
    tensor's undecided input is recomputed too when it is first needed no later (as
    `policies.sequence_from_decisions` does), else kept, and so is an input that is
    recomputed or reloaded only for a later segment.
    """
    out = {v: d for v, d in decisions.items() if v in problem.size}
    for v in problem.saved:
        out.setdefault(v, Decision.KEEP)
    for v, d in out.items():
        if d == Decision.OFFLOAD and not (offload and problem.offloadable[v]):
            out[v] = Decision.KEEP
    pending = [v for v, d in out.items() if d == Decision.RECOMPUTE]
    while pending:
        v = pending.pop()
        if out[v] != Decision.RECOMPUTE:
            continue
        for w in problem.needs[v]:
            if w not in out:
                out[w] = Decision.RECOMPUTE if problem.group[w] <= problem.group[v] else Decision.KEEP
                pending.append(w)
            elif out[w] != Decision.KEEP and problem.group[w] > problem.group[v]:
                out[w] = Decision.KEEP
    return out


def model_peak(problem: SchedulingProblem, decisions: Mapping[str, Decision]) -> int:
    """The model's peak for given decisions (an upper bound of what the realised sequence holds)."""
    if not problem.checkpoints:
        return 0
    rows = problem.memory_rows()
    kept = np.zeros(len(problem.size), dtype=np.int64)  # bytes each tensor adds where it counts if kept
    materialized = np.zeros(len(problem.size), dtype=np.int64)  # ... if recomputed or reloaded
    for i, (v, nbytes) in enumerate(problem.size.items()):
        d = decisions.get(v)
        if d == Decision.KEEP:
            kept[i] = nbytes
        elif d in (Decision.RECOMPUTE, Decision.OFFLOAD):
            materialized[i] = nbytes
    held = np.array([problem.size[h.tensor] if any(decisions.get(u) == Decision.RECOMPUTE for u in h.readers) else 0
                     for h in rows.terms], dtype=np.int64)
    totals = (rows.fixed + row_sums(kept, rows.kept, rows.kept_start)
              + row_sums(materialized, rows.materialized, rows.materialized_start)
              + row_sums(held, rows.held, rows.held_start))
    return int(totals.max())


def _held_at(problem: SchedulingProblem, c: Checkpoint, decisions: Mapping[str, Decision]) -> int:
    return c.fixed_bytes + sum(size for _, size in _decided_at(problem, c, decisions))


def _decided_at(problem: SchedulingProblem, c: Checkpoint, decisions: Mapping[str, Decision]) -> list[tuple[str, int]]:
    """(tensor, bytes) of the decided tensors `decisions` hold at checkpoint `c`."""
    held = [v for v in c.kept if decisions.get(v) == Decision.KEEP]
    held += [v for v in c.materialized if decisions.get(v) in (Decision.RECOMPUTE, Decision.OFFLOAD)]
    held += [h.tensor for h in c.for_recomputation if any(decisions.get(u) == Decision.RECOMPUTE for u in h.readers)]
    return [(v, problem.size[v]) for v in held]


def _templates_label(templates: int) -> str:
    return f" ({templates} pattern{'' if templates == 1 else 's'} per block)" if templates else ""


def _count_variables(var) -> int:
    """Distinct decision variables (tied tensors share their template's)."""
    return len({x.Index() for choices in var.values() for x in choices if x is not None})


def _finite(value: float, default: float) -> float:
    return value if math.isfinite(value) else default


def _check_work_limit(work_limit: float) -> None:
    if not work_limit > 0:
        raise ValueError(f"the solver's work limit must be positive, got {work_limit!r}")


@dataclass
class _Costs:
    """The objective in integer nanoseconds, as a CP expression and as a function of decisions."""

    total: cp_model.LinearExpr
    unhidden: cp_model.IntVar  # flash I/O time compute does not hide
    base_ns: int  # base compute time, not part of the CP objective
    recompute_ns: dict[str, int]
    io_ns: dict[str, int]
    hidden_io_ns: int

    def unhidden_of(self, decisions: Mapping[str, Decision]) -> int:
        io = sum(self.io_ns[v] for v, d in decisions.items() if d == Decision.OFFLOAD)
        return max(0, io - self.hidden_io_ns)

    def of(self, decisions: Mapping[str, Decision]) -> int:
        """The CP objective of `decisions`: recomputation plus un-hidden I/O, nanoseconds."""
        recompute = sum(self.recompute_ns[v] for v, d in decisions.items() if d == Decision.RECOMPUTE)
        return recompute + self.unhidden_of(decisions)


def _build(problem: SchedulingProblem, device: DeviceProfile, offload: bool = True, templates: int = 0):
    """The CP model: choice variables per tensor, the recomputation rule, the objective.

    `templates` >= 1 restricts each class of equal blocks to that many decision patterns
    (the templates): with one, the blocks share its variables; with more, each block is
    assigned one of them. 0 leaves every block free (the flat model).
    """
    model = cp_model.CpModel()
    var = {}
    recompute_ns, io_ns = {}, {}
    shared = problem.ties if templates == 1 else {}
    for v in problem.decidable:
        recompute_ns[v] = int(round((problem.compute_s[v] + device.op_overhead_s) * NANOS))
        if offload and problem.offloadable[v]:
            io_ns[v] = int(round(device.offload_s(problem.size[v]) * NANOS))
        if v in shared:
            var[v] = var[shared[v]]
            continue
        k, r = model.NewBoolVar(f"k_{v}"), model.NewBoolVar(f"r_{v}")
        o = model.NewBoolVar(f"o_{v}") if offload and problem.offloadable[v] else None
        choices = [x for x in (k, r, o) if x is not None]
        if v in problem.saved:
            model.AddExactlyOne(choices)
        else:
            model.AddAtMostOne(choices)
        var[v] = (k, r, o)
    if templates >= 2:
        _assign_templates(model, problem, var, templates)
    for v, inputs in problem.needs.items():
        r_v = var[v][1]
        for w in inputs:
            k_w, r_w, o_w = var[w]
            if problem.group[w] <= problem.group[v]:
                model.Add(r_v <= sum(x for x in (k_w, r_w, o_w) if x is not None))
            else:
                model.Add(r_v <= k_w)
    base_ns = int(round(problem.base_compute_s * NANOS))
    hidden_io_ns = int(device.io_overlap * base_ns)
    recompute = sum(c * var[v][1] for v, c in recompute_ns.items())
    io_total = sum(c * var[v][2] for v, c in io_ns.items())
    unhidden = model.NewIntVar(0, sum(io_ns.values()), "unhidden_io")
    model.Add(unhidden >= io_total - hidden_io_ns)
    return model, var, _Costs(recompute + unhidden, unhidden, base_ns, recompute_ns, io_ns, hidden_io_ns)


def _assign_templates(model, problem: SchedulingProblem, var, templates: int) -> None:
    """Each block of a class takes the decisions of one of `templates` patterns.

    Pattern 0 is the class's first block itself (which breaks the patterns' symmetry);
    the others are free variables that only assigned blocks constrain.
    """
    for c, blocks in enumerate(problem.equal_blocks):
        patterns = [[var[t] for t in blocks[0]]]
        for j in range(1, templates):
            patterns.append([tuple(None if x is None else model.NewBoolVar(f"p{c}.{j}_{x.Name()}") for x in choices)
                             for choices in patterns[0]])
        for b, block in enumerate(blocks[1:], 1):
            assigned = [model.NewBoolVar(f"a{c}.{b}.{j}") for j in range(templates)]
            model.AddExactlyOne(assigned)
            for pattern, chosen in zip(patterns, assigned):
                for v, template_choices in zip(block, pattern):
                    for x, y in zip(var[v], template_choices):
                        if x is not None:
                            model.Add(x == y).OnlyEnforceIf(chosen)


def block_patterns(problem: SchedulingProblem, decisions: Mapping[str, Decision]) -> int:
    """The most distinct decision patterns `decisions` give the blocks of one class of equal blocks
    (1: equal blocks decided alike; 0: the problem has no equal blocks)."""
    return max((len({tuple(decisions.get(v) for v in block) for block in blocks}) for blocks in problem.equal_blocks),
               default=0)


def _add_memory(model, problem: SchedulingProblem, var, budget_bytes: int | None = None, peak=None) -> None:
    """Per checkpoint: fixed + sizes x (keep; recompute or offload; held for a recomputation) <= the
    budget (`budget_bytes`), or <= the `peak` variable. A held term has one indicator per distinct
    `HeldForRecomputation`, shared by the checkpoints that count it.

    The rows are written into the model's proto as the expression `... <= budget` would be
    (a term per variable, coefficients of a repeated variable summed, zeros dropped, sorted by
    variable): the same model, without building rows of thousands of terms as expressions.
    """
    rows = problem.memory_rows()
    names = problem.decidable
    sizes = np.array(list(problem.size.values()), dtype=np.int64)
    keep_vars = np.array([var[v][0].Index() for v in names], dtype=np.int64)
    restore_vars, restore_start = [], [0]  # per tensor its recompute and offload variables, flattened
    for v in names:
        restore_vars.extend(x.Index() for x in var[v][1:] if x is not None)
        restore_start.append(len(restore_vars))
    restore_vars = np.array(restore_vars, dtype=np.int64)
    restore_start = np.array(restore_start, dtype=np.int64)
    restore_count = np.diff(restore_start)
    indicators = []
    for h in rows.terms:
        held = model.NewBoolVar(f"h_{h.tensor}_{len(indicators)}")
        for u in h.readers:
            model.Add(held >= var[u][1])
        indicators.append(held.Index())
    indicators = np.array(indicators, dtype=np.int64)
    held_sizes = np.array([problem.size[h.tensor] for h in rows.terms], dtype=np.int64)
    bound = [] if peak is None else [peak.Index()]  # ... - peak <= -fixed

    for c, checkpoint in enumerate(problem.checkpoints):
        kept = rows.kept[rows.kept_start[c]:rows.kept_start[c + 1]]
        restored = rows.materialized[rows.materialized_start[c]:rows.materialized_start[c + 1]]
        held = rows.held[rows.held_start[c]:rows.held_start[c + 1]]
        count = restore_count[restored]
        first = np.repeat(restore_start[restored] - (np.cumsum(count) - count), count)
        restore_at = first + np.arange(len(first), dtype=np.int64)  # each tensor's variables in turn
        variables = np.concatenate([keep_vars[kept], restore_vars[restore_at], indicators[held],
                                    np.array(bound, dtype=np.int64)])
        coefs = np.concatenate([sizes[kept], np.repeat(sizes[restored], count), held_sizes[held],
                                np.full(len(bound), -1, dtype=np.int64)])
        upper = -checkpoint.fixed_bytes if peak is not None else int(budget_bytes) - checkpoint.fixed_bytes
        _add_at_most(model, variables, coefs, upper)


def _add_at_most(model, variables: np.ndarray, coefs: np.ndarray, upper: int) -> None:
    """The constraint sum(coefs x variables) <= upper, as `model.Add` writes it into the proto."""
    order = np.argsort(variables, kind="stable")
    variables, coefs = variables[order], coefs[order]
    if len(variables):
        first = np.flatnonzero(np.concatenate([[True], variables[1:] != variables[:-1]]))
        variables, coefs = variables[first], np.add.reduceat(coefs, first)
        nonzero = coefs != 0
        variables, coefs = variables[nonzero], coefs[nonzero]
    linear = model.proto.constraints.add().linear
    linear.vars.extend(variables.tolist())
    linear.coeffs.extend(coefs.tolist())
    linear.domain.extend([INT64_MIN, upper])


def _add_hint(model, var, hint: Mapping[str, Decision]) -> None:
    hinted = set()
    for v, (k, r, o) in var.items():
        if k.Index() in hinted:  # a tied block's: its template's decision is the hint
            continue
        hinted.add(k.Index())
        d = hint.get(v)
        for x, want in ((k, Decision.KEEP), (r, Decision.RECOMPUTE), (o, Decision.OFFLOAD)):
            if x is not None:
                model.AddHint(x, d == want)


def _solver(work_limit: float) -> cp_model.CpSolver:
    solver = cp_model.CpSolver()
    solver.parameters.max_deterministic_time = float(work_limit)
    solver.parameters.num_workers = 1  # one sequential search: no thread timing in the result
    solver.parameters.random_seed = 0
    # The memory rows are long (thousands of terms each); CP-SAT's presolve spends longer on
    # them than the search needs (SmolLM2, seq 256: proven optimal in ~4 s without it,
    # 6% gap after 20 s with it).
    solver.parameters.cp_model_presolve = False
    return solver


class _Reporter(cp_model.CpSolverSolutionCallback):
    """Turns CP-SAT's solution and bound callbacks into `Progress` reports (none without a callback)."""

    def __init__(self, progress: ProgressCallback | None, search: str, offset: int, work_limit: float,
                 start_objective: float | None) -> None:
        super().__init__()
        self.progress, self.search, self.offset, self.work_limit = progress, search, offset, work_limit
        self.incumbent = start_objective
        self.bound: float | None = None
        self.solutions = 0
        self.clock = time.perf_counter()

    def solve(self, solver: cp_model.CpSolver, model: cp_model.CpModel):
        if self.progress is None:
            return solver.Solve(model)
        self.clock = time.perf_counter()
        solver.best_bound_callback = self.on_bound
        self._report()
        status = solver.Solve(model, self)
        self._report(done=True)
        return status

    def on_solution_callback(self) -> None:
        self.solutions += 1
        if self.incumbent is None or self.objective_value < self.incumbent:
            self.incumbent = self.objective_value
        self._report()

    def on_bound(self, bound: float) -> None:
        self.bound = bound
        self._report()

    def _report(self, done: bool = False) -> None:
        scale = 1 if self.search == "least memory" else 1 / NANOS
        value = (lambda x: None if x is None else (x + self.offset) * scale)
        self.progress(Progress(self.search, value(self.incumbent), value(self.bound), self.solutions,
                               time.perf_counter() - self.clock, self.work_limit, done))


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
    worst = max(problem.checkpoints, key=lambda c: _held_at(problem, c, decisions))
    held = _decided_at(problem, worst, decisions)
    held.append((f"always-held (inputs, gradients, live forward tensors) at step {worst.position}",
                 worst.fixed_bytes))
    return sorted(held, key=lambda kv: -kv[1])
