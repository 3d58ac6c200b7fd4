"""Families beyond Llama's layout, exact against autograd (a fast subset of bench/families.py's sweep),
attention switched to eager, and in-place ops made out-of-place or refused."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch

import mebp_compiler
from mebp_compiler.capture import AttentionSwitched, UnsupportedOpError
from tests.conftest import assert_matches_autograd, autograd_reference, lora_model, random_batch

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench" / "families.py"

#: What each family brings that Llama does not.
SUBSET = {
    "gpt2": "Conv1D layers (LoRA with fan_in_fan_out), learned positions, biases, fused qkv, blocks at transformer.h",
    "falcon": "parallel attention/MLP, multi-query attention, fused qkv, in-place scaling",
    "bloom": "ALiBi position biases, fused qkv, biases",
    "qwen2": "grouped-query attention, q/k/v biases",
    "bart": "a decoder with cross-attention the causal LM never runs (LoRA gradients zero)",
    "doge": "a softplus gate whose backward the fake kernel lays out unlike the CPU kernel, then a view",
}


def _bench():
    spec = importlib.util.spec_from_file_location("bench_families", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("family", SUBSET)
def test_family_matches_autograd_under_every_policy(family):
    row = _bench().check_family(family)
    assert row["status"] == "pass", row["detail"]
    assert set(row["max_diff"]) == {"none", "mebp", "optimal"}


def test_sdpa_model_is_traced_with_eager_attention_and_matches_autograd():
    model = lora_model("tiny-llama")
    model.get_base_model().set_attn_implementation("sdpa")
    batch = random_batch(model.config.vocab_size)
    reference = autograd_reference(model, batch)  # autograd with the model's own (SDPA) attention
    with pytest.warns(AttentionSwitched, match="attn_implementation='sdpa'.*'eager'"):
        plan = mebp_compiler.compile(model, batch, "mebp")
    assert model.config._attn_implementation == "sdpa"  # the user's model is left as it was
    result = plan.step(batch)
    assert all(g.isfinite().all() for g in result.grads.values())
    assert_matches_autograd(result, reference)


def _mlp_forward_with(mutation):
    """A Llama MLP forward that applies `mutation(hidden, up)` between its products."""

    def forward(self, x):
        up = self.up_proj(x)
        mutation(x, up)
        return self.down_proj(self.act_fn(self.gate_proj(x)) * up)

    return forward


def test_an_in_place_op_on_a_computed_tensor_becomes_out_of_place_and_stays_exact():
    model = lora_model("tiny-llama")
    mlp_class = type(model.get_base_model().model.layers[0].mlp)
    batch = random_batch(model.config.vocab_size)
    _assert_out_of_place_and_exact(model, batch, mlp_class,
                                   _mlp_forward_with(lambda x, up: up.mul_(2.0).masked_fill_(up > 0.05, 0.5)))


def _assert_out_of_place_and_exact(model, batch, mlp_class, forward) -> None:
    """With `mlp_class.forward` replaced by `forward`: no mutating op is left in the graph, and each
    policy's step equals autograd's on the same forward."""
    original = mlp_class.forward
    mlp_class.forward = forward
    try:
        reference = autograd_reference(model, batch)
        for policy in ("none", "mebp"):
            plan = mebp_compiler.compile(model, batch, policy)
            assert not any(n.target._schema.is_mutable for n in plan.graph.module.graph.nodes
                           if isinstance(n.target, torch._ops.OpOverload))
            assert_matches_autograd(plan.step(batch), reference)
    finally:
        mlp_class.forward = original


def test_an_in_place_op_seen_through_an_earlier_view_is_refused():
    model = lora_model("tiny-llama")
    mlp_class = type(model.get_base_model().model.layers[0].mlp)
    batch = random_batch(model.config.vocab_size)
    original = mlp_class.forward

    def forward(self, x):
        up = self.up_proj(x)
        first = up[..., :8]  # a view made before the write and read after it: it sees the write
        up.add_(1.0)
        return self.down_proj(self.act_fn(self.gate_proj(x)) * up) + first.sum()

    mlp_class.forward = forward
    try:
        with pytest.raises(UnsupportedOpError, match=r"aten\.add_\.Tensor in module '.*mlp'.*in place"):
            mebp_compiler.compile(model, batch, "none")
    finally:
        mlp_class.forward = original


def test_writes_through_nested_views_become_scatters_and_stay_exact():
    """`buf[:, i, :4] = ...` (a slice of a select) read back row by row, and a write into a view of a
    tensor whose other parts are read after it (Qwen3.5's rotary `freqs[0][..., 1::3] = freqs[1, ..., 1::3]`)."""
    model = lora_model("tiny-llama")
    mlp_class = type(model.get_base_model().model.layers[0].mlp)
    batch = random_batch(model.config.vocab_size)

    def forward(self, x):
        up = self.up_proj(x)
        rows = up * 1.0
        for i in range(1, 3):
            rows[:, i, :4] = rows[:, i - 1, 4:8] * 0.5 + rows[:, i, :4]
        stacked = torch.stack((up, up * 2.0))
        first = stacked[0]
        first[..., 1::3] = stacked[1, ..., 1::3]
        return self.down_proj(self.act_fn(self.gate_proj(x)) * (rows + first))

    _assert_out_of_place_and_exact(model, batch, mlp_class, forward)
