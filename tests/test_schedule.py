"""Schedules as data, the fixed policies, and rewrites that must be refused or caught."""

from __future__ import annotations

import json

import pytest
import torch

from mebp_compiler.capture import capture
from mebp_compiler.ir import Phase
from mebp_compiler.passes.liveness import liveness
from mebp_compiler.passes.policies import block_boundaries, mebp_schedule, none_schedule
from mebp_compiler.passes.rewrite import rewrite
from mebp_compiler.runtime import Runtime
from mebp_compiler.schedule import Decision, Schedule, ScheduleError, Step, StepKind, with_origins
from tests.conftest import assert_matches_autograd, autograd_reference, lora_model, random_batch


@pytest.fixture(scope="module")
def tiny():
    model = lora_model("tiny-llama")
    batch = random_batch(model.config.vocab_size)
    return model, batch, capture(model, batch)


def run(graph, model, batch):
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    inputs = [batch[s.source] if s.role.value == "batch" else state[s.source] for s in graph.inputs]
    return Runtime(graph).run(inputs)


def test_schedule_json_round_trip(tiny, tmp_path):
    _, _, graph = tiny
    schedule = mebp_schedule(graph, "disk")
    path = tmp_path / "schedule.json"
    schedule.save(path)
    loaded = Schedule.load(path)
    assert loaded == schedule
    assert {s.kind for s in loaded.sequence} == set(StepKind)


def test_schedule_json_names_every_tensor_by_module_path_and_layer(tiny, tmp_path):
    model, _, graph = tiny
    schedule = with_origins(mebp_schedule(graph, "disk"), graph)
    schedule.save(tmp_path / "schedule.json")
    tensors = json.loads((tmp_path / "schedule.json").read_text())["tensors"]
    assert set(tensors) == set(schedule.decisions) | {s.tensor for s in schedule.sequence}
    assert Schedule.load(tmp_path / "schedule.json") == schedule
    modules = dict(model.named_modules())
    layers = {id(layer): k for k, layer in enumerate(model.base_model.model.model.layers)}
    for name, where in tensors.items():
        assert where["module"] in modules, name
        # A tensor computed by a module under decoder layer k names layer k; the backward's glue ops that
        # no module made (gradient sums) name no module and the layer whose backward they run in.
        owner = next((layers[id(m)] for path, m in modules.items()
                      if id(m) in layers and f"{where['module']}.".startswith(f"{path}.")), None)
        assert owner == where["layer"] or (where["module"] == "" and graph.info[name].phase != Phase.FORWARD), \
            (name, where)
    assert {w["layer"] for w in tensors.values()} >= set(range(len(layers)))


def test_corrupt_schedule_files_are_refused(tiny, tmp_path):
    _, _, graph = tiny
    data = mebp_schedule(graph).to_json()
    path = tmp_path / "s.json"
    path.write_text(json.dumps(data)[:-20])
    with pytest.raises(ScheduleError, match="not valid JSON"):
        Schedule.load(path)
    with pytest.raises(ScheduleError, match="format version"):
        Schedule.from_json({**data, "format_version": 99})
    with pytest.raises(ScheduleError, match="corrupt"):
        Schedule.from_json({**data, "decisions": {"x": "maybe"}})


def test_mebp_keeps_block_boundaries_and_recomputes_inside_blocks(tiny):
    _, _, graph = tiny
    schedule = mebp_schedule(graph)
    boundaries = set(block_boundaries(graph))
    blocks_with_output = {graph.info[b].block for b in boundaries if graph.info[b].block is not None}
    assert blocks_with_output == set(range(graph.num_blocks))
    for name, decision in schedule.decisions.items():
        if name in boundaries or graph.info[name].block is None:
            assert decision == Decision.KEEP
        else:
            assert decision == Decision.RECOMPUTE
    recomputed = {s.tensor for s in schedule.sequence if s.kind == StepKind.RECOMPUTE}
    assert {graph.info[n].block for n in recomputed} == set(range(graph.num_blocks))
    assert none_schedule(graph).tensors_with(Decision.RECOMPUTE) == []


def test_a_broken_recompute_is_caught_by_the_exactness_check(tiny):
    model, batch, graph = tiny
    rewritten = rewrite(graph, mebp_schedule(graph))
    assert_matches_autograd(run(rewritten, model, batch), autograd_reference(model, batch))
    clone = next(
        n for n in rewritten.module.graph.nodes
        if rewritten.info[n.name].recompute_of and n.target == torch.ops.aten.mul.Tensor
    )
    clone.target = torch.ops.aten.add.Tensor  # a recompute that computes the wrong thing
    rewritten.module.recompile()
    with pytest.raises(AssertionError, match="max grad diff"):
        assert_matches_autograd(run(rewritten, model, batch), autograd_reference(model, batch))


def test_a_sequence_that_never_recomputes_is_refused(tiny):
    _, _, graph = tiny
    schedule = mebp_schedule(graph)
    dropped = next(s for s in schedule.sequence if s.kind == StepKind.RECOMPUTE)
    broken = Schedule("broken", schedule.decisions, [s for s in schedule.sequence if s != dropped])
    with pytest.raises(ScheduleError, match=f"reads forward tensor '{dropped.tensor}' in the backward"):
        rewrite(graph, broken)


def test_rewrite_refuses_unknown_tensors_and_double_computes(tiny):
    _, _, graph = tiny
    schedule = none_schedule(graph)
    with pytest.raises(ScheduleError, match="not an op of this graph"):
        rewrite(graph, Schedule("x", {}, [Step(StepKind.COMPUTE, "no_such_node"), *schedule.sequence]))
    with pytest.raises(ScheduleError, match="a second time"):
        rewrite(graph, Schedule("x", schedule.decisions, [schedule.sequence[0], *schedule.sequence]))
    backward = next(n for n, ti in graph.info.items() if ti.phase == Phase.BACKWARD)
    with pytest.raises(ScheduleError, match="not a forward tensor"):
        rewrite(graph, Schedule("x", {backward: Decision.KEEP}, schedule.sequence))


def test_liveness_names_what_is_live_at_the_peak(tiny):
    _, _, graph = tiny
    profile = liveness(rewrite(graph, none_schedule(graph)))
    assert sum(s.nbytes for s in profile.live_at_peak) == profile.peak_bytes
    assert profile.peak_bytes == profile.total[profile.peak_step]
    assert "largest live at the peak" in profile.report()


def test_mebp_recomputes_a_vocabulary_sliced_head_one_slice_at_a_time():
    """The head's restore recomputes the log-sum-exp and the target logit together, slice by
    slice as the forward did: at most one slice's recomputed logits are live at once (restoring
    one chain after the other held every slice's)."""
    model = lora_model("tiny-qwen2")
    batch = random_batch(model.config.vocab_size)
    slices = 4
    captured = capture(model, batch, vocab_slices=slices)
    graph = rewrite(captured, mebp_schedule(captured))
    assert graph.num_blocks == 2  # the head is "block" 2
    tokens = batch["input_ids"].numel()
    slice_shapes = {(tokens, model.config.vocab_size // slices), (tokens, -(-model.config.vocab_size // slices))}
    nodes = [n for n in graph.module.graph.nodes if n.op == "call_function"]
    position = {n.name: k for k, n in enumerate(nodes)}
    logits = [n for n in nodes if graph.info[n.name].recompute_of is not None and graph.info[n.name].block == 2
              and n.target is torch.ops.aten.mm.default and tuple(n.meta["val"].shape) in slice_shapes]
    assert len(logits) == slices
    spans = [(position[n.name], max(position[u.name] for u in n.users)) for n in logits]
    live = max(sum(start <= k <= end for start, end in spans) for k in range(len(nodes)))
    assert live == 1, f"{live} slices' recomputed logits live at once"
    assert_matches_autograd(run(graph, model, batch), autograd_reference(model, batch))
