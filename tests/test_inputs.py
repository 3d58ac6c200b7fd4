"""Batches as a user hands them over: padding masks honoured exactly, bad values refused before compute."""

from __future__ import annotations

import pytest
import torch

import mebp_compiler
from mebp_compiler.capture import CaptureError
from mebp_compiler.plan import BatchShapeError, BatchValueError
from tests.conftest import TINY_MODELS, assert_matches_autograd, autograd_reference, lora_model, random_batch
from tests.test_exactness import assert_held_matches_prediction


def padded_batch(vocab_size: int, side: str, batch: int = 3, seq: int = 20, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch whose rows have 0, 5 and 11 padding tokens on `side` ("left" or "right"), labels -100 there."""
    out = random_batch(vocab_size, batch=batch, seq=seq, seed=seed)
    mask = torch.ones_like(out["input_ids"])
    for row, pad in enumerate((0, 5, 11)[:batch]):
        if side == "left":
            mask[row, :pad] = 0
        else:
            mask[row, seq - pad:] = 0
    out["input_ids"] = out["input_ids"].masked_fill(mask == 0, 0)
    out["labels"] = out["labels"].masked_fill(mask == 0, -100)
    return {**out, "attention_mask": mask}


def budget_between_least_and_mebp(model, batch) -> dict:
    mebp = mebp_compiler.compile(model, batch, "mebp")
    none = mebp_compiler.compile(model, batch, "none")
    assert mebp.predicted_peak_bytes < none.predicted_peak_bytes
    return {"budget": mebp.predicted_peak_bytes + mebp.optimizer_state_bytes, "work_limit": 5}


@pytest.mark.parametrize("name", TINY_MODELS)
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("policy", ["none", "mebp", "optimal"])
def test_padding_mask_gives_autograds_step(name, side, policy):
    model = lora_model(name)
    batch = padded_batch(model.config.vocab_size, side)
    options = budget_between_least_and_mebp(model, batch) if policy == "optimal" else {}
    plan = mebp_compiler.compile(model, batch, policy, **options)
    result = plan.step(batch)
    assert_matches_autograd(result, autograd_reference(model, batch))
    assert_held_matches_prediction(plan, result)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_the_mask_changes_the_step_under_left_padding(name):
    """The mask reaches the model: the same tokens without it give another loss and gradients."""
    model = lora_model(name)
    batch = padded_batch(model.config.vocab_size, "left")
    unmasked = {k: v for k, v in batch.items() if k != "attention_mask"}
    masked = mebp_compiler.compile(model, batch, "mebp").step(batch)
    plain = mebp_compiler.compile(model, unmasked, "mebp").step(unmasked)
    assert_matches_autograd(masked, autograd_reference(model, batch))
    worst = max((masked.grads[n] - g).abs().max().item() for n, g in plain.grads.items())
    assert worst > 1e-3 * max(g.abs().max().item() for g in plain.grads.values())


@pytest.mark.parametrize("chunks", [{"head_chunks": 3}, {"vocab_slices": 4}, {"mlp_chunks": 2}])
def test_padding_mask_with_a_chunked_head_or_mlp(chunks):
    model = lora_model("tiny-gemma3")  # sliding-window layers take the mask too
    batch = padded_batch(model.config.vocab_size, "left")
    plan = mebp_compiler.compile(model, batch, "mebp", **chunks)
    result = plan.step(batch)
    assert_matches_autograd(result, autograd_reference(model, batch))
    assert_held_matches_prediction(plan, result)


def test_a_mask_is_never_dropped():
    model = lora_model("tiny-llama")
    batch = padded_batch(model.config.vocab_size, "left")
    unmasked = {k: v for k, v in batch.items() if k != "attention_mask"}
    with pytest.raises(BatchShapeError, match="attention_mask.*compile with an example batch that has"):
        mebp_compiler.compile(model, unmasked, "mebp").step(batch)
    with pytest.raises(BatchShapeError, match="attention_mask.*missing"):
        mebp_compiler.compile(model, batch, "mebp").step(unmasked)
    with pytest.raises(CaptureError, match="position_ids"):
        mebp_compiler.compile(model, {**batch, "position_ids": torch.arange(20).expand(3, 20)}, "mebp")
    with pytest.raises(CaptureError, match="attention_mask.*int64 or bool"):
        mebp_compiler.compile(model, {**batch, "attention_mask": batch["attention_mask"].float()}, "mebp")


@pytest.mark.parametrize("vocab_slices", [0, 4])
@pytest.mark.parametrize("label", [-5, -1, 256, 10_000])
def test_labels_outside_the_vocabulary_are_refused_before_the_step(vocab_slices, label):
    model = lora_model("tiny-llama")
    batch = random_batch(model.config.vocab_size)
    assert model.config.vocab_size == 256
    plan = mebp_compiler.compile(model, batch, "mebp", vocab_slices=vocab_slices)
    bad = {**batch, "labels": batch["labels"].clone()}
    bad["labels"][1, 7] = label
    with pytest.raises((IndexError, RuntimeError)):  # autograd refuses the same labels
        autograd_reference(model, bad)
    with pytest.raises(BatchValueError, match=rf"batch\['labels'\] holds {label} at \(1, 7\).*vocabulary of 256"):
        plan.step(bad)


def test_the_sliced_loss_refuses_labels_outside_the_vocabulary():
    from mebp_compiler.sliced_loss import sliced_linear_cross_entropy

    hidden, weight = torch.randn(2, 3, 8, requires_grad=True), torch.randn(10, 8)
    for label in (-5, 10):
        labels = torch.tensor([[1, 2, label], [-100, 0, 9]])
        with pytest.raises(ValueError, match=rf"holds {label} .*vocabulary of 10"):
            sliced_linear_cross_entropy(hidden, weight, labels, 3)


def test_token_ids_out_of_range_or_of_another_dtype_are_named():
    model = lora_model("tiny-llama")
    batch = random_batch(model.config.vocab_size)
    plan = mebp_compiler.compile(model, batch, "mebp")
    for value in (256, -1):
        bad = {**batch, "input_ids": batch["input_ids"].clone()}
        bad["input_ids"][0, 3] = value
        with pytest.raises(BatchValueError, match=r"batch\['input_ids'\].*vocabulary of 256"):
            plan.step(bad)
    with pytest.raises(BatchShapeError, match=r"batch\['input_ids'\] is torch.int32.*torch.int64"):
        plan.step({**batch, "input_ids": batch["input_ids"].int()})


@pytest.mark.parametrize("policy", ["none", "mebp"])
def test_lora_on_the_lm_head_with_head_chunks_matches_autograd(policy):
    targets = ("q_proj", "v_proj", "lm_head")
    model = lora_model("tiny-qwen2", target_modules=targets)
    batch = random_batch(model.config.vocab_size, seq=30)
    plan = mebp_compiler.compile(model, batch, policy, head_chunks=3)
    result = plan.step(batch)
    assert any("lm_head" in n for n in result.grads)
    assert_matches_autograd(result, autograd_reference(model, batch))
    assert_held_matches_prediction(plan, result)
    head_blocks = {ti.block for ti in plan.captured.info.values() if "lm_head" in ti.module}
    assert head_blocks == set(range(plan.captured.num_blocks, plan.captured.num_blocks + 3))


def test_lora_on_the_lm_head_with_vocab_slices_is_refused_up_front():
    model = lora_model("tiny-llama", target_modules=("q_proj", "lm_head"))
    batch = random_batch(model.config.vocab_size)
    with pytest.raises(CaptureError, match="trainable LM head.*vocab_slices"):
        mebp_compiler.compile(model, batch, "mebp", vocab_slices=4)


@pytest.mark.parametrize("group_size", [7, 48])
def test_an_int4_group_size_that_leaves_weights_float_is_refused(group_size):
    from mebp_compiler.passes.quantize import GroupSizeError

    model = lora_model("tiny-llama")  # widths 64 and 128
    batch = random_batch(model.config.vocab_size)
    with pytest.raises(GroupSizeError, match=rf"group size {group_size} does not divide the 64 input features of "
                                             r"base_model.model.model.embed_tokens.weight.*16, 32, 64"):
        mebp_compiler.compile(model, batch, "mebp", int4=True, group_size=group_size)


def test_every_frozen_weight_is_quantized_at_a_group_size_that_divides_them():
    from mebp_compiler.ir import Role

    model = lora_model("tiny-llama")
    batch = random_batch(model.config.vocab_size)
    plan = mebp_compiler.compile(model, batch, "mebp", int4=True, group_size=16)
    float_inputs = [s.source for s in plan.graph.inputs if s.role == Role.FROZEN
                    and plan.graph.info[s.name].shape and len(plan.graph.info[s.name].shape) == 2]
    assert float_inputs == []


def test_an_error_inside_the_traced_model_surfaces_as_itself():
    """The chunked head traces the decoder on its own; an error there reaches the caller with its
    own message, as a CaptureError naming the module and chained from it, not as a KeyError
    from closing the trace's annotations (as before)."""
    from mebp_compiler.app import models
    from mebp_compiler.capture import CaptureError

    model = lora_model("tiny-llama")

    def refuse(*_):
        raise RuntimeError("the model's own error")

    models.decoder_layers(model)[0].register_forward_pre_hook(refuse)
    with pytest.raises(CaptureError, match="module .*RuntimeError: the model's own error") as info:
        mebp_compiler.compile(model, random_batch(model.config.vocab_size), "mebp", vocab_slices=3)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_the_onnx_target_carries_the_mask_and_never_drops_one(tmp_path):
    from mebp_compiler.passes.partition import ManifestError, partition
    from mebp_compiler.targets import driver, load_target
    from mebp_compiler.targets.artifacts import step_weights, write_artifacts
    from tests.test_partition import as_step_result

    model = lora_model("tiny-llama")
    batch = padded_batch(model.config.vocab_size, "left")
    part = partition(mebp_compiler.compile(model, batch, "mebp").graph, model="test")
    onnx = load_target("onnx")
    write_artifacts(part, onnx, tmp_path / "artifacts", weights=step_weights(model, part), progress=False)
    run = driver.Driver.open(tmp_path / "artifacts", onnx, offload_dir=str(tmp_path / "flash"))
    arrays = {k: v.numpy() for k, v in batch.items()}
    assert_matches_autograd(as_step_result(run.step(arrays)), autograd_reference(model, batch))
    with pytest.raises(ManifestError, match="no array for batch input 'attention_mask'"):
        run.step({k: a for k, a in arrays.items() if k != "attention_mask"})
    with pytest.raises(ManifestError, match="'position_ids' is not an input of these artifacts"):
        run.step({**arrays, "position_ids": arrays["input_ids"]})
