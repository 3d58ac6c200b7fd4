"""Fine-tuning text and token batches.

The text is read at run time; nothing is copied into the repository. The default
corpus is the English help text of CPython's ``pydoc`` topics (``pydoc_data``,
part of every CPython install, roughly 0.5 MB), so a fine-tuning run needs no
download.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["ByteTokenizer", "batches", "load_text", "split_blocks", "token_blocks"]


def load_text(source: str | pathlib.Path | None = None) -> str:
    """Return fine-tuning text.

    Args:
        source: ``None`` or ``"pydoc"`` for the CPython ``pydoc_data.topics.topics``
            texts (values joined in sorted key order, separated by blank lines);
            a path to a ``.txt`` file for its UTF-8 text; a path to a ``.jsonl``
            file for the ``"text"`` field of every non-blank line, joined by blank
            lines.

    Raises:
        FileNotFoundError: the file does not exist (the message names the path).
        ValueError: the file is not UTF-8 text (the message names it and the
            first bad byte), a ``.jsonl`` line is not a JSON object with a string
            ``"text"`` field (the message names the file and line number), or the
            file suffix is neither ``.txt`` nor ``.jsonl``.
    """
    if source is None or source == "pydoc":
        from pydoc_data.topics import topics

        return "\n\n".join(topics[key] for key in sorted(topics))
    path = pathlib.Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"fine-tuning text file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            return path.read_text(encoding="utf-8")
        if suffix == ".jsonl":
            return "\n\n".join(_jsonl_texts(path))
    except UnicodeDecodeError as err:
        raise ValueError(
            f"fine-tuning text file {path} is not UTF-8 text (byte {err.start}, "
            f"0x{err.object[err.start]:02x}: {err.reason}); is it a binary file? Give a "
            f"UTF-8 {suffix} file"
        ) from None
    raise ValueError(
        f"unsupported fine-tuning text file {path}: expected a .txt or .jsonl file, "
        f"or 'pydoc' for the built-in corpus"
    )


def _jsonl_texts(path: pathlib.Path) -> list[str]:
    """The ``"text"`` field of every non-blank line of a JSON-lines file."""
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(
                f'{path}, line {number}: expected a JSON object with a string "text" field'
            )
        texts.append(record["text"])
    return texts


class ByteTokenizer:
    """UTF-8 bytes as token ids (0-255), for models that ship no tokenizer.

    The random-weight and tiny models have no tokenizer of their own; feeding them real
    text as bytes still gives a learnable next-token task (vocabulary >= 256 required).
    """

    def __call__(self, text: str, **_: Any) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode("utf-8"))}


def token_blocks(
    tokenizer: Callable[..., Any], text: str, seq_len: int
) -> torch.Tensor:
    """Tokenize ``text`` once and cut it into consecutive, non-overlapping blocks.

    Args:
        tokenizer: a Hugging Face tokenizer (called as ``tokenizer(text,
            add_special_tokens=False)`` and read through ``["input_ids"]``).
        text: the corpus.
        seq_len: tokens per block.

    Returns:
        int64 tensor of shape ``[n, seq_len]``, ``n = len(tokens) // seq_len``; the
        tokens after the last whole block are dropped.

    Raises:
        ValueError: ``seq_len < 1`` or the text has fewer than ``seq_len`` tokens.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(
            f"the text has {len(ids)} tokens, fewer than one block of seq_len={seq_len}"
        )
    return torch.tensor(ids[: n * seq_len], dtype=torch.int64).view(n, seq_len)


def split_blocks(
    blocks: torch.Tensor, heldout_fraction: float = 0.1, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split blocks into (train, heldout) by a seeded random choice of heldout rows.

    ``round(n * heldout_fraction)`` rows (at least 1 when the fraction is > 0) are
    held out; both parts keep the original row order. The same ``blocks`` and
    ``seed`` always give the same split.

    Raises:
        ValueError: the fraction is outside ``[0, 1)`` or leaves no training block.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    n = blocks.shape[0]
    n_heldout = round(n * heldout_fraction)
    if heldout_fraction > 0:
        n_heldout = max(n_heldout, 1)
    if n_heldout >= n:
        raise ValueError(
            f"cannot hold out {n_heldout} of {n} blocks and keep a training block; "
            f"use more text, a shorter seq_len or a smaller heldout_fraction"
        )
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    heldout_rows = order[:n_heldout].sort().values
    train_rows = order[n_heldout:].sort().values
    return blocks[train_rows], blocks[heldout_rows]


def batches(
    blocks: torch.Tensor,
    batch_size: int,
    *,
    seed: int = 0,
    steps: int | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield causal-LM training batches drawn from ``blocks`` ``[n, seq_len]``.

    Each epoch visits the blocks in a fresh permutation from a ``torch.Generator``
    seeded with ``seed`` (so the whole stream is determined by ``seed``) and yields
    ``n // batch_size`` full batches; the remainder of an epoch is skipped. Each
    batch is ``{"input_ids": LongTensor[batch_size, seq_len], "labels": a clone of
    it}`` (the model shifts labels itself). Yields forever, or ``steps`` batches.

    Raises:
        ValueError: ``batch_size`` is < 1 or more than the number of blocks, or
            ``steps`` is negative.
    """
    n = blocks.shape[0]
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be between 1 and the {n} blocks, got {batch_size}")
    if steps is not None and steps < 0:
        raise ValueError(f"steps must be >= 0 or None, got {steps}")
    return _batch_stream(blocks, batch_size, seed, steps)


def _batch_stream(
    blocks: torch.Tensor, batch_size: int, seed: int, steps: int | None
) -> Iterator[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    per_epoch = blocks.shape[0] // batch_size
    produced = 0
    while steps is None or produced < steps:
        order = torch.randperm(blocks.shape[0], generator=generator)
        for i in range(per_epoch):
            if steps is not None and produced >= steps:
                return
            input_ids = blocks[order[i * batch_size : (i + 1) * batch_size]].long()
            yield {"input_ids": input_ids, "labels": input_ids.clone()}
            produced += 1
