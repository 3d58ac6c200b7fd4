"""Held-out evaluation of a causal LM: loss, perplexity and next-token accuracy."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from mebp_compiler.app.data import IGNORE_INDEX


@dataclass(frozen=True)
class EvalResult:
    """Metrics over `tokens` predicted tokens.

    `loss` is the mean negative log-likelihood in nats per predicted token,
    `perplexity` its exponential, `accuracy` the fraction of tokens the argmax predicts.
    """

    loss: float
    perplexity: float
    accuracy: float
    tokens: int

    def to_json(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return (f"loss {self.loss:.4f} nats/token, perplexity {self.perplexity:.2f}, next-token accuracy "
                f"{100 * self.accuracy:.1f}% over {self.tokens} tokens")


def evaluate(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
             batch_size: int = 4) -> EvalResult:
    """`model`'s metrics on the blocks `input_ids` `[n, seq_len]`.

    Every position but the last of a block predicts the label of the next one (`labels`,
    default the tokens themselves); labels equal to `IGNORE_INDEX` (prompt tokens under
    `--mask-prompt`) are not counted. Plain eager forward passes without gradients, in
    batches of `batch_size` blocks, on the model's own weights (an INT4 plan's quantized
    copy is not what is evaluated); the parameters are not changed.

    Raises:
        ValueError: no block has a token to predict.
    """
    labels = input_ids if labels is None else labels
    total_nll, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start : start + batch_size]
            targets = labels[start : start + batch_size, 1:]
            logits = model(input_ids=ids).logits[:, :-1].float()
            counted = targets != IGNORE_INDEX
            total_nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                         ignore_index=IGNORE_INDEX, reduction="sum").item()
            correct += int(((logits.argmax(-1) == targets) & counted).sum())
            count += int(counted.sum())
    if count == 0:
        raise ValueError("nothing to evaluate: every label of the held-out blocks is ignored")
    loss = total_nll / count
    return EvalResult(loss, math.exp(min(loss, 700.0)), correct / count, count)
