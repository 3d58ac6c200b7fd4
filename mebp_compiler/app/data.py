"""Fine-tuning text and token batches.

The text is read at run time; nothing is copied into the repository. The default
corpus is the English help text of CPython's ``pydoc`` topics (``pydoc_data``,
part of every CPython install, roughly 0.5 MB), so a fine-tuning run needs no
download.
"""

from __future__ import annotations

import itertools
import json
import math
import pathlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["IGNORE_INDEX", "Bucket", "ByteTokenizer", "batches", "bucket_batches", "jsonl_format", "labelled_blocks",
           "labelled_examples", "length_buckets", "load_text", "pad_id", "padded", "split_blocks", "token_blocks"]

#: Label of a token the loss ignores (transformers' and torch's cross-entropy default).
IGNORE_INDEX = -100
#: The record formats of a `.jsonl` file, by the keys of its records.
JSONL_FORMATS = {"text": ("text",), "completion": ("prompt", "completion"), "chat": ("messages",)}


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
    for number, record in _jsonl_records(path):
        if not isinstance(record.get("text"), str):
            raise ValueError(
                f'{path}, line {number}: expected a JSON object with a string "text" field'
            )
        texts.append(record["text"])
    return texts


def _jsonl_records(path: pathlib.Path) -> Iterator[tuple[int, dict]]:
    """(line number, JSON object) for every non-blank line of a JSON-lines file."""
    if not path.is_file():
        raise FileNotFoundError(f"fine-tuning text file not found: {path}")
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f'{path}, line {number}: expected a JSON object with a string "text" field')
        yield number, record


class ByteTokenizer:
    """UTF-8 bytes as token ids (0-255), for models that ship no tokenizer.

    The random-weight and tiny models have no tokenizer of their own; feeding them real
    text as bytes still gives a learnable next-token task (vocabulary >= 256 required).
    """

    eos_token_id = None

    def __call__(self, text: str, **_: Any) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode("utf-8"))}

    def decode(self, ids: Any, **_: Any) -> str:
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict[str, str]], *, tokenize: bool = False,
                            add_generation_prompt: bool = False, **_: Any) -> str:
        """ChatML (`<|im_start|>role\ncontent<|im_end|>\n`, SmolLM2's own format), as text."""
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


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


def jsonl_format(path: str | pathlib.Path) -> str:
    """The record format of a `.jsonl` file: "text", "completion" (prompt/completion) or "chat" (messages).

    Decided by the first record's keys; `labelled_blocks` checks every other record.

    Raises:
        ValueError: the first record is not a JSON object with one of those field sets.
    """
    path = pathlib.Path(path)
    for number, record in _jsonl_records(path):
        for name, keys in JSONL_FORMATS.items():
            if all(k in record for k in keys):
                return name
        raise ValueError(f'{path}, line {number}: expected a "text" field, "prompt" and "completion" fields, '
                         f'or a "messages" list')
    raise ValueError(f"{path} holds no records")


def labelled_blocks(tokenizer: Any, source: str | pathlib.Path | None, seq_len: int, *,
                    mask_prompt: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token blocks and their labels from any supported source.

    Text (`pydoc`, `.txt`, `.jsonl` with `text`) is cut as `token_blocks` cuts it, with
    labels equal to the tokens. A `.jsonl` of `prompt`/`completion` records or of chat
    `messages` (rendered by the tokenizer's chat template, one message at a time so each
    token is known to be the prompt's or the answer's) is packed: each record's tokens
    followed by the tokenizer's end-of-sequence token (or a blank line where it has none),
    the records one after another, cut into blocks of `seq_len`. With `mask_prompt` the
    labels of prompt tokens (the prompt; every message not from the assistant, and each
    assistant turn's header) are `IGNORE_INDEX`, so the loss counts only the answers;
    blocks left with no label to learn are dropped.

    Returns:
        int64 `input_ids` and `labels`, each `[n, seq_len]`.

    Raises:
        ValueError: `mask_prompt` on text records, a record of another format than the
            file's first, a chat file and a tokenizer without a chat template, or too little
            text for one block (see `load_text` and `token_blocks` for the others).
    """
    path = None if source is None or source == "pydoc" else pathlib.Path(source)
    kind = jsonl_format(path) if path is not None and path.suffix.lower() == ".jsonl" and path.is_file() else "text"
    if kind == "text":
        if mask_prompt:
            raise ValueError(f"--mask-prompt masks the prompts of prompt/completion or chat records, and "
                             f"{source or 'pydoc'} is plain text: drop --mask-prompt or give such a .jsonl file")
        blocks = token_blocks(tokenizer, load_text(source), seq_len)
        return blocks, blocks.clone()
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if kind == "chat" and not callable(getattr(tokenizer, "apply_chat_template", None)):
        raise ValueError(f"{path} holds chat messages, and this model's tokenizer has no chat template")
    ids: list[int] = []
    learn: list[bool] = []
    for record_ids, record_learn in _record_tokens(tokenizer, path, kind, mask_prompt):
        ids += record_ids
        learn += record_learn
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"{path} has {len(ids)} tokens, fewer than one block of seq_len={seq_len}")
    input_ids = torch.tensor(ids[: n * seq_len], dtype=torch.int64).view(n, seq_len)
    labels = torch.where(torch.tensor(learn[: n * seq_len]).view(n, seq_len), input_ids, IGNORE_INDEX)
    has_target = (labels[:, 1:] != IGNORE_INDEX).any(dim=1)  # the first label of a block is never predicted
    if not has_target.any():
        raise ValueError(f"every block of {path} is prompt only with --mask-prompt; use a longer --seq-len")
    return input_ids[has_target], labels[has_target]


def _record_tokens(tokenizer: Any, path: pathlib.Path, kind: str,
                   mask_prompt: bool) -> Iterator[tuple[list[int], list[bool]]]:
    """Each record's token ids followed by the end-of-record tokens, and whether each is learnt."""
    end = _end_of_record(tokenizer)
    for number, record in _jsonl_records(path):
        ids: list[int] = []
        learn: list[bool] = []
        for text, is_answer in _record_parts(tokenizer, record, kind, f"{path}, line {number}"):
            piece = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
            ids += piece
            learn += [is_answer or not mask_prompt] * len(piece)
        yield ids + end, learn + [True] * len(end)


def _end_of_record(tokenizer: Any) -> list[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    return [eos] if isinstance(eos, int) else tokenizer("\n\n", add_special_tokens=False, verbose=False)["input_ids"]


def _record_parts(tokenizer: Any, record: dict, kind: str, where: str) -> list[tuple[str, bool]]:
    """A record as (text, is_answer) pieces in order."""
    if not all(k in record for k in JSONL_FORMATS[kind]):
        keys = " and ".join(f'"{k}"' for k in JSONL_FORMATS[kind])
        raise ValueError(f"{where}: expected {keys}, as the file's first record has")
    if kind == "text":
        if not isinstance(record["text"], str):
            raise ValueError(f'{where}: "text" must be a string')
        return [(record["text"], True)]
    if kind == "completion":
        if not (isinstance(record["prompt"], str) and isinstance(record["completion"], str)):
            raise ValueError(f'{where}: "prompt" and "completion" must be strings')
        return [(record["prompt"], False), (record["completion"], True)]
    messages = record["messages"]
    if not (isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages)):
        raise ValueError(f'{where}: "messages" must be a non-empty list of {{"role": ..., "content": ...}} objects')
    parts, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":  # its header is the prompt's, its content the answer
            header = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            parts.append((header[len(done):], False))
            done = header
        rendered = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not rendered.startswith(done):
            raise ValueError(f"{where}: the chat template renders message {i + 1} by changing the earlier "
                             "ones, so its tokens cannot be told apart")
        parts.append((rendered[len(done):], message["role"] == "assistant"))
        done = rendered
    return parts


def split_blocks(
    blocks: torch.Tensor, heldout_fraction: float = 0.1, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split blocks into (train, heldout) by a seeded random choice of heldout rows (`split_rows`)."""
    train_rows, heldout_rows = split_rows(blocks.shape[0], heldout_fraction, seed)
    return blocks[train_rows], blocks[heldout_rows]


def split_rows(n: int, heldout_fraction: float = 0.1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The (train, heldout) row indices of `n` blocks, chosen by a seeded permutation.

    ``round(n * heldout_fraction)`` rows (at least 1 when the fraction is > 0) are
    held out; both parts keep the original row order. The same ``n`` and ``seed``
    always give the same split.

    Raises:
        ValueError: the fraction is outside ``[0, 1)`` or leaves no training block.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
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
    return order[n_heldout:].sort().values, order[:n_heldout].sort().values


def batches(
    blocks: torch.Tensor,
    batch_size: int,
    *,
    seed: int = 0,
    steps: int | None = None,
    labels: torch.Tensor | None = None,
    skip: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield causal-LM training batches drawn from ``blocks`` ``[n, seq_len]``.

    Each epoch visits the blocks in a fresh permutation from a ``torch.Generator``
    seeded with ``seed`` (so the whole stream is determined by ``seed``) and yields
    ``n // batch_size`` full batches; the remainder of an epoch is skipped. Each
    batch is ``{"input_ids": LongTensor[batch_size, seq_len], "labels": ...}``: the
    same rows of ``labels`` (``[n, seq_len]``, e.g. from `labelled_blocks`), or a clone
    of the tokens without it (the model shifts labels itself). Yields forever, or
    ``steps`` batches, after passing over the stream's first ``skip`` batches (the
    stream a resumed run continues).

    Raises:
        ValueError: ``batch_size`` is < 1 or more than the number of blocks, ``steps``
            or ``skip`` is negative, or ``labels`` is not of the blocks' shape.
    """
    n = blocks.shape[0]
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be between 1 and the {n} blocks, got {batch_size}")
    if steps is not None and steps < 0:
        raise ValueError(f"steps must be >= 0 or None, got {steps}")
    if skip < 0:
        raise ValueError(f"skip must be >= 0, got {skip}")
    if labels is not None and labels.shape != blocks.shape:
        raise ValueError(f"labels {tuple(labels.shape)} and blocks {tuple(blocks.shape)} differ in shape")
    stream = _batch_stream(blocks, labels, batch_size, seed)
    for _ in range(skip):
        next(stream)
    return stream if steps is None else itertools.islice(stream, steps)


def _batch_stream(
    blocks: torch.Tensor, labels: torch.Tensor | None, batch_size: int, seed: int
) -> Iterator[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    per_epoch = blocks.shape[0] // batch_size
    while True:
        order = torch.randperm(blocks.shape[0], generator=generator)
        for i in range(per_epoch):
            rows = order[i * batch_size : (i + 1) * batch_size]
            input_ids = blocks[rows].long()
            yield {"input_ids": input_ids, "labels": input_ids.clone() if labels is None else labels[rows].long()}


#: One example: its token ids and labels, int64 tensors [length].
Example = tuple[torch.Tensor, torch.Tensor]


def labelled_examples(tokenizer: Any, source: str | pathlib.Path, seq_len: int, *,
                      mask_prompt: bool = False) -> list[Example]:
    """Each record of a `.jsonl` file as an example of its own (not packed with the others).

    A record's tokens are those `labelled_blocks` packs (the text, the prompt and completion,
    or the rendered chat; then the end-of-sequence token), with the same labels (prompt
    tokens `IGNORE_INDEX` under `mask_prompt`). A record longer than `seq_len` is cut into
    pieces of `seq_len` tokens and a shorter last one. Pieces with no label to predict (one
    token, or every label after the first ignored) are dropped.

    Raises:
        ValueError: `source` is not a `.jsonl` file, `seq_len` < 1, no example is left, or
            the file's records are malformed (see `labelled_blocks`).
    """
    path = pathlib.Path(source) if source not in (None, "pydoc") else None
    if path is None or path.suffix.lower() != ".jsonl":
        raise ValueError(f"examples of their own lengths come from the records of a .jsonl file, and "
                         f"{source or 'pydoc'} is plain text, which is packed into blocks of one length already")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    kind = jsonl_format(path)
    if mask_prompt and kind == "text":
        raise ValueError(f"--mask-prompt masks the prompts of prompt/completion or chat records, and {path} holds "
                         "text records")
    if kind == "chat" and not callable(getattr(tokenizer, "apply_chat_template", None)):
        raise ValueError(f"{path} holds chat messages, and this model's tokenizer has no chat template")
    examples = []
    for ids, learn in _record_tokens(tokenizer, path, kind, mask_prompt):
        for start in range(0, len(ids), seq_len):
            piece = torch.tensor(ids[start:start + seq_len], dtype=torch.int64)
            labels = torch.where(torch.tensor(learn[start:start + seq_len]), piece, IGNORE_INDEX)
            if (labels[1:] != IGNORE_INDEX).any():
                examples.append((piece, labels))
    if not examples:
        raise ValueError(f"{path} leaves no example with a token to predict")
    return examples


def pad_id(tokenizer: Any) -> int:
    """The token id padding is filled with: the tokenizer's pad token, else its end-of-sequence token, else 0.

    Its value changes nothing: padded positions have attention_mask 0 and label `IGNORE_INDEX`."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def padded(examples: Sequence[Example], length: int, pad: int = 0) -> dict[str, torch.Tensor]:
    """`examples` padded on the right to `length` tokens: `input_ids` (padding `pad`), `labels`
    (padding `IGNORE_INDEX`) and `attention_mask` (1 at tokens, 0 at padding), each [n, length]."""
    n = len(examples)
    batch = {"input_ids": torch.full((n, length), pad, dtype=torch.int64),
             "labels": torch.full((n, length), IGNORE_INDEX, dtype=torch.int64),
             "attention_mask": torch.zeros((n, length), dtype=torch.int64)}
    for row, (ids, labels) in enumerate(examples):
        if len(ids) > length:
            raise ValueError(f"an example of {len(ids)} tokens does not fit a length of {length}")
        batch["input_ids"][row, :len(ids)] = ids
        batch["labels"][row, :len(ids)] = labels
        batch["attention_mask"][row, :len(ids)] = 1
    return batch


@dataclass(frozen=True)
class Bucket:
    """Examples padded to one `length` (`padded`): `rows` maps `input_ids`, `labels` and
    `attention_mask`, each [n, length]."""

    length: int
    rows: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return self.rows["input_ids"].shape[0]


def length_buckets(examples: Sequence[Example], buckets: int, batch_size: int, pad: int = 0) -> list[Bucket]:
    """At most `buckets` lengths the examples are padded to, shortest first, each holding at least one batch.

    The lengths are the example lengths at the quantiles 1/k, 2/k, ..., 1 of their sorted
    lengths (k = `buckets`), so each length holds about as many examples; each example goes
    to the shortest length that fits it. A length left with fewer than `batch_size` examples
    gives them to the next longer one (the longest, to the one below it, which grows to the
    longest's length). So every example is trained on and padding stays within a bucket.

    Raises:
        ValueError: `buckets` or `batch_size` < 1, or fewer than `batch_size` examples.
    """
    if buckets < 1 or batch_size < 1:
        raise ValueError(f"buckets and batch_size must be 1 or more, got {buckets} and {batch_size}")
    if len(examples) < batch_size:
        raise ValueError(f"{len(examples)} examples are fewer than one batch of {batch_size}")
    lengths = sorted(len(ids) for ids, _ in examples)
    edges = sorted({lengths[math.ceil(i * len(lengths) / buckets) - 1] for i in range(1, buckets + 1)})
    members: list[list[Example]] = [[] for _ in edges]
    for example in examples:
        members[next(i for i, edge in enumerate(edges) if len(example[0]) <= edge)].append(example)
    i = 0
    while i < len(edges) - 1:  # too few for a batch: move them up to the next longer length
        if len(members[i]) < batch_size:
            members[i + 1] = members[i] + members[i + 1]
            del members[i], edges[i]
        else:
            i += 1
    if len(members) > 1 and len(members[-1]) < batch_size:  # the longest: down into the one below it
        longest, length = members.pop(), edges.pop()
        members[-1], edges[-1] = members[-1] + longest, length
    return [Bucket(edge, padded(group, edge, pad)) for edge, group in zip(edges, members, strict=True)]


def bucket_batches(buckets: Sequence[Bucket], batch_size: int, *, seed: int = 0,
                   skip: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Yield training batches forever, each `batch_size` rows of one bucket (one shape).

    Each epoch cuts every bucket, in a fresh permutation of its rows, into its full batches
    (the remainder of each is skipped), and visits all of them in a permutation of their
    own; every draw comes from one `torch.Generator` seeded with `seed`, so the stream is
    determined by `seed`. The stream's first `skip` batches are passed over (a resumed run).
    """
    if skip < 0:
        raise ValueError(f"skip must be >= 0, got {skip}")
    if any(len(b) < batch_size for b in buckets):
        raise ValueError(f"every bucket must hold at least one batch of {batch_size} (see length_buckets)")
    stream = _bucket_stream(buckets, batch_size, seed)
    for _ in range(skip):
        next(stream)
    return stream


def _bucket_stream(buckets: Sequence[Bucket], batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    while True:
        epoch = []
        for bucket in buckets:
            order = torch.randperm(len(bucket), generator=generator)
            epoch += [(bucket, order[i * batch_size:(i + 1) * batch_size]) for i in range(len(bucket) // batch_size)]
        for k in torch.randperm(len(epoch), generator=generator).tolist():
            bucket, rows = epoch[k]
            yield {key: value[rows] for key, value in bucket.rows.items()}
