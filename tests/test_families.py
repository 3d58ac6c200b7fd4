"""Families beyond Llama's layout: blocks found at any path, exact against autograd; attention switched to eager."""

from __future__ import annotations

import pytest

import mebp_compiler
from mebp_compiler import models
from mebp_compiler.capture import AttentionSwitched
from tests.conftest import assert_matches_autograd, autograd_reference, lora_model, random_batch


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
