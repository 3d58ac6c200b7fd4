"""Tests for mebp_compiler.data: corpus loading, token blocks, splits and batches."""

from __future__ import annotations

import json
import re

import pytest
import torch

from mebp_compiler import data, models


def char_tokenizer(text, add_special_tokens=False, verbose=False):
    """A stand-in for a Hugging Face tokenizer: one token per character."""
    return {"input_ids": [ord(c) for c in text]}


def test_pydoc_text_is_large_and_default():
    text = data.load_text()
    assert len(text.encode()) > 300_000
    assert data.load_text("pydoc") == text
    assert "assert" in text


def test_txt_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("héllo\nworld\n", encoding="utf-8")
    assert data.load_text(str(path)) == "héllo\nworld\n"


def test_jsonl_file(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text(
        "\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["one", "two"])) + "\n\n"
    )
    assert data.load_text(path) == "one\n\ntwo"


@pytest.mark.parametrize("bad_line", ["{not json", '{"body": "x"}', '["text"]'])
def test_jsonl_error_names_the_line(tmp_path, bad_line):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + bad_line + "\n")
    with pytest.raises(ValueError, match=r"line 2\b") as info:
        data.load_text(str(path))
    assert str(path) in str(info.value)


def test_missing_and_unsupported_files(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        data.load_text(str(missing))
    other = tmp_path / "corpus.csv"
    other.write_text("a,b\n")
    with pytest.raises(ValueError, match=r"\.txt or \.jsonl"):
        data.load_text(str(other))


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_a_binary_file_names_itself_and_the_bad_byte(tmp_path, suffix):
    path = tmp_path / f"weights{suffix}"
    path.write_bytes(b'{"text": "ok"}\n' + bytes([0x89, 0x50, 0x4E, 0x47]))  # a PNG header after a good line
    with pytest.raises(ValueError, match=r"is not UTF-8 text \(byte 15, 0x89: invalid start byte\); is it a binary"):
        data.load_text(path)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        data.load_text(path)


def test_token_blocks_cuts_consecutive_blocks():
    blocks = data.token_blocks(char_tokenizer, "abcdefghij", 3)
    assert blocks.dtype == torch.int64 and blocks.shape == (3, 3)
    assert blocks.flatten().tolist() == [ord(c) for c in "abcdefghi"]
    with pytest.raises(ValueError, match="fewer than one block"):
        data.token_blocks(char_tokenizer, "ab", 3)


def test_token_blocks_smollm2_pydoc():
    tokenizer = models.load_tokenizer()
    text = data.load_text()
    blocks = data.token_blocks(tokenizer, text, 128)
    n_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert blocks.shape == (n_tokens // 128, 128) and blocks.dtype == torch.int64
    assert text.startswith(tokenizer.decode(blocks[0].tolist()))


def test_split_blocks_is_deterministic_partition():
    blocks = torch.arange(50).view(25, 2)
    train, heldout = data.split_blocks(blocks, 0.2, seed=3)
    assert (len(train), len(heldout)) == (20, 5)
    rows = sorted(train[:, 0].tolist() + heldout[:, 0].tolist())
    assert rows == blocks[:, 0].tolist()
    assert train[:, 0].tolist() == sorted(train[:, 0].tolist())
    again = data.split_blocks(blocks, 0.2, seed=3)
    assert torch.equal(again[0], train) and torch.equal(again[1], heldout)
    assert not torch.equal(data.split_blocks(blocks, 0.2, seed=4)[1], heldout)
    assert len(data.split_blocks(blocks[:3], 0.1)[1]) == 1
    with pytest.raises(ValueError):
        data.split_blocks(blocks[:1], 0.1)
    with pytest.raises(ValueError):
        data.split_blocks(blocks, 1.0)


def test_batches_deterministic_and_epoch_permutations():
    blocks = torch.arange(24).view(12, 2)
    first = list(data.batches(blocks, 4, seed=7, steps=6))
    second = list(data.batches(blocks, 4, seed=7, steps=6))
    assert len(first) == 6
    for a, b in zip(first, second):
        assert torch.equal(a["input_ids"], b["input_ids"])
    for batch in first:
        assert batch["input_ids"].shape == (4, 2) and batch["input_ids"].dtype == torch.int64
        assert torch.equal(batch["labels"], batch["input_ids"])
        assert batch["labels"].data_ptr() != batch["input_ids"].data_ptr()
    epochs = [torch.cat([b["input_ids"][:, 0] for b in first[i : i + 3]]) for i in (0, 3)]
    for epoch in epochs:  # each epoch visits every block once
        assert sorted(epoch.tolist()) == blocks[:, 0].tolist()
    assert not torch.equal(epochs[0], epochs[1])
    other = list(data.batches(blocks, 4, seed=8, steps=6))
    assert any(not torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, other))


def test_batches_forever_and_errors():
    stream = data.batches(torch.zeros(5, 3, dtype=torch.int64), 2)
    assert len([next(stream) for _ in range(10)]) == 10  # 2 per epoch, remainder skipped
    with pytest.raises(ValueError, match="batch_size"):
        data.batches(torch.zeros(5, 3), 6)
    with pytest.raises(ValueError, match="steps"):
        data.batches(torch.zeros(5, 3), 2, steps=-1)
