"""Tests for mebp_compiler.app.data: corpus loading, token blocks, splits and batches."""

from __future__ import annotations

import json
import re

import pytest
import torch

from mebp_compiler.app import data, models


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


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def test_prompt_completion_records_are_packed_and_mask_prompt_ignores_only_the_prompts(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": "Q1? ", "completion": "A1."},
                                               {"prompt": "Q22? ", "completion": "A22."}])
    tokenizer = data.ByteTokenizer()
    stream = "Q1? A1.\n\nQ22? A22.\n\n"
    ids, labels = data.labelled_blocks(tokenizer, path, len(stream) // 2)
    assert bytes(ids.flatten().tolist()).decode() == stream[: ids.numel()]
    assert torch.equal(labels, ids)
    ids, labels = data.labelled_blocks(tokenizer, path, len(stream), mask_prompt=True)
    learned = "".join(chr(t) if t != data.IGNORE_INDEX else "_" for t in labels.flatten().tolist())
    assert learned == "____A1.\n\n_____A22.\n\n"


def test_chat_records_go_through_the_chat_template_and_mask_all_but_the_answers(tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    tokenizer = data.ByteTokenizer()
    rendered = tokenizer.apply_chat_template(messages, tokenize=False) + "\n\n"
    ids, labels = data.labelled_blocks(tokenizer, path, len(rendered), mask_prompt=True)
    assert bytes(ids[0].tolist()).decode() == rendered
    learned = bytes(t for t in labels[0].tolist() if t != data.IGNORE_INDEX).decode()
    assert learned == "Hello.<|im_end|>\n\n\n"


def test_chat_records_with_smollm2s_own_template(tmp_path):
    tokenizer = models.load_tokenizer("smollm2-135m")
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}] * 4)
    ids, _ = data.labelled_blocks(tokenizer, path, 16)
    whole = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(ids.flatten().tolist()).startswith(whole)
    _, labels = data.labelled_blocks(tokenizer, path, 16, mask_prompt=True)
    answers = tokenizer.decode([t for t in labels.flatten().tolist() if t != data.IGNORE_INDEX])
    assert "4<|im_end|>" in answers and "2+2" not in answers and "user" not in answers


@pytest.mark.parametrize("records, says", [
    ([{"prompt": "a", "completion": "b"}, {"text": "c"}], r"line 2: expected \"prompt\" and \"completion\""),
    ([{"messages": []}], r"line 1: \"messages\" must be a non-empty list"),
    ([{"prompt": 1, "completion": "b"}], "must be strings"),
    ([{"body": "x"}], "line 1: expected a \"text\" field"),
])
def test_bad_records_name_the_line(tmp_path, records, says):
    with pytest.raises(ValueError, match=says):
        data.labelled_blocks(data.ByteTokenizer(), write_jsonl(tmp_path / "bad.jsonl", records), 4)


def test_mask_prompt_on_plain_text_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": "plain text " * 10}])
    with pytest.raises(ValueError, match="--mask-prompt masks the prompts"):
        data.labelled_blocks(data.ByteTokenizer(), path, 8, mask_prompt=True)


def test_batches_carry_labels_and_skip_continues_the_same_stream():
    blocks = torch.arange(60).view(10, 6)
    labels = blocks.clone()
    labels[:, :3] = data.IGNORE_INDEX
    whole = list(data.batches(blocks, 3, seed=4, steps=7, labels=labels))
    tail = list(data.batches(blocks, 3, seed=4, steps=2, labels=labels, skip=5))
    assert all(torch.equal(a["labels"], b["labels"]) and torch.equal(a["input_ids"], b["input_ids"])
               for a, b in zip(whole[5:], tail, strict=True))
    assert all(torch.equal(b["labels"][:, 3:], b["input_ids"][:, 3:]) for b in whole)
