"""The fast subset of the randomized exactness sweep (tests/sweep.py; all 100 seeds: bench/exactness_sweep.py)."""

from __future__ import annotations

import pytest

from tests.sweep import make_case, run_case

#: Twelve of the first 26 seeds, the quicker ones; they cover every architecture, policy (mebp with RAM and disk checkpoints, optimal at
#: budgets from near the least to MeBP's peak), both paddings and none, LoRA on lm_head,
#: head chunks, vocabulary slices, MLP chunks, INT4 and fused updates.
FAST_SEEDS = (0, 1, 3, 4, 5, 7, 8, 9, 10, 11, 13, 25)


def test_the_fast_seeds_cover_every_option():
    cases = [make_case(seed) for seed in FAST_SEEDS]
    assert {c.model for c in cases} == {"tiny-llama", "tiny-qwen2", "tiny-gemma3"}
    assert {c.policy for c in cases} == {"none", "mebp", "optimal"}
    assert {c.padding for c in cases} == {"none", "left", "right"}
    assert {c.checkpoints for c in cases if c.policy == "mebp"} == {"ram", "disk"}
    assert any("lm_head" in c.lora_targets for c in cases)
    assert all(any(getattr(c, flag) for c in cases) for flag in ("head_chunks", "vocab_slices", "mlp_chunks",
                                                                  "int4", "fuse_update"))


@pytest.mark.parametrize("seed", FAST_SEEDS)
def test_sweep_case_is_exact_and_held_equals_predicted(seed):
    run_case(make_case(seed))
