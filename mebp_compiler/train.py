"""Train LoRA parameters with a compiled Plan, save the adapter, plot the loss."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from tqdm.auto import tqdm

from mebp_compiler import rundir
from mebp_compiler.files import atomic_write, write_error
from mebp_compiler.ir import format_bytes
from mebp_compiler.plan import OPTIMIZER_STATE_TENSORS, Plan



@dataclass
class TrainHistory:
    """Per-step record of a training run. Times in seconds, memory in bytes."""

    loss: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    held_peak_bytes: list[int] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    def record(self, loss: float, step_s: float, held_peak_bytes: int, bar: tqdm) -> None:
        """Append one step and show it on the progress bar."""
        self.loss.append(loss)
        self.step_s.append(step_s)
        self.held_peak_bytes.append(held_peak_bytes)
        bar.set_postfix(loss=f"{loss:.3f}", step=f"{step_s:.2f}s", held=format_bytes(held_peak_bytes))
        bar.update()


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
    """
    lora = plan.lora_parameters()
    optimizer = optimizer or make_optimizer(lora.values())
    history = TrainHistory()
    bar = tqdm(total=steps, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    batch_iter = iter(batches)
    for _ in range(steps):
        batch = next(batch_iter)
        start = time.perf_counter()
        if plan.fused_update:
            result = plan.step(batch, optimizer)
        else:
            result = plan.step(batch)
            for name, param in lora.items():
                param.grad = result.grads[name]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        history.record(float(result.loss), elapsed, result.held_peak_bytes, bar)
    bar.close()
    return history


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

