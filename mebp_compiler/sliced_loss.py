"""LM head + cross-entropy streamed over vocabulary slices, never holding `[tokens x vocab]`.

The idea is that of Cut Cross-Entropy (Wijmans et al., "Cut Your Losses in
Large-Vocabulary Language Models", 2024): the forward keeps only a running log-sum-exp and
the target logit per token while it walks over slices of the vocabulary; the backward
walks the slices again, recomputes each slice's logits and adds its contribution to the
gradient of the hidden states. At any moment one `[tokens x slice]` block of logits is
live, and each slice of the (frozen) head weight is read just for its matmul, so an INT4
head is decompressed one slice at a time (see `passes.quantize`, which turns the row slice
of a quantized weight into a dequantization of those rows only).

The function is traced by `capture` like any other op sequence: its forward ops land in
the forward of the graph and its hand-written backward in the backward.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

IGNORE_INDEX = -100


def check_labels(labels: torch.Tensor, vocab_size: int, key: str = "labels") -> None:
    """Raise ValueError unless every label is IGNORE_INDEX or in [0, vocab_size), as cross-entropy requires.

    Cross-entropy refuses such a label; the sliced loss would silently count a negative one
    with a target logit of 0, so a batch is checked before any compute.
    """
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        value = labels[bad][0].item()
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"batch['{key}'] holds {value} at {where}: a label must be {IGNORE_INDEX} (ignored) or a "
                         f"token id in [0, {vocab_size}) of the model's vocabulary of {vocab_size}")


def slice_bounds(rows: int, slices: int) -> list[tuple[int, int]]:
    """`slices` contiguous [start, end) row ranges covering `rows`, sizes differing by at most one."""
    edges = [rows * k // slices for k in range(slices + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _logits(hidden: torch.Tensor, weight_rows: torch.Tensor, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, raw logits) of one vocabulary slice, in fp32; softcapping as Gemma's final layer does."""
    raw = (hidden @ weight_rows.t()).float()
    if softcap is None:
        return raw, raw
    return torch.tanh(raw / softcap) * softcap, raw


class _SlicedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, slices, softcap):
        tokens = hidden.shape[0]
        running_max = hidden.new_full((tokens,), float("-inf"), dtype=torch.float32)
        running_sum = hidden.new_zeros((tokens,), dtype=torch.float32)
        target = hidden.new_zeros((tokens,), dtype=torch.float32)
        for start, end in slice_bounds(weight.shape[0], slices):
            logits, _ = _logits(hidden, weight[start:end], softcap)
            new_max = torch.maximum(running_max, logits.amax(dim=-1))
            running_sum = running_sum * torch.exp(running_max - new_max) + torch.exp(
                logits - new_max[:, None]).sum(dim=-1)
            running_max = new_max
            in_slice = (labels >= start) & (labels < end)
            column = torch.clamp(labels - start, 0, end - start - 1)
            picked = logits.gather(1, column[:, None]).squeeze(1)
            target = target + torch.where(in_slice, picked, torch.zeros_like(picked))
        lse = running_max + torch.log(running_sum)
        ctx.save_for_backward(hidden, weight, labels, lse, target)
        ctx.slices, ctx.softcap = slices, softcap
        return torch.where(labels != IGNORE_INDEX, lse - target, torch.zeros_like(lse)).sum()

    @staticmethod
    def backward(ctx, grad_loss):
        # d loss / d logit_j = (softmax_j - [j == label]) per token, times the softcap's
        # derivative 1 - tanh(raw / cap)^2 = 1 - (logit / cap)^2. The one-hot term is one
        # row of the head per token: gathered once (an embedding lookup, which INT4
        # weights serve row by row) instead of a [tokens x slice] mask per slice.
        # The gradient is summed over the slices in fp32 and rounded to the hidden states'
        # dtype once, as the unsliced head's one matmul over the whole vocabulary does: in
        # bfloat16 or float16 a sum rounded after every slice drifts from it by a rounding
        # per slice. Each slice multiplies the logits' gradient rounded to that dtype (what
        # the unsliced head's matmul reads) by the head rows, in fp32 (a no-op in fp32).
        hidden, weight, labels, lse, target = ctx.saved_tensors
        softcap = ctx.softcap
        token_scale = torch.where(labels != IGNORE_INDEX, grad_loss.expand_as(lse), torch.zeros_like(lse))
        target_rows = torch.nn.functional.embedding(labels.clamp_min(0), weight).float()
        if softcap is None:
            # The unsliced head rounds the target logit's gradient (p - 1) * scale to the
            # dtype; the slices below add p * scale rounded, so the target row gets the
            # difference: the same terms as the unsliced matmul sums (exact in fp32 but
            # for a rounding when the two are 2^16 apart).
            soft = torch.exp(target - lse) * token_scale
            target_scale = (soft - token_scale).to(hidden.dtype).float() - soft.to(hidden.dtype).float()
            grad_hidden = target_scale[:, None] * target_rows
        else:
            grad_hidden = -((token_scale * (1 - (target / softcap) ** 2))[:, None] * target_rows)
        for start, end in slice_bounds(weight.shape[0], ctx.slices):
            rows = weight[start:end]
            logits, raw = _logits(hidden, rows, softcap)
            grad_logits = torch.exp(logits - lse[:, None]) * token_scale[:, None]
            if softcap is not None:
                grad_logits = grad_logits * (1 - torch.tanh(raw / softcap) ** 2)
            grad_hidden = grad_hidden + grad_logits.to(hidden.dtype).float() @ rows.float()
        return grad_hidden.to(hidden.dtype), None, None, None, None


def sliced_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    slices: int,
    softcap: float | None = None,
) -> torch.Tensor:
    """Summed cross-entropy of `hidden @ weight.T` against `labels` (-100 ignored), `slices` vocab rows at a time.

    `hidden` is [..., d], `weight` the frozen [vocab, d] head, `labels` int64 shaped like
    `hidden` without its last dimension. Equals `cross_entropy(linear(hidden, weight),
    labels, ignore_index=-100, reduction="sum")` up to float rounding; the gradient flows to
    `hidden` only (the head weight must be frozen).
    """
    if weight.requires_grad:
        raise ValueError("the vocabulary-sliced loss needs a frozen head weight (it returns no weight gradient)")
    if not 1 <= slices <= weight.shape[0]:
        raise ValueError(f"vocab slices must be between 1 and the vocabulary size {weight.shape[0]}, got {slices}")
    if not (is_fake(labels) or labels.is_meta):  # traced: the step's batch is checked before it runs
        check_labels(labels, weight.shape[0])
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    return _SlicedLinearCrossEntropy.apply(flat_hidden, weight, labels.reshape(-1), slices, softcap)
