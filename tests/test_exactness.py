"""Every compiled step equals plain autograd, and the runtime holds what liveness predicts."""

from __future__ import annotations

import math

import pytest
import torch

import mebp_compiler
from mebp_compiler.ir import Phase, Role
from mebp_compiler.schedule import Decision
from tests.conftest import TINY_MODELS, assert_matches_autograd, autograd_reference, lora_model, random_batch

POLICIES = [("none", "ram"), ("mebp", "ram"), ("mebp", "disk")]


def assert_held_matches_prediction(plan, result) -> None:
    predicted = plan.profile.total
    assert len(result.held_bytes) == len(predicted)
    assert abs(result.held_peak_bytes - plan.predicted_peak_bytes) <= 0.02 * plan.predicted_peak_bytes
    worst = max(abs(a - b) for a, b in zip(result.held_bytes, predicted))
    assert worst <= 0.02 * plan.predicted_peak_bytes, f"step-wise drift {worst} bytes"


@pytest.mark.parametrize("name", TINY_MODELS)
@pytest.mark.parametrize("policy,checkpoints", POLICIES)
def test_tiny_models_match_autograd(name, policy, checkpoints, tmp_path):
    model = lora_model(name)
    batch = random_batch(model.config.vocab_size)
    plan = mebp_compiler.compile(model, batch, policy, checkpoints=checkpoints, offload_dir=str(tmp_path))
    result = plan.step(batch)
    assert_matches_autograd(result, autograd_reference(model, batch))
    assert_held_matches_prediction(plan, result)
    if checkpoints == "disk":
        assert plan.runtime.store.bytes_written > 0
        assert plan.runtime.store.bytes_read == plan.runtime.store.bytes_written


@pytest.mark.parametrize("name", TINY_MODELS)
def test_mebp_holds_fewer_activations_than_none(name):
    model = lora_model(name)
    batch = random_batch(model.config.vocab_size, seq=48)
    none = mebp_compiler.compile(model, batch, "none")
    mebp = mebp_compiler.compile(model, batch, "mebp")
    assert mebp.predicted_peak_activation_bytes < none.predicted_peak_activation_bytes
    assert mebp.step(batch).held_peak_bytes_of((Role.ACTIVATION,)) < none.step(batch).held_peak_bytes_of(
        (Role.ACTIVATION,)
    )


def test_disk_checkpoints_leave_ram_during_the_backward(tmp_path):
    model = lora_model("tiny-llama")
    batch = random_batch(model.config.vocab_size, seq=48)
    ram = mebp_compiler.compile(model, batch, "mebp", checkpoints="ram")
    disk = mebp_compiler.compile(model, batch, "mebp", checkpoints="disk", offload_dir=str(tmp_path))

    def activations_when_forward_ends(plan):
        loss_step = next(k for k, name in enumerate(plan.profile.order) if name.startswith("nll_loss_forward"))
        return plan.step(batch).held_by_role[Role.ACTIVATION][loss_step]

    assert activations_when_forward_ends(disk) < activations_when_forward_ends(ram)
    boundaries = disk.schedule.tensors_with(Decision.OFFLOAD)
    assert len(boundaries) == model.config.num_hidden_layers
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{b}.bin" for b in boundaries)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["none", "mebp"])
def test_smollm2_matches_autograd(smollm2, policy):
    batch = random_batch(smollm2.config.vocab_size, batch=1, seq=32, seed=3)
    plan = mebp_compiler.compile(smollm2, batch, policy)
    result = plan.step(batch)
    assert_matches_autograd(result, autograd_reference(smollm2, batch))
    assert_held_matches_prediction(plan, result)


@pytest.mark.parametrize("name", TINY_MODELS)
@pytest.mark.parametrize("policy", ["none", "mebp"])
def test_chunked_head_matches_autograd(name, policy):
    model = lora_model(name)
    batch = random_batch(model.config.vocab_size, seq=30)  # chunks of unequal length
    plan = mebp_compiler.compile(model, batch, policy, head_chunks=4)
    result = plan.step(batch)
    assert_matches_autograd(result, autograd_reference(model, batch))
    assert_held_matches_prediction(plan, result)
    chunk_blocks = {ti.block for ti in plan.captured.info.values() if ti.module.startswith("lm_head.chunk")}
    assert chunk_blocks == set(range(plan.captured.num_blocks, plan.captured.num_blocks + 4))


@pytest.mark.slow
def test_smollm2_chunked_head_matches_autograd(smollm2):
    batch = random_batch(smollm2.config.vocab_size, batch=1, seq=32, seed=4)
    plan = mebp_compiler.compile(smollm2, batch, "mebp", head_chunks=4)
    result = plan.step(batch)
    assert_matches_autograd(result, autograd_reference(smollm2, batch))
    assert_held_matches_prediction(plan, result)


def test_chunked_head_removes_the_seq_by_vocab_peak():
    """SmolLM2's real architecture (meta device): before, [seq x vocab] tensors are live at
    the mebp plan's peak; with 8 chunks none is, and the peak of computed tensors falls."""
    from mebp_compiler.app import models
    from mebp_compiler.capture import capture
    from mebp_compiler.passes.liveness import liveness
    from mebp_compiler.passes.policies import mebp_schedule
    from mebp_compiler.passes.rewrite import rewrite

    model = models.add_lora(models.load("smollm2-135m", device="meta"))
    seq = 128
    ids = torch.zeros((1, seq), dtype=torch.int64, device="meta")
    seq_by_vocab = seq * model.config.vocab_size * 4
    profiles = {}
    for chunks in (0, 8):
        graph = capture(model, {"input_ids": ids, "labels": ids}, head_chunks=chunks)
        profiles[chunks] = liveness(rewrite(graph, mebp_schedule(graph)))
    before, after = profiles[0], profiles[8]
    assert sum(s.nbytes == seq_by_vocab for s in before.live_at_peak) >= 2
    assert all(s.nbytes < seq_by_vocab // 4 for s in after.live_at_peak if s.role != Role.FROZEN)
    assert after.peak_activation_bytes < before.peak_activation_bytes / 2


def test_sliced_cross_entropy_equals_torch_cross_entropy():
    from mebp_compiler.sliced_loss import sliced_linear_cross_entropy

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 7, 16, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator)
    labels = torch.randint(0, 50, (2, 7), generator=generator)
    labels[0, 3] = -100
    for softcap in (None, 3.0):
        loss = sliced_linear_cross_entropy(hidden, weight, labels, 4, softcap)
        logits = hidden @ weight.t()
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), labels.reshape(-1), reduction="sum")
        (grad,), (expected_grad,) = torch.autograd.grad(loss, hidden), torch.autograd.grad(expected, hidden)
        assert abs(loss.item() - expected.item()) <= 1e-5 * expected.item()
        assert (grad - expected_grad).abs().max() <= 1e-5 * expected_grad.abs().max()


@pytest.mark.parametrize("name", TINY_MODELS)
@pytest.mark.parametrize("head_chunks", [0, 3])
def test_vocab_sliced_head_matches_autograd(name, head_chunks):
    model = lora_model(name)
    batch = random_batch(model.config.vocab_size, seq=30)
    plan = mebp_compiler.compile(model, batch, "mebp", head_chunks=head_chunks, vocab_slices=5)
    result = plan.step(batch)
    assert_matches_autograd(result, autograd_reference(model, batch))
    assert_held_matches_prediction(plan, result)
    tokens, vocab = 2 * 30, model.config.vocab_size
    logits_like = [name for name, ti in plan.graph.info.items() if ti.phase != Phase.INPUT and ti.shape
                   and vocab in ti.shape and math.prod(ti.shape) >= tokens * vocab / 4]
    assert not logits_like  # one [tokens x vocab / 5] slice at a time


@pytest.mark.slow
def test_smollm2_vocab_sliced_head_matches_autograd(smollm2):
    batch = random_batch(smollm2.config.vocab_size, batch=1, seq=32, seed=5)
    plan = mebp_compiler.compile(smollm2, batch, "mebp", head_chunks=2, vocab_slices=8)
    result = plan.step(batch)
    assert_matches_autograd(result, autograd_reference(smollm2, batch))
    assert_held_matches_prediction(plan, result)


@pytest.mark.parametrize("name", TINY_MODELS)
@pytest.mark.parametrize("policy", ["mebp", "optimal"])
def test_chunked_mlps_match_autograd(name, policy):
    model = lora_model(name)
    batch = random_batch(model.config.vocab_size, seq=30)  # chunks of unequal length
    budget = {"budget": "64MB", "work_limit": 10} if policy == "optimal" else {}
    plan = mebp_compiler.compile(model, batch, policy, mlp_chunks=4, vocab_slices=3, **budget)
    result = plan.step(batch)
    assert_matches_autograd(result, autograd_reference(model, batch))
    assert_held_matches_prediction(plan, result)
    intermediate = model.config.intermediate_size
    widest = max(math.prod(ti.shape) for ti in plan.graph.info.values()  # tensors owning their memory
                 if ti.phase != Phase.INPUT and ti.shape and ti.shape[-1] == intermediate
                 and ti.output_alias == (None,) and ti.role != Role.DEQUANTIZED)
    assert widest == math.ceil(30 / 4) * 2 * intermediate  # one sequence chunk of the MLP at a time


def test_chunked_mlps_lower_the_least_budget():
    """A tiny Llama with a wide MLP (meta device): its [seq x intermediate] products set the
    least budget; in 4 sequence chunks, each restored on its own, the least budget falls."""
    import transformers

    from mebp_compiler.app import models
    from mebp_compiler.capture import capture
    from mebp_compiler.device import DeviceProfile
    from mebp_compiler.passes.policies import least_feasible_budget

    config = models.config("tiny-llama")
    config.intermediate_size = 1024
    with torch.device("meta"):
        model = models.add_lora(transformers.AutoModelForCausalLM.from_config(config))
    ids = torch.zeros((1, 64), dtype=torch.int64, device="meta")
    device = DeviceProfile.load("iphone15promax")
    least = {}
    for chunks in (0, 4):
        graph = capture(model, {"input_ids": ids, "labels": ids}, vocab_slices=4, mlp_chunks=chunks)
        least[chunks] = least_feasible_budget(graph, device, work_limit=30)
    product = 64 * config.intermediate_size * 4
    assert least[4] <= least[0] - 2 * product  # bytes of at least two whole MLP products saved


def test_runtime_trims_the_heap_once_per_segment(monkeypatch):
    from mebp_compiler import heap

    model = lora_model("tiny-llama")
    batch = random_batch(model.config.vocab_size)
    plan = mebp_compiler.compile(model, batch, "mebp", mlp_chunks=2)
    calls = []
    monkeypatch.setattr(heap, "_MALLOC_TRIM", lambda pad: calls.append(pad))
    plan.runtime.trim_heap = True
    result = plan.step(batch)
    assert_matches_autograd(result, autograd_reference(model, batch))
    segments = [plan.graph.info[n.name].segment for n in plan.graph.nodes() if n.op == "call_function"]
    starts = 1 + sum(a != b for a, b in zip(segments, segments[1:]))
    assert len(calls) == starts and starts >= 4 * plan.graph.num_blocks  # each block: forward, backward, parts
    plan.runtime.trim_heap = False
    plan.step(batch)
    assert len(calls) == starts
