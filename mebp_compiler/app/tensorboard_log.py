"""TensorBoard logging of a training run (`mebp train --tensorboard DIR`), opt-in.

Writes with `torch.utils.tensorboard.SummaryWriter`, which needs the `tensorboard` package
(the `tensorboard` extra: `pip install -e '.[tensorboard]'`, or `pip install tensorboard`).
Scalars per optimizer step: `train/loss` (nats per predicted token), `train/lr`,
`train/held_peak_bytes` (what the runtime held, most of the step), `train/step_s` (seconds);
per evaluation `eval/loss`, `eval/perplexity` and `eval/accuracy`.
"""

from __future__ import annotations

import os

#: What to run when the package is missing (the one line `mebp train` prints).
INSTALL_HINT = "pip install tensorboard (or pip install -e '.[tensorboard]')"


class TensorBoardMissing(ImportError):
    """The `tensorboard` package, which torch's SummaryWriter writes with, is not installed."""

    def __init__(self) -> None:
        super().__init__(f"--tensorboard writes with torch.utils.tensorboard, which needs the tensorboard package: "
                         f"{INSTALL_HINT}")


def check_available() -> None:
    """Raise TensorBoardMissing unless `tensorboard` imports (without importing torch)."""
    try:
        import tensorboard  # noqa: F401  (only whether it is there)
    except ImportError:
        raise TensorBoardMissing() from None


class StepLog:
    """A SummaryWriter at `directory` that logs each step of a `TrainHistory` (`log_step`) and its evaluations."""

    def __init__(self, directory: str | os.PathLike) -> None:
        check_available()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(directory))
        self._evals = 0

    def log_step(self, step: int, history) -> None:
        """Write step `step`'s record (the last of `history`) and any evaluation added since the last call."""
        self.writer.add_scalar("train/loss", history.loss[-1], step)
        if history.lr:
            self.writer.add_scalar("train/lr", history.lr[-1], step)
        self.writer.add_scalar("train/held_peak_bytes", history.held_peak_bytes[-1], step)
        self.writer.add_scalar("train/step_s", history.step_s[-1], step)
        self.log_evals(history)

    def log_evals(self, history) -> None:
        for record in history.evals[self._evals:]:
            for key in ("loss", "perplexity", "accuracy"):
                if key in record:
                    self.writer.add_scalar(f"eval/{key}", record[key], record["step"])
        self._evals = len(history.evals)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
