"""INT4 frozen weights: exact to autograd on the dequantized model, smaller, and checked on load."""

from __future__ import annotations

import copy

import pytest
import torch

import mebp_compiler
from mebp_compiler.ir import Phase, Role
from mebp_compiler.passes.quantize import (
    QuantizedWeights,
    WeightFileError,
    dequantize_int4,
    dequantize_int4_rows,
    embedding_int4,
    quantize_int4,
)
from tests.conftest import (
    TINY_MODELS,
    assert_matches_autograd,
    autograd_reference,
    flipped_byte,
    lora_model,
    random_batch,
    safetensors_data_start,
)


def test_int4_round_trip_is_within_half_a_step():
    weight = torch.randn(8, 128) * torch.linspace(0.1, 3, 128)
    packed, scales = quantize_int4(weight, group_size=32)
    assert packed.dtype == torch.uint8 and packed.shape == (8, 64) and scales.shape == (8, 4)
    restored = dequantize_int4(packed, scales)
    step = scales.repeat_interleave(32, dim=1)
    assert ((restored - weight).abs() <= step / 2 + 1e-6).all()
    levels = torch.cat([torch.arange(-7, 8), torch.zeros(17)]).float().repeat(3, 2)  # every level, 2 groups
    assert torch.equal(dequantize_int4(*quantize_int4(levels, 32)), levels)  # exact at scale 1


def dequantized_copy(model, plan):
    """The model with every quantized weight replaced by its dequantized value."""
    twin = copy.deepcopy(model)
    params = dict(twin.named_parameters())
    with torch.no_grad():
        for source in plan.weights.sources:
            encoding = plan.weights.encoding(source, params[source].dtype)
            tensors = [plan.weights.tensors[name] for name in encoding.tensor_names]
            params[source].copy_(encoding.dequantize(*tensors, *encoding.constants, **encoding.options))
    return twin


@pytest.mark.parametrize("name", TINY_MODELS)
@pytest.mark.parametrize("policy", ["none", "mebp"])
def test_int4_step_equals_autograd_on_the_dequantized_model(name, policy):
    model = lora_model(name)
    batch = random_batch(model.config.vocab_size)
    plan = mebp_compiler.compile(model, batch, policy, int4=True, group_size=32, head_chunks=2)
    result = plan.step(batch)
    assert_matches_autograd(result, autograd_reference(dequantized_copy(model, plan), batch))
    assert result.held_peak_bytes == plan.predicted_peak_bytes
    fp32 = mebp_compiler.compile(model, batch, policy, head_chunks=2)
    assert plan.profile.bytes_by_role[Role.MAPPED][0] < fp32.profile.bytes_by_role[Role.FROZEN][0] / 4
    assert plan.profile.bytes_by_role[Role.FROZEN][0] < fp32.profile.bytes_by_role[Role.FROZEN][0] / 10
    assert Role.DEQUANTIZED in result.held_by_role
    assert any(n.target is embedding_int4 for n in plan.graph.nodes())  # only the looked-up rows


@pytest.mark.parametrize("name", TINY_MODELS)
def test_int4_vocab_sliced_head_decompresses_one_slice_at_a_time(name):
    model = lora_model(name)
    batch = random_batch(model.config.vocab_size)
    plan = mebp_compiler.compile(model, batch, "mebp", int4=True, group_size=32, vocab_slices=4)
    result = plan.step(batch)
    assert_matches_autograd(result, autograd_reference(dequantized_copy(model, plan), batch))
    assert result.held_peak_bytes == plan.predicted_peak_bytes
    head = next(n for n in plan.graph.nodes() if n.target is dequantize_int4_rows).args[0]
    readers = {user.target for user in head.users}
    assert readers == {dequantize_int4_rows, embedding_int4}  # never the whole head at once
    assert sum(user.target is dequantize_int4_rows for user in head.users) >= 8  # forward and backward


def file_mapping_of(tensor: torch.Tensor) -> str | None:
    """The file a tensor's memory is mapped from (/proc/self/maps), None for anonymous memory."""
    address = tensor.data_ptr()
    for line in open("/proc/self/maps"):
        fields = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= address < end:
            return fields[5].strip() if len(fields) == 6 and fields[5].startswith("/") else None
    return None


def test_int4_weights_are_read_from_a_memory_mapped_file_and_not_counted_as_held():
    model = lora_model("tiny-llama")
    batch = random_batch(model.config.vocab_size)
    plan = mebp_compiler.compile(model, batch, "mebp", int4=True, group_size=32)
    assert plan.weights.mapped
    assert all("mebp-int4-" in (file_mapping_of(t) or "") for t in plan.weights.tensors.values())
    assert file_mapping_of(next(model.parameters())) is None  # the check tells the two apart
    result = plan.step(batch)
    mapped = plan.profile.bytes_by_role[Role.MAPPED][0]
    assert mapped == plan.weights.nbytes and result.held_by_role[Role.MAPPED][0] == mapped
    held = [sum(col) for col in zip(*(row for r, row in result.held_by_role.items() if r != Role.MAPPED))]
    assert result.held_peak_bytes == max(held) == plan.predicted_peak_bytes


def test_a_truncated_weight_file_fails_before_training(tmp_path):
    model = lora_model("tiny-llama")
    batch = random_batch(model.config.vocab_size)
    path = tmp_path / "weights.safetensors"
    plan = mebp_compiler.compile(model, batch, "mebp", int4=True, weights_file=str(path))
    assert path.stat().st_size > plan.weights.nbytes  # tensors plus the safetensors header
    assert_matches_autograd(plan.step(batch), autograd_reference(dequantized_copy(model, plan), batch))

    again = mebp_compiler.compile(model, batch, "mebp", int4=True, weights_file=str(path))  # read, not redone
    assert all(torch.equal(again.weights.tensors[k], v) for k, v in plan.weights.tensors.items())
    with pytest.raises(WeightFileError, match="other weights"):
        mebp_compiler.compile(model, batch, "mebp", int4=True, group_size=32, weights_file=str(path))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(WeightFileError, match="quantize the model again"):
        mebp_compiler.compile(model, batch, "mebp", int4=True, weights_file=str(path))
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(WeightFileError, match=str(path)):
        QuantizedWeights.load(path)


def test_flipped_bytes_in_a_weight_file_are_refused_before_training(tmp_path):
    """One flipped bit anywhere in the file - length prefix, header, tensor bytes - is refused
    (a flipped tensor byte was trained on, with losses of 3e21), naming the file."""
    model = lora_model("tiny-llama")
    batch = random_batch(model.config.vocab_size)
    path = tmp_path / "weights.safetensors"
    mebp_compiler.compile(model, batch, "mebp", int4=True, weights_file=str(path))
    data, size = safetensors_data_start(path), path.stat().st_size
    with flipped_byte(path, (data + size) // 2):
        with pytest.raises(WeightFileError, match=f"{path}: it does not match its SHA-256.*compile again"):
            mebp_compiler.compile(model, batch, "mebp", int4=True, weights_file=str(path))
    for offset in (0, 20, data - 2, data, size - 1):
        with flipped_byte(path, offset):
            with pytest.raises(WeightFileError, match=str(path)):
                QuantizedWeights.load(path)
    assert QuantizedWeights.load(path).nbytes == mebp_compiler.compile(
        model, batch, "mebp", int4=True, weights_file=str(path)).weights.nbytes


@pytest.mark.slow
def test_smollm2_int4_with_sliced_head_equals_autograd_on_the_dequantized_model(smollm2):
    batch = random_batch(smollm2.config.vocab_size, batch=1, seq=32, seed=5)
    plan = mebp_compiler.compile(smollm2, batch, "mebp", int4=True, head_chunks=2, vocab_slices=8)
    result = plan.step(batch)
    assert_matches_autograd(result, autograd_reference(dequantized_copy(smollm2, plan), batch))
    assert result.held_peak_bytes == plan.predicted_peak_bytes
    fp32_loss = autograd_reference(smollm2, batch)[0]
    # The quantization error is reported, not part of the contract: a loose sanity bound
    # (on random token ids the loss is ~13 nats and INT4 g64 moves it by ~4%).
    assert abs(result.loss.item() - fp32_loss.item()) < 0.1 * fp32_loss.item()


def test_cli_trains_with_int4_weights(tmp_path):
    from mebp_compiler.app.cli import main

    assert main(["train", "--model", "tiny-llama", "--steps", "2", "--seq-len", "16", "--int4",
                 "--group-size", "32", "--head-chunks", "2", "--vocab-slices", "4", "--fuse-update", "--out", str(tmp_path), "--no-progress"]) == 0


def test_weight_residency_is_a_costed_scheduling_decision():
    """Keep a decompressed weight from forward to backward, or read and decompress it again."""
    from mebp_compiler.device import DeviceProfile
    from mebp_compiler.passes.policies import least_feasible_budget
    from mebp_compiler.passes.scheduler.from_graph import op_seconds
    from mebp_compiler.plan import optimizer_state_bytes
    from mebp_compiler.schedule import Decision

    model = lora_model("tiny-llama")
    batch = random_batch(model.config.vocab_size)
    device = DeviceProfile.load("iphone15promax")
    options = dict(int4=True, group_size=32, offload=False, work_limit=10)
    keep_all = mebp_compiler.compile(model, batch, "none", int4=True, group_size=32)
    captured = keep_all.captured
    nodes = {n.name: n for n in captured.nodes()}
    resident = [name for name, node in nodes.items() if node.target is dequantize_int4  # read by the backward
                and any(captured.info[u.name].phase == Phase.BACKWARD for v in (node, *node.users) for u in v.users)]
    assert resident
    for name in resident:
        flash_and_decompress = device.decompress_s(captured.info[name].output_nbytes[0] / 8)
        assert op_seconds(nodes[name], captured.info[name], device) > flash_and_decompress > 0

    reserved = optimizer_state_bytes(model, "adamw")
    roomy = mebp_compiler.compile(model, batch, "optimal", budget=keep_all.predicted_peak_bytes + reserved, **options)
    assert all(roomy.schedule.decisions.get(n) == Decision.KEEP for n in resident)
    least = least_feasible_budget(captured, device, offload=False) + reserved
    tight = mebp_compiler.compile(model, batch, "optimal", budget=least, **options)
    assert any(tight.schedule.decisions.get(n) == Decision.RECOMPUTE for n in resident)
    result = tight.step(batch)
    assert_matches_autograd(result, autograd_reference(dequantized_copy(model, tight), batch))
    assert result.held_peak_bytes == tight.predicted_peak_bytes <= least - reserved
