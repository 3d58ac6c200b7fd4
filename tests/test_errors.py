"""Bad input gives a clear error that says what is wrong and what to do."""

from __future__ import annotations

import pytest
import torch

import mebp_compiler
from mebp_compiler.app import models
from mebp_compiler.capture import CaptureError, UnsupportedOpError
from mebp_compiler.offload import OffloadError, OffloadStore
from mebp_compiler.runtime import _HeldStorages
from mebp_compiler.ir import Role, format_bytes
from mebp_compiler.plan import optimizer_state_bytes
from tests.conftest import lora_model, random_batch


def test_a_model_without_lora_parameters():
    model = models.load("tiny-llama")
    model.requires_grad_(False)
    with pytest.raises(CaptureError, match="no trainable parameters.*add_lora"):
        mebp_compiler.compile(model, random_batch(model.config.vocab_size))


def test_a_batch_of_another_shape():
    model = lora_model("tiny-llama")
    plan = mebp_compiler.compile(model, random_batch(model.config.vocab_size, seq=16))
    with pytest.raises(mebp_compiler.BatchShapeError, match=r"\(2, 20\).*compiled for \(2, 16\).*compile again"):
        plan.step(random_batch(model.config.vocab_size, seq=20))


def test_a_batch_without_labels():
    model = lora_model("tiny-llama")
    with pytest.raises(CaptureError, match="lacks \\['labels'\\]"):
        mebp_compiler.compile(model, {"input_ids": torch.zeros(1, 8, dtype=torch.int64)})


def test_an_unknown_model_name():
    with pytest.raises(models.UnknownModelError, match="qwen2.5-0.5b"):
        models.load("qwen2.5-05b")


def test_a_random_op_names_itself_and_its_module():
    model = lora_model("tiny-llama", dropout=0.1)
    with pytest.raises(UnsupportedOpError, match=r"aten\.\w+.*lora_dropout.*Set dropout probabilities to 0"):
        mebp_compiler.compile(model, random_batch(model.config.vocab_size))


def test_a_model_without_decoder_blocks_is_refused_before_tracing():
    class Bigram(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(16, 16)

        def forward(self, input_ids, labels, use_cache=False):
            raise AssertionError("traced")

    model = Bigram()
    with pytest.raises(CaptureError, match="cannot find the decoder layers of Bigram"):
        mebp_compiler.compile(model, random_batch(16))


def test_a_block_shared_across_the_stack_is_refused_before_tracing():
    model = lora_model("tiny-llama")
    layers = model.base_model.model.model.layers
    layers.append(layers[0])
    model.base_model.model.config.num_hidden_layers = 3
    with pytest.raises(CaptureError, match=r"blocks 0 and 2 of 'base_model.model.model.layers' are one module"):
        mebp_compiler.compile(model, random_batch(model.config.vocab_size))


def test_a_block_run_inside_another_is_refused():
    model = lora_model("tiny-llama")
    layers = model.base_model.model.model.layers
    layers[1].register_forward_hook(lambda module, args, output: layers[0](output, **module.last_kwargs))
    layers[1].register_forward_pre_hook(lambda module, args, kwargs: setattr(module, "last_kwargs", kwargs),
                                        with_kwargs=True)
    with pytest.raises(CaptureError, match=r"block '.*layers\.0' runs inside block '.*layers\.1'"):
        mebp_compiler.compile(model, random_batch(model.config.vocab_size))


def test_an_exception_while_tracing_names_its_module():
    model = lora_model("tiny-llama")
    mlp = model.base_model.model.model.layers[1].mlp
    mlp.forward = lambda hidden: (_ for _ in ()).throw(RuntimeError("no"))
    with pytest.raises(CaptureError, match=r"cannot trace module '.*layers\.1\.mlp': RuntimeError: no"):
        mebp_compiler.compile(model, random_batch(model.config.vocab_size))


def test_an_unknown_policy():
    model = lora_model("tiny-llama")
    with pytest.raises(ValueError, match="unknown policy 'fast'"):
        mebp_compiler.compile(model, random_batch(model.config.vocab_size), "fast")


def test_an_unwritable_offload_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    store = OffloadStore(tmp_path)
    store.directory = blocker  # a path under a regular file cannot be created
    with pytest.raises(OffloadError, match="could not offload 'x'.*offload directory"):
        store.write(torch.ones(4), "x")


def test_views_are_counted_once():
    held = _HeldStorages()
    base = torch.zeros(256)
    held.add(base, Role.ACTIVATION)
    held.add(base.view(16, 16).t(), Role.ACTIVATION)
    assert held.bytes_by_role[Role.ACTIVATION] == 1024
    held.drop(base)
    assert held.bytes_by_role[Role.ACTIVATION] == 1024


def test_a_step_that_does_not_fit_this_machine_is_refused_with_both_figures():
    model = lora_model("tiny-llama")
    plan = mebp_compiler.compile(model, random_batch(model.config.vocab_size), "mebp")
    assert plan.optimizer_state_bytes == optimizer_state_bytes(model, "adamw") > 0
    new_bytes = plan.predicted_peak_activation_bytes + plan.optimizer_state_bytes
    plan.check_memory(available_bytes=new_bytes)  # what is not yet allocated fits exactly
    with pytest.raises(mebp_compiler.InsufficientMemory,
                       match=rf"needs {format_bytes(new_bytes)} more .* but this machine has "
                             rf"{format_bytes(new_bytes - 1)} available; shorten the sequence"):
        plan.check_memory(available_bytes=new_bytes - 1)
