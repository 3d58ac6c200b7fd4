"""Train LoRA parameters with a compiled Plan, save the adapter, plot the loss."""

from __future__ import annotations

import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from tqdm.auto import tqdm

from mebp_compiler.app import rundir
from mebp_compiler.app.data import IGNORE_INDEX
from mebp_compiler.files import atomic_write, write_error
from mebp_compiler.ir import format_bytes
from mebp_compiler.passes.fuse_update import NonFiniteGradient
from mebp_compiler.plan import Plan, make_optimizer
from mebp_compiler.plan_cache import PlanCache
from mebp_compiler.runtime import StepResult


#: A loss above this multiple of the first steps' mean loss counts as divergence.
DIVERGENCE_FACTOR = 2.0
#: How many first steps make the reference loss of the divergence check.
DIVERGENCE_REFERENCE_STEPS = 3
#: LoRA parameters whose total norm exceeds this multiple of max(1, their starting norm) count as diverged.
NORM_DIVERGENCE_FACTOR = 100.0
#: Learning-rate schedules `make_scheduler` builds.
LR_SCHEDULES = ("constant", "linear", "cosine")


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
    lr: list[float] = field(default_factory=list)  # the learning rate each step applied (backprop)
    evals: list[dict] = field(default_factory=list)  # {"step": ..., **EvalResult.to_json()}, in step order

    def to_json(self) -> dict:
        return asdict(self)

    def record(self, loss: float, step_s: float, held_peak_bytes: int, lora_norm: float, bar: tqdm,
               lr: float | None = None) -> None:
        """Append one step, show it on the progress bar, and warn (once) if training diverges."""
        self.loss.append(loss)
        self.step_s.append(step_s)
        self.held_peak_bytes.append(held_peak_bytes)
        self.lora_norm.append(lora_norm)
        if lr is not None:
            self.lr.append(lr)
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


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: str, steps: int,
                   warmup_steps: int = 0) -> torch.optim.lr_scheduler.LRScheduler | None:
    """torch's LR scheduler for `steps` optimizer steps: a linear warmup, then `schedule`.

    Step s (from 1) of the first `warmup_steps` uses lr x s / warmup_steps
    (`LinearLR`); then "constant" keeps lr, "linear" decays it towards 0 (`LinearLR`,
    end factor 0) and "cosine" along half a cosine towards 0 (`CosineAnnealingLR`) over
    the remaining steps, the first of them at the full lr. None for a constant lr.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown LR schedule {schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
    if not 0 <= warmup_steps <= steps:
        raise ValueError(f"warmup_steps must be between 0 and the {steps} steps, got {warmup_steps}")
    lr_scheduler = torch.optim.lr_scheduler
    decay_steps = steps - warmup_steps
    phases, milestones = [], []
    if warmup_steps == 1:  # one step at lr x 1/1
        phases.append(lr_scheduler.ConstantLR(optimizer, 1.0, total_iters=0))
        milestones.append(1)
    elif warmup_steps > 1:
        phases.append(lr_scheduler.LinearLR(optimizer, 1 / warmup_steps, 1.0, total_iters=warmup_steps - 1))
        milestones.append(warmup_steps)
    if schedule == "linear" and decay_steps > 0:
        phases.append(lr_scheduler.LinearLR(optimizer, 1.0, 0.0, total_iters=decay_steps))
    elif schedule == "cosine" and decay_steps > 0:
        phases.append(lr_scheduler.CosineAnnealingLR(optimizer, T_max=decay_steps))
    elif phases:
        phases.append(lr_scheduler.ConstantLR(optimizer, 1.0, total_iters=0))
    if not phases:
        return None
    return phases[0] if len(phases) == 1 else lr_scheduler.SequentialLR(optimizer, phases, milestones[:1])


#: Called after each optimizer step with (step, history): evaluation, checkpoints.
StepCallback = Callable[[int, "TrainHistory"], None]


def train(
    plan: Plan | PlanCache,
    batches: Iterable[Mapping[str, torch.Tensor]],
    steps: int,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    progress: bool = True,
    accumulate: int = 1,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    on_step: StepCallback | None = None,
    start_step: int = 0,
    history: TrainHistory | None = None,
) -> TrainHistory:
    """Run optimizer steps `start_step + 1` to `steps` of `plan` over `batches`, applying `optimizer` to the LoRA
    parameters. A `PlanCache` for `plan` runs batches of several shapes, each by its own plan.

    The gradients the plan returns are set as each parameter's `.grad`, then the
    optimizer steps (a plan with fused updates steps it itself, parameter by parameter,
    inside the step); the default optimizer is AdamW with lr 1e-3. With `accumulate` = k
    each optimizer step runs the plan on the next k batches and takes the sum of their
    gradients weighted by each batch's share of the predicted tokens (labels other than
    -100 after the first position), which is the gradient of the combined batch's mean
    loss, exactly (see `accumulated`). `scheduler` steps after every optimizer step;
    `on_step(step, history)` is called after it. `start_step` and `history` continue an
    earlier run (`checkpoint`).

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
    if accumulate < 1:
        raise ValueError(f"accumulate must be >= 1, got {accumulate}")
    if accumulate > 1 and plan.fused_update:
        raise ValueError("a plan with fused updates applies each update inside its step, so gradients cannot be "
                         "accumulated over batches: compile without fuse_update, or accumulate=1")
    lora = plan.lora_parameters()
    optimizer = optimizer or make_optimizer(lora.values())
    plan.check_memory()
    history = history or TrainHistory(start_lora_norm=lora_norm(lora.values()))
    bar = tqdm(total=steps, initial=start_step, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    batch_iter = iter(batches)
    try:
        for step in range(start_step + 1, steps + 1):
            micro = [next(batch_iter) for _ in range(accumulate)]
            lr = float(optimizer.param_groups[0]["lr"])
            start = time.perf_counter()
            if plan.fused_update:
                try:
                    result = plan.step(micro[0], optimizer)
                except NonFiniteGradient as exc:
                    raise NonFiniteStep(step, exc.loss, exc.parameter, fused=True) from exc
            else:
                result = accumulated(plan, micro)
                _refuse_non_finite(step, result)
                for name, param in lora.items():
                    param.grad = result.grads[name]
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if scheduler is not None:
                scheduler.step()
            elapsed = time.perf_counter() - start
            history.record(float(result.loss), elapsed, result.held_peak_bytes, lora_norm(lora.values()), bar, lr)
            if on_step is not None:
                on_step(step, history)
    finally:
        bar.close()
    return history


def predicted_tokens(batch: Mapping[str, torch.Tensor]) -> int:
    """How many tokens the loss of `batch` averages over: labels after the first position that are not -100."""
    return int((batch["labels"][..., 1:] != IGNORE_INDEX).sum())


def accumulated(plan: Plan | PlanCache, batches: Sequence[Mapping[str, torch.Tensor]]) -> StepResult:
    """The loss and LoRA gradients of `batches` taken together, from one plan step per batch.

    Each batch's loss is a mean over its n_i predicted tokens (`predicted_tokens`); the
    combined batch's is the mean over all N = sum n_i, i.e. sum (n_i / N) x loss_i, and so
    is its gradient. `held_peak_bytes` is the most one step held plus the running sums
    (an upper bound: the first step runs before any sum exists); no per-op `held_bytes`.
    """
    if len(batches) == 1:
        return plan.step(batches[0])
    counts = [predicted_tokens(b) for b in batches]
    total = sum(counts)
    if total == 0:
        raise ValueError("every label of the accumulated batches is -100: there is nothing to learn from")
    loss, grads, peak = torch.zeros(()), {}, 0
    for batch, count in zip(batches, counts, strict=True):
        result = plan.step(batch)
        weight = count / total
        loss = loss + weight * result.loss.detach()
        for name, grad in result.grads.items():
            grads[name] = grads[name].add_(grad, alpha=weight) if name in grads else grad.mul(weight)
        peak = max(peak, result.held_peak_bytes)
    sums = sum(g.numel() * g.element_size() for g in grads.values())
    return StepResult(loss=loss, grads=grads, held_peak_bytes=peak + sums, held_bytes=[], held_by_role={})


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

