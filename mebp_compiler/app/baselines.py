"""PyTorch's own ways to run the same training step, measured in this process for comparison.

`measure_baselines` runs one step of the LoRA model as eager autograd does
(`model(**batch).loss.backward()`) and one with transformers' per-layer gradient
checkpointing (`activation_checkpointing_enable(use_reentrant=False)`, formerly
`gradient_checkpointing_enable`), and measures what
each needs: the model's parameters, resident throughout, plus the peak of the tensors the
step itself allocates. That peak is taken as `bench/memory.py` takes its "allocator peak":
the step runs under `torch.profiler.profile(profile_memory=True)`, whose allocation (+)
and free (-) events are summed in time order, and the running maximum is the peak. It
includes op-internal scratch tensors, which the compiler's ledger does not count.

The model is left as it was: LoRA gradients cleared, checkpointing off, the same mode.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch

#: Baseline name -> what the demo calls it.
BASELINES = {
    "eager": "eager autograd",
    "hf-checkpointing": "transformers gradient checkpointing",
}


@dataclass(frozen=True)
class BaselineMemory:
    """What one baseline step needed, in bytes, measured: `parameter_bytes` + `step_peak_bytes`."""

    name: str
    label: str
    parameter_bytes: int  # every parameter of the model (frozen weights and LoRA), resident during the step
    step_peak_bytes: int  # peak of the tensors the step allocated (activations, gradients, scratch)
    loss: float

    @property
    def total_bytes(self) -> int:
        return self.parameter_bytes + self.step_peak_bytes

    def to_json(self) -> dict:
        return {"name": self.name, "label": self.label, "parameter_bytes": self.parameter_bytes,
                "step_peak_bytes": self.step_peak_bytes, "total_bytes": self.total_bytes, "loss": self.loss,
                "measured": "torch.profiler allocator peak of one step + parameter bytes"}


def allocator_peak(fn: Callable[[], object]) -> int:
    """Peak bytes of the CPU tensors `fn()` allocated while it ran (profiler memory events, summed in order).

    A free of a tensor allocated before `fn` started is not reported and so does not lower the sum.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU),
                    key=lambda e: e.start_ns())
    running = peak = 0
    for event in events:
        running += event.nbytes()
        peak = max(peak, running)
    return peak


def measure_baselines(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> list[BaselineMemory]:
    """One eager-autograd step and one gradient-checkpointed step of `model` (a peft LoRA causal LM) on `batch`."""
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    results = []
    for name, label in BASELINES.items():
        losses: list[torch.Tensor] = []
        with baseline_mode(model, name):
            peak = allocator_peak(lambda: losses.append(autograd_step(model, batch)))
        results.append(BaselineMemory(name, label, parameter_bytes, peak, float(losses[0])))
    return results


def autograd_step(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One training step as autograd runs it, `model(**batch).loss.backward()`; the loss, detached.

    The LoRA gradients are cleared first, so each step's are its own.
    """
    for p in model.parameters():
        if p.requires_grad:
            p.grad = None
    loss = model(**batch).loss
    loss.backward()
    return loss.detach()


@contextmanager
def baseline_mode(model: torch.nn.Module, name: str) -> Iterator[None]:
    """`model` set up to run baseline `name` (a key of BASELINES): training mode, and for
    "hf-checkpointing" transformers' checkpointing on. Left as it was: LoRA gradients
    cleared, checkpointing off, the same mode."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}: choose from {', '.join(BASELINES)}")
    was_training = model.training
    try:
        model.train()  # transformers checkpoints only in training mode
        _checkpointing(model, enable=name == "hf-checkpointing")
        yield
    finally:
        _checkpointing(model, enable=False)
        for p in model.parameters():
            p.grad = None
        model.train(was_training)


def _checkpointing(model: torch.nn.Module, enable: bool) -> None:
    """Turn transformers' per-layer checkpointing on (non-reentrant) or off, by the API this version names."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (the old names warn)
        if enable:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif enable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
