"""Fixed scheduling policies, and the sequence that realises any set of decisions.

- `none`: keep every tensor the backward reads (plain autograd's memory).
- `optimal`: the scheduler's least-time keep / recompute / offload decisions under a
  hard memory budget (`passes.scheduler`).
- `mebp`: keep only what crosses a transformer-block boundary (each block's input, and
  tensors computed outside the blocks); recompute everything else inside a block just
  before the backward needs it (MeBP, Song & Tang 2025, block-level checkpointing).
  With `checkpoints="disk"` the kept block boundaries go to memory-mapped files instead of
  RAM (MeBP's memory-mapped checkpoints).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Literal

import torch.fx as fx

from mebp_compiler.device import DeviceProfile
from mebp_compiler.ir import Phase, Role, TrainingGraph, collects_new_objects_only
from mebp_compiler.passes.liveness import liveness
from mebp_compiler.passes.rewrite import rewrite
from mebp_compiler.passes.scheduler.from_graph import training_dag
from mebp_compiler.passes.scheduler.problem import SchedulingProblem, build_problem
from mebp_compiler.passes.scheduler.solver import (
    DEFAULT_BLOCK_TEMPLATES,
    DEFAULT_STEP_GAP,
    DEFAULT_WORK_LIMIT,
    BudgetInfeasible,
    ProgressCallback,
    ScheduleNotFound,
    Solution,
    block_patterns,
    least_budget,
    solve,
)
from mebp_compiler.schedule import Decision, Schedule, Step, StepKind


def none_schedule(graph: TrainingGraph) -> Schedule:
    """Keep everything the backward reads: the memory of plain autograd."""
    decisions = {name: Decision.KEEP for name in graph.saved_activations()}
    return Schedule("none", decisions, sequence_from_decisions(graph, decisions))


def mebp_schedule(graph: TrainingGraph, checkpoints: Literal["ram", "disk"] = "ram") -> Schedule:
    """MeBP's block checkpointing: keep block boundaries, recompute each block in the backward."""
    decisions = mebp_decisions(graph, checkpoints)
    return Schedule(f"mebp-{checkpoints}" if checkpoints == "disk" else "mebp", decisions,
                    sequence_from_decisions(graph, decisions))


def mebp_decisions(graph: TrainingGraph, checkpoints: Literal["ram", "disk"] = "ram") -> dict[str, Decision]:
    """The per-tensor decisions of `mebp_schedule` (block boundaries kept or offloaded, the rest recomputed)."""
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
    return decisions


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
    """The execution sequence that realises `decisions`.

    The forward runs as traced; an offloaded tensor is written right after it is
    produced. The backward runs as traced, in segments (runs of ops of one transformer
    block, or of none, and of one MLP chunk within it: `TensorInfo.segment`). Before a segment's first op comes its restore phase: every
    recomputed or offloaded forward tensor whose first backward use lies in the segment
    is brought back, all of them together in forward order - reloaded if offloaded, else
    recomputed with the inputs they lack (MeBP's "recompute the block just before its
    backward"; the order the scheduler's restore phases model).
    Anything else a backward op still lacks (views, mostly) is rebuilt right before it; so
    is a recomputed decompressed weight, which the restore phase drops after use.
    """
    info = graph.info
    nodes = [n for n in graph.module.graph.nodes if n.op == "call_function"]
    position = {n.name: k for k, n in enumerate(nodes)}
    sequence: list[Step] = []
    for node in nodes:
        if info[node.name].phase != Phase.FORWARD:
            continue
        sequence.append(Step(StepKind.COMPUTE, node.name))
        if decisions.get(node.name) == Decision.OFFLOAD:
            sequence.append(Step(StepKind.OFFLOAD, node.name))

    backward = [n for n in nodes if info[n.name].phase == Phase.BACKWARD]
    run_of, runs = {}, 0
    for i, node in enumerate(backward):
        if i == 0 or info[node.name].segment != info[backward[i - 1].name].segment:
            runs += 1
        run_of[node.name] = runs
    restore: dict[int, list[fx.Node]] = defaultdict(list)
    by_name = {n.name: n for n in nodes}
    dequantized = {n.name for n in nodes if info[n.name].role == Role.DEQUANTIZED}
    for node in nodes:
        if decisions.get(node.name) == Decision.RECOMPUTE and _storage_root(node, info).name in dequantized:
            continue  # decompressed just in time, see below
        if decisions.get(node.name) in (Decision.RECOMPUTE, Decision.OFFLOAD):
            first = _first_backward_use(node, info, run_of)
            if first is not None:
                restore[first].append(node)

    ready = {name for name, d in decisions.items() if d == Decision.KEEP}
    previous_run = None
    for node in backward:
        if run_of[node.name] != previous_run:
            previous_run = run_of[node.name]
            restore_start = len(sequence)
            _bring_back(restore[previous_run], info, decisions, ready, sequence, position)
            # A weight decompressed to recompute the segment's activations is dropped after
            # that (with its views), and decompressed again right before the backward op
            # that reads it.
            ready -= {step.tensor for step in sequence[restore_start:] if step.kind == StepKind.RECOMPUTE
                      and _storage_root(by_name[step.tensor], info).name in dequantized}
        for arg in node.all_input_nodes:
            _bring_back([arg], info, decisions, ready, sequence, position)
        sequence.append(Step(StepKind.COMPUTE, node.name))
        ready.add(node.name)
    return sequence


def _storage_root(node: fx.Node, info) -> fx.Node:
    """The node that allocated the storage `node`'s value refers to (itself unless it is a view)."""
    while info[node.name].is_view and node.all_input_nodes:
        node = node.all_input_nodes[info[node.name].output_alias[0]]
    return node


def _first_backward_use(node: fx.Node, info, run_of: dict[str, int]) -> int | None:
    """The backward run that first reads `node`, directly or through forward views of it."""
    runs = []
    stack = [node]
    while stack:
        current = stack.pop()
        for user in current.users:
            ti = info.get(user.name)
            if ti is None:
                continue
            if ti.phase == Phase.BACKWARD:
                runs.append(run_of[user.name])
            elif ti.is_view:
                stack.append(user)
    return min(runs, default=None)


def _bring_back(roots: list[fx.Node], info, decisions, ready: set[str], sequence: list[Step],
                position: dict[str, int]) -> None:
    """Emit the steps that make forward tensors `roots` available to the backward.

    What they lack is found first and then brought back together in forward order, not
    root by root nor in the order a depth-first walk meets it: a streamed LM head's
    log-sum-exp and target logit both read every vocabulary slice's logits, and restoring
    one after the other would hold all slices' logits at once, where the forward's order
    holds one slice's.
    """
    missing: dict[str, fx.Node] = {}
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node.name in ready or node.name in missing or info[node.name].phase != Phase.FORWARD:
            continue
        missing[node.name] = node
        if decisions.get(node.name) != Decision.OFFLOAD:
            stack.extend(node.all_input_nodes)
    for name in sorted(missing, key=position.__getitem__):
        kind = StepKind.RELOAD if decisions.get(name) == Decision.OFFLOAD else StepKind.RECOMPUTE
        sequence.append(Step(kind, name))
        ready.add(name)


@collects_new_objects_only
def scheduling_problem(graph: TrainingGraph, device: DeviceProfile) -> SchedulingProblem:
    """The scheduler's problem for a captured graph (build once, solve for many budgets)."""
    return build_problem(training_dag(graph, device))


@collects_new_objects_only
def optimal_schedule(
    graph: TrainingGraph,
    budget_bytes: int,
    device: DeviceProfile,
    *,
    work_limit: float = DEFAULT_WORK_LIMIT,
    offload: bool = True,
    problem: SchedulingProblem | None = None,
    reserved_bytes: int = 0,
    progress: ProgressCallback | None = None,
    block_templates: int = DEFAULT_BLOCK_TEMPLATES,
    step_gap: float = DEFAULT_STEP_GAP,
) -> Schedule:
    """Least predicted step time whose peak (all roles, as `liveness` counts it) plus
    `reserved_bytes` (held outside the graph, e.g. optimizer state) fits `budget_bytes`.

    The search falls back on MeBP's decisions (RAM or disk checkpoints) or keep-all, the
    fastest that fits, and returns the best schedule found within `work_limit` (CP-SAT
    deterministic time, `passes.scheduler.solver`); `stats` carry its predicted time, the
    proven bound and the gap. Raises `BudgetInfeasible` when no schedule fits is proven,
    naming the least budget the scheduler can meet and the tensors live at that schedule's
    peak, and `ScheduleNotFound` when the budget is below every known schedule and the
    search neither found one nor proved there is none. `problem` may be passed to skip
    rebuilding it; `progress` is called as the search goes. Equal blocks take equal
    decisions unless the budget forces up to `block_templates` patterns, or the flat
    model (`solve`); `stats["block_patterns"]` says how many the schedule has. The search stops
    once proven within `step_gap` x the plain step's predicted time of the optimum (0: proven optimal).
    """
    problem = problem or scheduling_problem(graph, device)
    try:
        solution = solve(problem, budget_bytes - reserved_bytes, device, work_limit=work_limit,
                         starts=known_starts(graph, problem, offload), offload=offload, progress=progress,
                         block_templates=block_templates, step_gap=step_gap)
    except BudgetInfeasible as exc:
        least = exc.least
        profile = liveness(rewrite(graph, Schedule("least", least.decisions,
                                                   sequence_from_decisions(graph, least.decisions))))
        dominated = [(s.owner, s.nbytes) for s in profile.live_at_peak]
        if reserved_bytes:
            dominated = sorted([*dominated, ("optimizer state", reserved_bytes)], key=lambda kv: -kv[1])
        raise BudgetInfeasible(budget_bytes, exc.least_budget_bytes + reserved_bytes, dominated, least,
                               exc.least_proven) from None
    except ScheduleNotFound as exc:
        if not reserved_bytes:
            raise
        raise ScheduleNotFound(budget_bytes, work_limit, exc.least_known_bytes + reserved_bytes, exc.least) from None
    decisions = _with_kept_views(graph, solution.decisions)
    schedule = Schedule(
        "optimal", decisions, sequence_from_decisions(graph, decisions),
        stats={"budget_bytes": budget_bytes, "reserved_bytes": reserved_bytes, "model_time_s": solution.objective_s,
               "bound_s": solution.bound_s, "gap": solution.gap, "solver_status": solution.status,
               "solver_start": solution.start, "work": solution.work, "work_limit": work_limit,
               "solve_s": solution.solve_s, "model_peak_bytes": solution.model_peak_bytes,
               "block_patterns": block_patterns(problem, solution.decisions),
               "device": device.name},
    )
    peak = liveness(rewrite(graph, schedule)).peak_bytes + reserved_bytes
    if peak > budget_bytes:
        raise AssertionError(f"scheduler bug: realised peak {peak} exceeds the budget {budget_bytes} "
                             f"although the model promised {solution.model_peak_bytes}")
    return schedule


def known_starts(graph: TrainingGraph, problem: SchedulingProblem,
                 offload: bool = True) -> dict[str, dict[str, Decision]]:
    """Known schedules for the solver to fall back on, as decisions on the problem's
    storages: MeBP's, and with its checkpoints on disk too when offloading is allowed (the
    solver adds keep-all itself)."""
    starts = {"mebp": _storage_decisions(graph, problem, mebp_decisions(graph))}
    if offload:
        starts["mebp-disk"] = _storage_decisions(graph, problem, mebp_decisions(graph, "disk"))
    return starts


def _storage_decisions(graph: TrainingGraph, problem: SchedulingProblem,
                       decisions: dict[str, Decision]) -> dict[str, Decision]:
    """Decisions on fx tensors (views among them) as decisions on the storages the solver decides.

    A storage takes its own decision, else its views'; keeping any view keeps the storage.
    """
    out = {name: d for name, d in decisions.items() if name in problem.size}
    for name, d in decisions.items():
        root = graph.node(name)
        while root.name not in problem.size and graph.info[root.name].is_view and root.all_input_nodes:
            root = root.all_input_nodes[graph.info[root.name].output_alias[0]]
        if root.name in problem.size and root.name not in decisions:
            out[root.name] = Decision.KEEP if Decision.KEEP in (d, out.get(root.name)) else d
    return out


def _with_kept_views(graph: TrainingGraph, decisions: dict[str, Decision]) -> dict[str, Decision]:
    """Also keep the forward views the backward reads whose storage is kept (or is an input).

    The solver decides per storage; a view of a held storage costs no memory, and keeping
    it saves rebuilding it in the backward.
    """
    out = dict(decisions)
    for view in graph.saved_activations():
        root = graph.node(view)
        while root.name not in decisions and graph.info[root.name].is_view:
            root = root.all_input_nodes[graph.info[root.name].output_alias[0]]
        held = decisions.get(root.name) == Decision.KEEP or graph.info[root.name].phase == Phase.INPUT
        if root.name != view and held:
            out[view] = Decision.KEEP
    return out


@collects_new_objects_only
def least_memory(
    graph: TrainingGraph,
    device: DeviceProfile,
    *,
    work_limit: float = DEFAULT_WORK_LIMIT,
    offload: bool = True,
    problem: SchedulingProblem | None = None,
    progress: ProgressCallback | None = None,
) -> Solution:
    """The least-memory decisions found within `work_limit`, starting from MeBP's or keep-all.

    Status OPTIMAL: proven least; otherwise `stats["peak_bound_bytes"]` is the proven
    lower bound. `model_peak_bytes` is a budget `optimal_schedule` meets either way (the
    same search runs there when nothing better is known).
    """
    problem = problem or scheduling_problem(graph, device)
    return least_budget(problem, device, work_limit=work_limit, offload=offload,
                        starts=known_starts(graph, problem, offload), progress=progress)


def least_feasible_budget(
    graph: TrainingGraph,
    device: DeviceProfile,
    *,
    work_limit: float = DEFAULT_WORK_LIMIT,
    offload: bool = True,
    problem: SchedulingProblem | None = None,
) -> int:
    """The least budget (bytes, whole step) found for which `optimal_schedule` returns a schedule.

    Proven least unless the work limit came first (`least_memory(...).status` tells).
    """
    return least_memory(graph, device, work_limit=work_limit, offload=offload, problem=problem).model_peak_bytes
