"""Batches of other shapes (issue 14.7): examples of varying length padded into a few length
buckets, a plan per bucket from a `PlanCache`, each step exact vs autograd with the same mask."""

from __future__ import annotations

import json

import pytest
import torch

from mebp_compiler import BatchShapeError, PlanCache, TooManyShapes
from mebp_compiler.app import data
from mebp_compiler.app.cli import main
from tests.conftest import assert_matches_autograd, autograd_reference, lora_model

LENGTHS = [3, 5, 6, 9, 11, 12, 12, 17, 20, 24, 7, 4]


def examples(lengths=LENGTHS, seed: int = 0) -> list[data.Example]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, 256, (n,), generator=generator)
        labels = ids.clone()
        labels[0] = data.IGNORE_INDEX
        out.append((ids, labels))
    return out


def test_length_buckets_pad_every_example_into_at_most_k_lengths():
    buckets = data.length_buckets(examples(), buckets=3, batch_size=2, pad=0)
    assert 1 <= len(buckets) <= 3 and [b.length for b in buckets] == sorted({b.length for b in buckets})
    assert buckets[-1].length == max(LENGTHS) and sum(len(b) for b in buckets) == len(LENGTHS)
    seen = []
    for bucket in buckets:
        rows = bucket.rows
        assert len(bucket) >= 2 and rows["input_ids"].shape == (len(bucket), bucket.length)
        tokens = rows["attention_mask"].sum(dim=1)
        seen += tokens.tolist()
        for row, n in enumerate(tokens.tolist()):  # right padding: mask 0 and label -100 after the tokens
            assert rows["attention_mask"][row, :n].all() and not rows["attention_mask"][row, n:].any()
            assert (rows["labels"][row, n:] == data.IGNORE_INDEX).all()
    assert sorted(seen) == sorted(LENGTHS)


def test_a_bucket_too_small_for_a_batch_joins_the_next_longer_one():
    buckets = data.length_buckets(examples([2, 3, 10, 11, 30]), buckets=5, batch_size=2)
    assert [(b.length, len(b)) for b in buckets] == [(3, 2), (30, 3)]


def test_bucket_batches_are_one_shape_each_and_follow_the_seed():
    buckets = data.length_buckets(examples(), buckets=3, batch_size=2)
    stream = data.bucket_batches(buckets, 2, seed=1)
    batches = [next(stream) for _ in range(12)]
    assert {b["input_ids"].shape for b in batches} == {(2, b.length) for b in buckets}
    again = data.bucket_batches(buckets, 2, seed=1, skip=3)
    assert all(torch.equal(next(again)["input_ids"], b["input_ids"]) for b in batches[3:])


@pytest.mark.parametrize("policy", ["none", "mebp", "optimal"])
def test_a_plan_cache_compiles_a_plan_per_bucket_and_every_step_is_exact(policy):
    model = lora_model("tiny-llama")
    buckets = data.length_buckets(examples(), buckets=3, batch_size=2)
    options = {"budget": "64MB", "work_limit": 5} if policy == "optimal" else {}
    cache = PlanCache(model, policy, options, max_shapes=len(buckets))
    stream = data.bucket_batches(buckets, 2, seed=0)
    for _ in range(2 * len(buckets) + 2):
        batch = next(stream)
        assert_matches_autograd(cache.step(batch), autograd_reference(model, batch))
    assert len(cache) == len(buckets) >= 2
    assert sorted(p.batch_shape for p in cache.plans.values()) == [(2, b.length) for b in buckets]
    assert cache.lora_parameters() == cache.plans[next(iter(cache.plans))].lora_parameters()


def test_a_plan_cache_bounds_its_shapes_and_a_plan_keeps_its_own():
    model = lora_model("tiny-llama")
    short, long = (data.padded(examples([5, 6]), n) for n in (6, 12))
    cache = PlanCache(model, "mebp", max_shapes=1)
    cache.step(short)
    with pytest.raises(TooManyShapes, match=r"\(2, 12\).*1 shapes already.*max_shapes"):
        cache.step(long)
    with pytest.raises(BatchShapeError, match="compiled for"):
        next(iter(cache.plans.values())).step(long)


def write_records(path, lengths) -> None:
    text = "the quick brown fox jumps over the lazy dog " * 4
    path.write_text("".join(json.dumps({"text": text[:n]}) + "\n" for n in lengths))


def test_cli_train_on_varying_lengths_compiles_one_plan_per_bucket(tmp_path):
    records = tmp_path / "records.jsonl"
    write_records(records, [4, 6, 9, 13, 15, 22, 27, 31, 40, 44])
    code = main(["train", "--model", "tiny-llama", "--data", str(records), "--buckets", "3", "--seq-len", "32",
                 "--batch-size", "2", "--steps", "8", "--no-progress", "--out", str(tmp_path / "run")])
    assert code == 0
    expected = data.length_buckets(data.labelled_examples(data.ByteTokenizer(), records, 32), 3, 2)
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert len(history["loss"]) == 8
    assert sorted(map(tuple, history["compiled_shapes"])) == [(2, b.length) for b in expected]
    assert len(expected) >= 2


def test_cli_buckets_need_records_and_backprop(tmp_path, capsys):
    assert main(["train", "--model", "tiny-llama", "--buckets", "2", "--steps", "1"]) == 2
    assert "--buckets pads the records of a .jsonl file" in capsys.readouterr().err
    records = tmp_path / "records.jsonl"
    write_records(records, [4, 9])
    assert main(["train", "--model", "tiny-llama", "--data", str(records), "--buckets", "2", "--steps", "1",
                 "--method", "mezo"]) == 2
    assert "--buckets apply to --method backprop only" in capsys.readouterr().err


def test_cli_train_with_buckets_resumes_bitwise(tmp_path):
    """The bucketed stream skips what a checkpoint consumed: 2 steps, then 2 resumed from their
    checkpoint, end with the adapter of 4 uninterrupted steps."""
    from safetensors.torch import load_file

    records = tmp_path / "records.jsonl"
    write_records(records, [4, 6, 9, 13, 15, 22, 27, 31])
    common = ["train", "--model", "tiny-llama", "--data", str(records), "--buckets", "2", "--seq-len", "32",
              "--batch-size", "2", "--no-progress", "--lr", "1e-2"]
    assert main([*common, "--steps", "4", "--out", str(tmp_path / "whole")]) == 0
    assert main([*common, "--steps", "2", "--checkpoint-every", "2", "--out", str(tmp_path / "first")]) == 0
    assert main([*common, "--steps", "4", "--resume", str(tmp_path / "first" / "checkpoint"),
                 "--out", str(tmp_path / "resumed")]) == 0
    whole, resumed = (load_file(tmp_path / r / "adapter" / "adapter_model.safetensors") for r in ("whole", "resumed"))
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
