"""Capture by the block (`mebp_compiler.stamp`) gives the graph the whole trace gives, and it runs exactly."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import transformers

import mebp_compiler
from mebp_compiler.app import models
from mebp_compiler.capture import capture
from mebp_compiler.device import DeviceProfile
from mebp_compiler.passes.liveness import liveness
from mebp_compiler.passes.policies import mebp_schedule, optimal_schedule
from mebp_compiler.passes.rewrite import rewrite
from tests.conftest import assert_matches_autograd, autograd_reference, randomize_lora_b, random_batch


def deep_model(name: str, layers: int, **lora) -> torch.nn.Module:
    """The tiny config `name` with `layers` decoder blocks (Gemma 3: a global layer every third),
    with LoRA whose lora_B is random."""
    config = models.config(name)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = (models._gemma3_layer_types(layers, 3) if name == "tiny-gemma3"
                              else [config.layer_types[0]] * layers)
    torch.manual_seed(0)
    model = models.add_lora(transformers.AutoModelForCausalLM.from_config(config), models.LoraSettings(**lora))
    model.train()
    randomize_lora_b(model)
    return model


def ops(graph) -> list[tuple]:
    """Every node in order: name, kind, target, arguments (nodes by position), TensorInfo."""
    position = {n: i for i, n in enumerate(graph.nodes())}
    ref = lambda a: ("node", position[a]) if isinstance(a, fx.Node) else a  # noqa: E731
    return [(n.name, n.op, n.target, fx.node.map_aggregate(n.args, ref), fx.node.map_aggregate(n.kwargs, ref),
             graph.info.get(n.name)) for n in graph.nodes()]


CASES = [
    ("tiny-llama", 6, {}),
    ("tiny-qwen2", 6, {"mlp_chunks": 2}),
    ("tiny-qwen2", 7, {"head_chunks": 2}),
    ("tiny-gemma3", 8, {"mlp_chunks": 2, "vocab_slices": 4}),
]


@pytest.mark.parametrize("name,layers,options", CASES)
def test_stamped_graph_equals_the_whole_trace(name, layers, options):
    model = deep_model(name, layers)
    batch = random_batch(model.config.vocab_size, seq=16)
    stamped = capture(model, batch, **options)
    whole = capture(model, batch, by_block=False, **options)
    assert 4 <= stamped.meta.pop("traced_blocks") < layers  # it was stamped, from fewer blocks
    assert ops(stamped) == ops(whole)
    assert (stamped.inputs, stamped.outputs, stamped.num_blocks, stamped.batch_shape, stamped.meta) == \
        (whole.inputs, whole.outputs, whole.num_blocks, whole.batch_shape, whole.meta)
    for a, b in zip(stamped.nodes(), whole.nodes()):
        val_a, val_b = a.meta.get("val"), b.meta.get("val")
        if isinstance(val_b, torch.Tensor):
            assert (val_a.shape, val_a.dtype, val_a.stride()) == (val_b.shape, val_b.dtype, val_b.stride()), a.name
    assert liveness(stamped).peak_bytes == liveness(whole).peak_bytes
    assert mebp_schedule(stamped) == mebp_schedule(whole)
    budget = liveness(rewrite(whole, mebp_schedule(whole))).peak_bytes
    device = DeviceProfile.load("iphone15promax")
    a = optimal_schedule(stamped, budget, device, work_limit=2)
    b = optimal_schedule(whole, budget, device, work_limit=2)
    assert (a.decisions, a.sequence) == (b.decisions, b.sequence)


@pytest.mark.parametrize("name,layers,options", [CASES[0], CASES[3]])
def test_stamped_step_matches_autograd(name, layers, options, tmp_path):
    model = deep_model(name, layers)
    batch = random_batch(model.config.vocab_size, seq=16)
    plan = mebp_compiler.compile(model, batch, "mebp", checkpoints="disk", offload_dir=str(tmp_path), **options)
    assert plan.graph.meta["traced_blocks"] < layers
    assert_matches_autograd(plan.step(batch), autograd_reference(model, batch))


def test_a_block_unlike_the_others_is_traced_whole():
    # Block 4's norm has its own epsilon: no traced block shows what block 4 is, so the whole step is traced.
    model = deep_model("tiny-llama", 6)
    models.decoder_layers(model)[4].input_layernorm.variance_epsilon = 1e-3
    batch = random_batch(model.config.vocab_size, seq=16)
    graph = capture(model, batch)
    assert "traced_blocks" not in graph.meta
    assert ops(graph) == ops(capture(model, batch, by_block=False))


def test_lora_on_some_blocks_only_is_traced_whole():
    model = deep_model("tiny-qwen2", 6, layers_to_transform=[1, 4])
    batch = random_batch(model.config.vocab_size, seq=16)
    graph = capture(model, batch)
    assert "traced_blocks" not in graph.meta
    assert ops(graph) == ops(capture(model, batch, by_block=False))


def test_trained_copies_of_block_modules_are_stamped_too():
    # peft's modules_to_save: every block trains its own copy of a norm, each a LoRA input of its block.
    model = deep_model("tiny-llama", 6, modules_to_save=("post_attention_layernorm",))
    batch = random_batch(model.config.vocab_size, seq=16)
    stamped = capture(model, batch)
    assert stamped.meta.pop("traced_blocks") < 6
    whole = capture(model, batch, by_block=False)
    assert ops(stamped) == ops(whole) and stamped.inputs == whole.inputs and stamped.outputs == whole.outputs
