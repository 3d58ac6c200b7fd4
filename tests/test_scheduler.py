"""The CP-SAT scheduler: optimal on small DAGs, exact and within budget on real graphs."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from mebp_compiler.capture import capture
from mebp_compiler.device import DeviceProfile, parse_size
from mebp_compiler.passes.cost import step_cost
from mebp_compiler.passes.liveness import liveness
from mebp_compiler.passes.policies import mebp_schedule, none_schedule, optimal_schedule
from mebp_compiler.passes.rewrite import rewrite
from mebp_compiler.passes.schedule.pareto import pareto_frontier
from mebp_compiler.passes.schedule.problem import ProblemError, build_problem
from mebp_compiler.passes.schedule.solver import BudgetInfeasible, least_budget, model_peak, solve
from mebp_compiler.passes.schedule.synthetic import transformer_like_dag
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
        solution = solve(problem, budget, DEVICE)
        assert solution.status == "OPTIMAL" and solution.gap < 1e-6
        assert solution.model_peak_bytes <= budget
        extra = solution.objective_s - problem.base_compute_s
        assert extra == pytest.approx(exhaustive_optimum(problem, budget, DEVICE), abs=1e-8)


def test_solver_refuses_an_infeasible_budget_naming_the_least():
    problem = build_problem(transformer_like_dag(seed=1))
    least = least_budget(problem, DEVICE).model_peak_bytes
    with pytest.raises(BudgetInfeasible) as info:
        solve(problem, least - 1, DEVICE)
    assert info.value.least_budget_bytes == least
    assert f"({least} bytes)" in str(info.value)
    assert solve(problem, least, DEVICE).model_peak_bytes <= least


def test_the_least_budget_does_not_depend_on_the_start_point(captured):
    from mebp_compiler.passes.policies import mebp_decisions, scheduling_problem

    _, _, graph, _ = captured
    problem = scheduling_problem(graph, DEVICE)
    plain = least_budget(problem, DEVICE, time_limit_s=10)
    from_mebp = least_budget(problem, DEVICE, time_limit_s=10, start=mebp_decisions(graph))
    assert plain.status == from_mebp.status == "OPTIMAL"
    assert from_mebp.model_peak_bytes == plain.model_peak_bytes


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
        optimal_schedule(graph, 0, DEVICE, time_limit_s=5, offload=offload)
    least = info.value.least_budget_bytes
    for budget in sorted({least, (least + none_peak) // 2, none_peak}):
        schedule = optimal_schedule(graph, budget, DEVICE, time_limit_s=5, offload=offload)
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
        optimal_schedule(graph, 0, DEVICE, time_limit_s=5, offload=False)
    schedule = optimal_schedule(graph, info.value.least_budget_bytes, DEVICE, time_limit_s=5, offload=False)
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
    optimal = optimal_schedule(graph, mebp_peak, DEVICE, time_limit_s=5)
    assert step_cost(graph, optimal, DEVICE).extra_s < step_cost(graph, mebp, DEVICE).extra_s


def test_pareto_frontier_spans_least_to_none_with_fixed_policies_marked():
    model = lora_model("tiny-llama")
    graph = capture(model, random_batch(model.config.vocab_size, seq=32))
    device = DeviceProfile.load("iphone15promax")
    points = pareto_frontier(graph, device, points=3, time_limit_s=5)
    assert [p.policy for p in points] == ["optimal", "optimal", "optimal", "none", "mebp"]
    optimal, none, mebp = points[:3], points[3], points[4]
    assert all(p.predicted_peak_bytes <= p.budget_bytes for p in optimal)
    assert optimal[0].budget_bytes <= mebp.predicted_peak_bytes
    assert optimal[-1].budget_bytes == none.predicted_peak_bytes
    assert optimal[-1].extra_time_s <= none.extra_time_s + 1e-4  # at none's peak nothing need be recomputed
    assert optimal[0].extra_time_s <= mebp.extra_time_s
