"""Train LoRA parameters with a compiled Plan, save the adapter, plot the loss."""

from __future__ import annotations

import math
import os
import statistics
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from tqdm.auto import tqdm

from mebp_compiler import rundir
from mebp_compiler.files import atomic_write, write_error
from mebp_compiler.ir import format_bytes
from mebp_compiler.passes.fuse_update import NonFiniteGradient
from mebp_compiler.plan import OPTIMIZER_STATE_TENSORS, Plan
from mebp_compiler.runtime import StepResult


#: A loss above this multiple of the first steps' mean loss counts as divergence.
DIVERGENCE_FACTOR = 2.0
#: How many first steps make the reference loss of the divergence check.
DIVERGENCE_REFERENCE_STEPS = 3
#: LoRA parameters whose total norm exceeds this multiple of max(1, their starting norm) count as diverged.
NORM_DIVERGENCE_FACTOR = 100.0


class NonFiniteStep(FloatingPointError):
    """A training step whose loss or a LoRA gradient is NaN or infinite; `train` stops there.

    `step` counts from 1; `loss` is the step's loss; `parameter` names the LoRA parameter
    whose gradient is not finite (None when the loss itself is not). With `fused` updates the
    parameters updated earlier in that step keep their update (`passes.fuse_update`).
    """

    def __init__(self, step: int, loss: float, parameter: str | None, fused: bool = False) -> None:
        parameter = parameter if math.isfinite(loss) else None
        last = f"those of step {step - 1}" if step > 1 else "the starting ones"
        what, kept = f"the loss is {loss:g}", f"the LoRA parameters are {last}"
        if parameter is not None:
            what = f"the gradient of {parameter} is not finite (loss {loss:g})"
        if parameter is not None and fused:
            kept = (f"the LoRA parameters updated before it in this step's backward keep this step's update, "
                    f"the others are {last}")
        super().__init__(f"step {step}: {what}; training stopped without applying it, so {kept}. Lower the "
                         "learning rate (--lr), or check the data and the starting parameters")
        self.step = step
        self.loss = loss
        self.parameter = parameter


class DivergenceWarning(RuntimeWarning):
    """The loss rose far above its start, or the LoRA parameters' norm far above theirs (still finite)."""


def lora_norm(params: Iterable[torch.Tensor]) -> float:
    """The L2 norm of all `params` together (in float64, so parameters near float32's range do not overflow it)."""
    with torch.no_grad():
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p, dtype=torch.float64)
                                                           for p in params])))


@dataclass
class TrainHistory:
    """Per-step record of a training run. Times in seconds, memory in bytes.

    `lora_norm` is the LoRA parameters' total L2 norm after each step, `start_lora_norm`
    before the first. `diverged_at_step` is the first step (from 1) whose loss exceeded
    `DIVERGENCE_FACTOR` x the mean of the first `DIVERGENCE_REFERENCE_STEPS` steps before
    it, or whose LoRA norm exceeded `NORM_DIVERGENCE_FACTOR` x max(1, `start_lora_norm`);
    None if none did.
    """

    loss: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    held_peak_bytes: list[int] = field(default_factory=list)
    lora_norm: list[float] = field(default_factory=list)
    start_lora_norm: float = 0.0
    diverged_at_step: int | None = None

    def to_json(self) -> dict:
        return asdict(self)

    def record(self, loss: float, step_s: float, held_peak_bytes: int, lora_norm: float, bar: tqdm) -> None:
        """Append one step, show it on the progress bar, and warn (once) if training diverges."""
        self.loss.append(loss)
        self.step_s.append(step_s)
        self.held_peak_bytes.append(held_peak_bytes)
        self.lora_norm.append(lora_norm)
        bar.set_postfix(loss=f"{loss:.3f}", step=f"{step_s:.2f}s", held=format_bytes(held_peak_bytes))
        bar.update()
        if self.diverged_at_step is None:
            self._check_divergence()

    def _check_divergence(self) -> None:
        step, loss, norm = len(self.loss), self.loss[-1], self.lora_norm[-1]
        reference = self.loss[:min(DIVERGENCE_REFERENCE_STEPS, step - 1)]
        start_loss = statistics.fmean(reference) if reference else math.inf
        if loss > DIVERGENCE_FACTOR * start_loss:
            why = f"the loss {loss:.4g} is above {DIVERGENCE_FACTOR:g}x the first steps' mean {start_loss:.4g}"
        elif norm > NORM_DIVERGENCE_FACTOR * max(1.0, self.start_lora_norm):
            why = (f"the LoRA parameters' norm {norm:.4g} is above {NORM_DIVERGENCE_FACTOR:g}x its start "
                   f"{self.start_lora_norm:.4g}")
        else:
            return
        self.diverged_at_step = step
        warnings.warn(DivergenceWarning(f"step {step}: {why}: training is diverging; lower the learning rate (--lr)"),
                      stacklevel=4)


def make_optimizer(params: Iterable[torch.nn.Parameter], name: str = "adamw", lr: float = 1e-3,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """An optimizer over the LoRA parameters: "adamw" (torch.optim.AdamW) or "sgd"."""
    params = list(params)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZER_STATE_TENSORS)}")


def train(
    plan: Plan,
    batches: Iterable[Mapping[str, torch.Tensor]],
    steps: int,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    progress: bool = True,
) -> TrainHistory:
    """Run `steps` steps of `plan` over `batches`, applying `optimizer` to the LoRA parameters.

    The gradients the plan returns are set as each parameter's `.grad`, then the
    optimizer steps (a plan with fused updates steps it itself, parameter by parameter,
    inside the step); the default optimizer is AdamW with lr 1e-3.

    Before the first step, `plan.check_memory()` raises InsufficientMemory if the step
    would not fit. A step whose loss or any gradient is NaN or infinite raises
    NonFiniteStep and applies no update, so the LoRA parameters stay those of the last
    good step; with fused updates, a finite loss and one non-finite gradient stop the step
    at that gradient, and the parameters updated before it in the backward keep their
    update (`passes.fuse_update`). Training that diverges but stays finite (the loss or the
    LoRA parameters' norm far above its start, see `TrainHistory`) warns once with
    DivergenceWarning, is recorded in `TrainHistory.diverged_at_step`, and goes on.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    lora = plan.lora_parameters()
    optimizer = optimizer or make_optimizer(lora.values())
    plan.check_memory()
    history = TrainHistory(start_lora_norm=lora_norm(lora.values()))
    bar = tqdm(total=steps, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    batch_iter = iter(batches)
    try:
        for step in range(1, steps + 1):
            batch = next(batch_iter)
            start = time.perf_counter()
            if plan.fused_update:
                try:
                    result = plan.step(batch, optimizer)
                except NonFiniteGradient as exc:
                    raise NonFiniteStep(step, exc.loss, exc.parameter, fused=True) from exc
            else:
                result = plan.step(batch)
                _refuse_non_finite(step, result)
                for name, param in lora.items():
                    param.grad = result.grads[name]
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - start
            history.record(float(result.loss), elapsed, result.held_peak_bytes, lora_norm(lora.values()), bar)
    finally:
        bar.close()
    return history


def _refuse_non_finite(step: int, result: StepResult) -> None:
    """Raise NonFiniteStep if the step's loss or any of its gradients is NaN or infinite."""
    loss = float(result.loss)
    if not math.isfinite(loss):
        raise NonFiniteStep(step, loss, None)
    for name, grad in result.grads.items():
        if not torch.isfinite(grad).all():
            raise NonFiniteStep(step, loss, name)


def save_adapter(model: torch.nn.Module, directory: str | os.PathLike) -> Path:
    """Save the LoRA adapter (peft format, safetensors) atomically to `directory`.

    The adapter is written to a staging sibling and swapped in whole (`rundir.replaced`):
    an interrupted save leaves the old adapter or the new one, never a mix or none.

    Raises:
        WriteError: the disk is full or the directory is not writable; the old adapter stays.
    """
    directory = Path(directory)
    with rundir.replaced(directory) as staging:
        try:
            model.save_pretrained(staging, safe_serialization=True)
        except (OSError, SafetensorError) as exc:
            raise write_error(staging, exc) from exc
    return directory


def plot_loss(history: TrainHistory, path: str | os.PathLike, title: str = "") -> Path:
    """Write the loss curve (per step, with a moving average) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = range(1, len(history.loss) + 1)
    window = max(1, len(history.loss) // 10)
    smooth = [
        sum(history.loss[max(0, i - window + 1) : i + 1]) / len(history.loss[max(0, i - window + 1) : i + 1])
        for i in range(len(history.loss))
    ]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, history.loss, alpha=0.35, label="loss per step")
    ax.plot(steps, smooth, label=f"moving average ({window} steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(title or "LoRA fine-tuning")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    finally:
        plt.close(fig)

