"""The CP-SAT scheduler: optimal on small DAGs, exact and within budget on real graphs."""

from __future__ import annotations

import dataclasses
import itertools
import subprocess
import sys

import numpy as np
import pytest
import torch

from mebp_compiler.capture import capture
from mebp_compiler.device import DeviceProfile, parse_size
from mebp_compiler.passes.cost import step_cost
from mebp_compiler.passes.liveness import liveness
from mebp_compiler.passes.policies import known_starts, mebp_schedule, none_schedule, optimal_schedule
from mebp_compiler.passes.rewrite import rewrite
from mebp_compiler.passes.scheduler.pareto import pareto_frontier
from mebp_compiler.passes.scheduler.problem import ProblemError, _members_by_event, build_problem
from mebp_compiler.passes.scheduler.solver import (
    BudgetInfeasible,
    ScheduleNotFound,
    complete_decisions,
    block_patterns,
    least_budget,
    model_peak,
    peak_lower_bound,
    solve,
)
from mebp_compiler.passes.scheduler.synthetic import random_layered_dag, transformer_like_dag
from mebp_compiler.runtime import Runtime
from mebp_compiler.schedule import Decision
from tests.conftest import TINY_MODELS, assert_matches_autograd, autograd_reference, lora_model, random_batch

# Slow, synchronous flash: offloading has a price, so the three choices trade off.
DEVICE = dataclasses.replace(DeviceProfile.load("iphone15promax"), io_overlap=0.0,
                             flash_read_bytes_per_s=2e9, flash_write_bytes_per_s=2e9)


def exhaustive_optimum(problem, budget, device) -> float:
    """The model's optimum by trying every assignment (the definition the solver must meet)."""
    choices = [None, Decision.KEEP, Decision.RECOMPUTE, Decision.OFFLOAD]
    best = None
    for combo in itertools.product(choices, repeat=len(problem.decidable)):
        decisions = {v: c for v, c in zip(problem.decidable, combo) if c is not None}
        if any(v not in decisions for v in problem.saved):
            continue
        if not all(
            decisions.get(w) == Decision.KEEP
            or (problem.group[w] <= problem.group[v] and decisions.get(w) in (Decision.RECOMPUTE, Decision.OFFLOAD))
            for v, inputs in problem.needs.items() if decisions.get(v) == Decision.RECOMPUTE for w in inputs
        ):
            continue
        if model_peak(problem, decisions) > budget:
            continue
        io = sum(device.offload_s(problem.size[v]) for v, d in decisions.items() if d == Decision.OFFLOAD)
        cost = sum(problem.compute_s[v] + device.op_overhead_s
                   for v, d in decisions.items() if d == Decision.RECOMPUTE)
        cost += max(0.0, io - device.io_overlap * problem.base_compute_s)
        best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(3))
def test_solver_meets_the_exhaustive_optimum_on_small_dags(seed):
    dag = transformer_like_dag(blocks=2, ops_per_block=4, seed=seed, identical_blocks=seed != 2)
    assert dag.number_of_nodes() <= 60
    problem = build_problem(dag)
    least = least_budget(problem, DEVICE).model_peak_bytes
    everything = model_peak(problem, {v: Decision.KEEP for v in problem.decidable})
    for fraction in (0.0, 0.25, 0.5, 1.0):
        budget = int(least + fraction * (everything - least))
        solution = solve(problem, budget, DEVICE, block_templates=0, step_gap=0)  # the flat model, proven: the reference
        assert solution.status == "OPTIMAL" and solution.gap < 1e-6
        assert solution.model_peak_bytes <= budget
        extra = solution.objective_s - problem.base_compute_s
        assert extra == pytest.approx(exhaustive_optimum(problem, budget, DEVICE), abs=1e-8)


def test_equal_blocks_are_found_by_what_their_tensors_are_and_read():
    """Block 0 reads the weights where blocks 1-3 read the block before, so it stands alone."""
    assert build_problem(transformer_like_dag(blocks=4, seed=0)).equal_blocks == [
        [[f"f{b}_{i}" for i in range(4)] for b in (1, 2, 3)]]
    assert build_problem(transformer_like_dag(blocks=4, seed=0, identical_blocks=False)).equal_blocks == []


@pytest.mark.parametrize("templates", [1, 2])
@pytest.mark.parametrize("seed", range(3))
def test_block_templates_against_the_flat_model_on_small_graphs(seed, templates):
    """Equal blocks decided by `templates` patterns: never better than the flat optimum (a
    restriction), at most that many patterns, and where none fits, the flat model's
    schedule rather than a refusal. The least budget is the flat model's either way."""
    problem = build_problem(transformer_like_dag(blocks=5, ops_per_block=4, seed=seed))
    flat_least = least_budget(problem, DEVICE, block_templates=0)
    assert least_budget(problem, DEVICE, block_templates=templates).model_peak_bytes == flat_least.model_peak_bytes
    everything = model_peak(problem, {v: Decision.KEEP for v in problem.decidable})
    for fraction in (0.0, 0.1, 0.5, 1.0):
        budget = int(flat_least.model_peak_bytes + fraction * (everything - flat_least.model_peak_bytes))
        flat = solve(problem, budget, DEVICE, block_templates=0, step_gap=0)
        patterned = solve(problem, budget, DEVICE, block_templates=templates, step_gap=0)
        assert patterned.model_peak_bytes <= budget
        assert patterned.objective_s >= flat.objective_s - 1e-12
        if patterned.templates:
            assert block_patterns(problem, patterned.decisions) <= templates
        else:
            assert patterned.objective_s == pytest.approx(flat.objective_s, abs=1e-12)


@pytest.mark.parametrize("seed", range(8))
def test_the_peak_lower_bound_is_never_above_the_flat_models_proven_least(seed):
    """`peak_lower_bound` lets the least-memory search stop without the flat search, so it must
    be a true bound: at least what is always held, at most the flat model's proven least
    (on small graphs also the exhaustive least), on transformer-like and random layered DAGs.
    Where every saved tensor may be offloaded it is the least (offloading them all holds at
    each checkpoint only what every schedule holds there); keep / recompute only, it is
    it can be strictly below (next test)."""
    dags = [transformer_like_dag(blocks=2 + seed % 4, ops_per_block=3 + seed % 3, seed=seed,
                                 identical_blocks=seed % 3 != 2),
            random_layered_dag(layers=4 + seed % 4, width=3, seed=seed)]
    for dag in dags:
        problem = build_problem(dag)
        bound = peak_lower_bound(problem)
        assert bound >= max(c.fixed_bytes for c in problem.checkpoints)
        for offload in (True, False):
            flat = least_budget(problem, DEVICE, block_templates=0, offload=offload)
            assert flat.status == "OPTIMAL" and bound <= flat.model_peak_bytes
            assert least_budget(problem, DEVICE, offload=offload).model_peak_bytes == flat.model_peak_bytes
            if offload:
                assert bound == flat.model_peak_bytes
    small = build_problem(transformer_like_dag(blocks=2, ops_per_block=3, seed=seed))
    exhaustive = min(model_peak(small, dict(zip(small.decidable, combo)))
                     for combo in itertools.product([Decision.KEEP, Decision.RECOMPUTE, Decision.OFFLOAD],
                                                    repeat=len(small.decidable)))
    assert peak_lower_bound(small) <= exhaustive


def test_the_peak_lower_bound_is_below_the_least_when_nothing_is_offloaded():
    """Keep / recompute only, a recomputation needs its inputs held: the bound, each checkpoint
    minimised alone, is then strictly below the least, and the flat search still proves it."""
    problem = build_problem(transformer_like_dag(blocks=3, ops_per_block=4, seed=1))
    least = least_budget(problem, DEVICE, offload=False)
    assert least.status == "OPTIMAL" and peak_lower_bound(problem) < least.model_peak_bytes
    assert least.model_peak_bytes == least_budget(problem, DEVICE, block_templates=0, offload=False).model_peak_bytes


def test_solver_refuses_an_infeasible_budget_naming_the_least():
    problem = build_problem(transformer_like_dag(seed=1))
    least = least_budget(problem, DEVICE).model_peak_bytes
    with pytest.raises(BudgetInfeasible) as info:
        solve(problem, least - 1, DEVICE)
    assert info.value.least_budget_bytes == least and info.value.least_proven
    assert f"({least} bytes)" in str(info.value)
    assert solve(problem, least, DEVICE).model_peak_bytes <= least


def test_the_least_budget_does_not_depend_on_the_start_point(captured):
    from mebp_compiler.passes.policies import scheduling_problem

    _, _, graph, _ = captured
    problem = scheduling_problem(graph, DEVICE)
    plain = least_budget(problem, DEVICE, work_limit=10)
    from_mebp = least_budget(problem, DEVICE, work_limit=10, starts=known_starts(graph, problem))
    assert plain.status == from_mebp.status == "OPTIMAL"
    assert from_mebp.model_peak_bytes == plain.model_peak_bytes


def test_mebp_is_a_start_the_model_accepts_at_its_own_peak(captured):
    """MeBP's decisions, taken to the storages the solver decides, hold in the model what MeBP
    holds; keep-all holds what `none` does."""
    from mebp_compiler.passes.policies import scheduling_problem

    _, _, graph, _ = captured
    problem = scheduling_problem(graph, DEVICE)
    mebp = complete_decisions(problem, known_starts(graph, problem)["mebp"])
    assert model_peak(problem, mebp) == liveness(rewrite(graph, mebp_schedule(graph))).peak_bytes
    keep_all = {v: Decision.KEEP for v in problem.saved}
    assert model_peak(problem, keep_all) == liveness(rewrite(graph, none_schedule(graph))).peak_bytes


def test_a_step_result_is_never_paged_out(captured):
    """A result (the loss, which every fused update reads) is held to the step's end in the model
    anyway, so paging it out saves nothing; reloaded at the end it would be no stage's output
    (the partition of a fused `optimal` plan at its least budget failed on one)."""
    from mebp_compiler.passes.fuse_update import fuse_lora_update
    from mebp_compiler.passes.policies import scheduling_problem

    fused = fuse_lora_update(captured[2])
    problem = scheduling_problem(fused, DEVICE)
    results = {n.name for n in fused.module.graph.output_node().all_input_nodes}
    assert results & set(problem.offloadable), "the loss is decidable: the updates read it in the backward"
    assert not any(problem.offloadable[v] for v in results & set(problem.offloadable))


def keep_all_liveness_peak(dag) -> int:
    """What keep-all holds at its peak on a plain DAG: inputs always, every other tensor from
    the step that makes it to its last reader (or the end, for an output)."""
    steps = [n for n in dag.nodes if dag.nodes[n]["phase"] != "input"]
    position = {n: i for i, n in enumerate(steps)}
    held = [sum(dag.nodes[n]["size_bytes"] for n in dag.nodes if dag.nodes[n]["phase"] == "input")] * len(steps)
    for n in steps:
        last = len(steps) - 1 if dag.nodes[n].get("output") else max(position[u] for u in [n, *dag.successors(n)])
        for t in range(position[n], last + 1):
            held[t] += dag.nodes[n]["size_bytes"]
    return max(held)


@pytest.mark.parametrize("seed", range(16))
def test_keep_all_is_modelled_as_liveness_holds_it_on_random_layered_graphs(seed):
    """A kept tensor counts until its last real reader: a forward reader that is itself kept
    does not stretch it to that reader's segment (it did, by 5% on seed 2)."""
    dag = random_layered_dag(seed=seed)
    problem = build_problem(dag)
    assert model_peak(problem, {v: Decision.KEEP for v in problem.saved}) == keep_all_liveness_peak(dag)
    least = least_budget(problem, DEVICE)
    assert least.model_peak_bytes <= keep_all_liveness_peak(dag)
    solution = solve(problem, least.model_peak_bytes, DEVICE)
    assert solution.model_peak_bytes <= least.model_peak_bytes


# Large enough that 0.02 units of work stop CP-SAT before it proves an optimum (~1 s a solve).
UNPROVEN = dict(blocks=16, ops_per_block=24, seed=3, identical_blocks=False)


def keep_all(problem):
    return {v: Decision.KEEP for v in problem.saved}


@pytest.mark.parametrize("seed", range(3))
def test_a_search_stopped_at_its_step_gap_is_that_close_to_the_proven_optimum(seed):
    problem = build_problem(transformer_like_dag(blocks=3, ops_per_block=5, seed=seed))
    budget = (least_budget(problem, DEVICE).model_peak_bytes + model_peak(problem, keep_all(problem))) // 2
    proven = solve(problem, budget, DEVICE, step_gap=0)
    assert proven.status == "OPTIMAL" and proven.gap < 1e-6
    for step_gap in (0.2, 0.02):
        early = solve(problem, budget, DEVICE, step_gap=step_gap)
        assert early.model_peak_bytes <= budget
        assert proven.objective_s - 1e-12 <= early.objective_s <= proven.objective_s + step_gap * problem.base_compute_s


def test_a_solve_cut_by_its_work_limit_returns_the_same_schedule_under_load():
    """The limit is CP-SAT's deterministic time, not the clock: two busy processes change nothing."""
    problem = build_problem(transformer_like_dag(**UNPROVEN))
    budget = model_peak(problem, keep_all(problem)) // 2
    quiet = solve(problem, budget, DEVICE, work_limit=0.02, step_gap=0)
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        loaded = solve(problem, budget, DEVICE, work_limit=0.02, step_gap=0)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert quiet.status == "FEASIBLE" and quiet.gap > 0  # the limit, not a proof, ended the search
    assert loaded.decisions == quiet.decisions
    assert (loaded.objective_s, loaded.bound_s, loaded.work) == (quiet.objective_s, quiet.bound_s, quiet.work)


def test_a_solve_with_a_fitting_start_returns_a_schedule_however_small_the_limit():
    problem = build_problem(transformer_like_dag(**UNPROVEN))
    first_block = {v: Decision.RECOMPUTE for v in problem.saved if v.startswith("f0_")}
    start = complete_decisions(problem, first_block)
    budget = model_peak(problem, start)
    assert budget < model_peak(problem, keep_all(problem))  # keep-all does not fit: the named start is the one
    solution = solve(problem, budget, DEVICE, work_limit=1e-9, starts={"block 0 recomputed": first_block})
    assert solution.start == "block 0 recomputed" and solution.status.startswith("FEASIBLE")
    assert solution.model_peak_bytes <= budget
    recompute = sum(problem.compute_s[v] + DEVICE.op_overhead_s for v, d in start.items() if d == Decision.RECOMPUTE)
    assert solution.objective_s <= problem.base_compute_s + recompute + 1e-9
    assert problem.base_compute_s <= solution.bound_s <= solution.objective_s


def test_below_every_known_schedule_an_unproven_budget_is_reported_as_such():
    problem = build_problem(transformer_like_dag(**UNPROVEN))
    everything = model_peak(problem, keep_all(problem))
    with pytest.raises(ScheduleNotFound) as info:
        solve(problem, everything // 2, DEVICE, work_limit=1e-9)
    assert info.value.least_known_bytes == everything
    message = str(info.value)
    assert "did not prove" in message and "--work-limit" in message and f"({everything} bytes)" in message
    assert "\n" not in message
    always_held = max(c.fixed_bytes for c in problem.checkpoints)
    with pytest.raises(BudgetInfeasible) as proven:  # below what is always held: proven without search
        solve(problem, always_held - 1, DEVICE, work_limit=1e-9)
    assert not proven.value.least_proven and "least budget found to fit" in str(proven.value)


def test_progress_reports_the_incumbent_and_the_bound_as_the_search_goes():
    problem = build_problem(transformer_like_dag(**UNPROVEN))
    reports = []
    solution = solve(problem, model_peak(problem, keep_all(problem)) // 2, DEVICE, work_limit=0.02,
                     progress=reports.append)
    assert [r.done for r in reports].count(True) == 1 and reports[-1].done
    assert {r.search for r in reports} == {"least time"} and reports[-1].solutions >= 1
    assert reports[-1].incumbent == pytest.approx(solution.objective_s)
    incumbents = [r.incumbent for r in reports if r.incumbent is not None]
    assert incumbents == sorted(incumbents, reverse=True)
    assert all(r.bound <= r.incumbent for r in reports if r.bound is not None and r.incumbent is not None)
    assert "gap" in reports[-1].describe() and reports[-1].describe().endswith("done")


def test_the_old_time_limit_still_works_with_a_deprecation_warning():
    import mebp_compiler

    model = lora_model("tiny-llama")
    batch = random_batch(model.config.vocab_size, seq=16)
    with pytest.warns(DeprecationWarning, match="work_limit"):
        plan = mebp_compiler.compile(model, batch, "optimal", budget="1GB", time_limit_s=3)
    assert plan.schedule.stats["work_limit"] == 3


def test_the_cli_says_in_one_line_when_no_schedule_was_found_within_the_work_limit(tmp_path, capsys):
    from mebp_compiler.app import models
    from mebp_compiler.app.cli import main
    from mebp_compiler.passes.policies import least_memory
    from mebp_compiler.plan import optimizer_state_bytes

    model = models.add_lora(models.load("tiny-llama", device="meta"), models.LoraSettings(r=16, alpha=32))
    ids = torch.zeros((1, 16), dtype=torch.int64, device="meta")
    # MLP chunks: without them `peak_lower_bound` proves the least at once, and every budget is decided
    graph = capture(model, {"input_ids": ids, "labels": ids}, mlp_chunks=2)  # what `mebp compile` schedules
    least = least_memory(graph, DeviceProfile.load("iphone15promax"), work_limit=1e-9)
    assert least.status != "OPTIMAL"
    budget = (least.stats["peak_bound_bytes"] + least.model_peak_bytes) // 2 + optimizer_state_bytes(model, "adamw")
    args = ["compile", "--model", "tiny-llama", "--seq-len", "16", "--mlp-chunks", "2", "--budget", str(budget),
            "-o", str(tmp_path)]
    assert main([*args, "--work-limit", "1e-9"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "did not prove" in err[-1] and "--work-limit" in err[-1]
    assert not any("Traceback" in line for line in err)


@pytest.mark.parametrize("seed", range(4))
def test_model_peak_from_index_arrays_is_the_largest_checkpoint_sum(seed):
    """model_peak (index arrays of the checkpoints) against each checkpoint's terms summed one by one."""
    import random

    from mebp_compiler.passes.scheduler.solver import _held_at

    problem = build_problem(random_layered_dag(layers=5, width=3, seed=seed))
    rng = random.Random(seed)
    for _ in range(20):
        decisions = {v: rng.choice(list(Decision)) for v in problem.decidable if rng.random() < 0.9}
        assert model_peak(problem, decisions) == max(_held_at(problem, c, decisions) for c in problem.checkpoints)


@pytest.mark.parametrize("peak", [False, True])
def test_a_memory_row_is_written_as_model_add_writes_it(peak):
    """Repeated variables summed, zero coefficients dropped, sorted by variable; <= a budget or a peak."""
    from ortools.sat.python import cp_model

    from mebp_compiler.passes.scheduler.solver import _add_at_most

    models = []
    for direct in (False, True):
        model = cp_model.CpModel()
        xs = [model.NewBoolVar(f"x{i}") for i in range(6)]
        top = model.NewIntVar(0, 10**9, "peak") if peak else None
        picks, coefs, fixed = [4, 1, 4, 0, 5, 2], [7, 3, 5, 0, 11, 2], 13
        if direct:
            extra = [top.Index()] if peak else []
            _add_at_most(model, np.array([xs[i].Index() for i in picks] + extra, dtype=np.int64),
                         np.array(coefs + [-1] * len(extra), dtype=np.int64), -fixed if peak else 100 - fixed)
        else:
            model.Add(cp_model.LinearExpr.WeightedSum([xs[i] for i in picks], coefs) + fixed <= (top if peak else 100))
        models.append(str(model.proto))
    assert models[0] == models[1]


def test_a_dag_out_of_order_is_refused():
    dag = transformer_like_dag()
    reordered = type(dag)()
    reordered.add_nodes_from(reversed(list(dag.nodes(data=True))))
    reordered.add_edges_from(dag.edges)
    with pytest.raises(ProblemError, match="execution"):
        build_problem(reordered)


def test_human_sizes():
    assert parse_size("300MB") == 300_000_000
    assert parse_size("1GiB") == 2**30
    assert parse_size("1.5 GB") == 1_500_000_000
    with pytest.raises(ValueError, match="300MB"):
        parse_size("lots")


@pytest.fixture(scope="module", params=TINY_MODELS)
def captured(request):
    model = lora_model(request.param)
    batch = random_batch(model.config.vocab_size, seq=32)
    return model, batch, capture(model, batch), autograd_reference(model, batch)


def run(graph, model, batch, tmp_path):
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    inputs = [batch[s.source] if s.role.value == "batch" else state[s.source] for s in graph.inputs]
    return Runtime(graph, str(tmp_path)).run(inputs)


@pytest.mark.parametrize("offload", [False, True])
def test_every_budget_in_a_sweep_is_exact_and_held(captured, offload, tmp_path):
    model, batch, graph, reference = captured
    none_peak = liveness(rewrite(graph, none_schedule(graph))).peak_bytes
    with pytest.raises(BudgetInfeasible) as info:
        optimal_schedule(graph, 0, DEVICE, work_limit=5, offload=offload)
    least = info.value.least_budget_bytes
    for budget in sorted({least, (least + none_peak) // 2, none_peak}):
        schedule = optimal_schedule(graph, budget, DEVICE, work_limit=5, offload=offload)
        if not offload:
            assert not schedule.tensors_with(Decision.OFFLOAD)
        rewritten = rewrite(graph, schedule)
        predicted = liveness(rewritten).peak_bytes
        result = run(rewritten, model, batch, tmp_path)
        assert_matches_autograd(result, reference)
        assert result.held_peak_bytes <= budget
        assert abs(result.held_peak_bytes - predicted) <= 0.02 * predicted


def test_the_solver_recomputes_lora_down_projections_under_a_tight_budget(captured):
    """MeSP's observation: x @ A is rank-r and cheap to recompute; the solver finds it by itself.

    At the least feasible budget the peak lies in block 0's backward (every other block's
    LoRA gradients are held by then); there the x @ A products the backward reads after
    the peak (q, k, v, o, gate, up) are recomputed, not kept.
    """
    _, _, graph, _ = captured
    with pytest.raises(BudgetInfeasible) as info:
        optimal_schedule(graph, 0, DEVICE, work_limit=5, offload=False)
    schedule = optimal_schedule(graph, info.value.least_budget_bytes, DEVICE, work_limit=5, offload=False)
    rewritten = rewrite(graph, schedule)
    profile = liveness(rewritten)
    assert rewritten.info[profile.order[profile.peak_step]].block == 0
    lora_a = {graph.info[name].module.split(".")[-3]: decision for name, decision in schedule.decisions.items()
              if graph.info[name].block == 0 and ".lora_A." in graph.info[name].module
              and graph.node(name).target == torch.ops.aten.mm.default}
    assert {p: lora_a[p] for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")} == dict.fromkeys(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"), Decision.RECOMPUTE)


def test_optimal_beats_mebp_at_its_own_peak(captured):
    _, _, graph, _ = captured
    mebp = mebp_schedule(graph)
    mebp_peak = liveness(rewrite(graph, mebp)).peak_bytes
    optimal = optimal_schedule(graph, mebp_peak, DEVICE, work_limit=5)
    assert step_cost(graph, optimal, DEVICE).extra_s < step_cost(graph, mebp, DEVICE).extra_s


def test_pareto_frontier_spans_least_to_none_with_fixed_policies_marked():
    model = lora_model("tiny-llama")
    graph = capture(model, random_batch(model.config.vocab_size, seq=32))
    device = DeviceProfile.load("iphone15promax")
    points = pareto_frontier(graph, device, points=3, work_limit=5)
    assert [p.policy for p in points] == ["optimal", "optimal", "optimal", "none", "mebp"]
    optimal, none, mebp = points[:3], points[3], points[4]
    assert all(p.predicted_peak_bytes <= p.budget_bytes for p in optimal)
    assert optimal[0].budget_bytes <= mebp.predicted_peak_bytes
    assert optimal[-1].budget_bytes == none.predicted_peak_bytes
    assert optimal[-1].extra_time_s <= none.extra_time_s + 1e-4  # at none's peak nothing need be recomputed
    assert optimal[0].extra_time_s <= mebp.extra_time_s


@pytest.mark.parametrize("seed", range(20))
def test_members_by_event_says_which_consecutive_member_sets_contain_each_other(seed):
    """The grows/shrinks flags read off the runs equal comparing the member sets (empty runs among them)."""
    rng = np.random.default_rng(seed)
    events = sorted(set(rng.integers(0, 40, size=12).tolist()))
    tensors = [f"t{k}" for k in range(15)]
    first = {v: int(rng.integers(-2, 42)) for v in tensors}
    last = {v: first[v] + int(rng.integers(-5, 20)) for v in tensors}
    members, grows, shrinks = _members_by_event(events, tensors, first, last)
    assert members == [[v for v in tensors if first[v] <= e <= last[v]] for e in events]
    assert grows == [set(a) <= set(b) for a, b in zip(members, members[1:])]
    assert shrinks == [set(b) <= set(a) for a, b in zip(members, members[1:])]
