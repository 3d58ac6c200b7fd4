"""`compile()` and `Plan`: capture once, schedule, rewrite, predict memory, then run steps."""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from mebp_compiler.capture import BATCH_KEYS, capture, vocab_size
from mebp_compiler.ir import Role, TrainingGraph, format_bytes
from mebp_compiler.passes.fuse_update import check_updates_follow_uses, fuse_lora_update, optimizer_updater
from mebp_compiler.passes.liveness import MemoryProfile, liveness
from mebp_compiler.device import DeviceProfile, parse_size
from mebp_compiler.passes.policies import mebp_schedule, none_schedule, optimal_schedule
from mebp_compiler.passes.quantize import (
    DEFAULT_GROUP_SIZE,
    QuantizedWeights,
    WeightFileError,
    quantize_model_weights,
    rewrite_int4,
)
from mebp_compiler.passes.scheduler.solver import (
    DEFAULT_WORK_LIMIT,
    BudgetInfeasible,
    ProgressCallback,
    ScheduleNotFound,
)
from mebp_compiler.passes.rewrite import rewrite
from mebp_compiler.progress import logger, phase
from mebp_compiler.runtime import Runtime, StepResult
from mebp_compiler.schedule import Schedule, with_origins
from mebp_compiler.sliced_loss import check_labels

POLICIES = ("none", "mebp", "optimal")
#: Tensors of optimizer state per trainable parameter (AdamW: two moments; plain SGD: none).
OPTIMIZER_STATE_TENSORS = {"adamw": 2, "sgd": 0}


class BatchShapeError(ValueError):
    """A batch whose shape differs from the one the plan was compiled for."""


class BatchValueError(ValueError):
    """A batch holding a token id or label outside the model's vocabulary."""


class InsufficientMemory(MemoryError):
    """A step predicted to need more memory than this machine has available."""


def check_memory(peak_bytes: int, new_bytes: int, available_bytes: int | None = None) -> None:
    """Raise InsufficientMemory if a step needs more memory than this machine has available.

    `peak_bytes` is the step's whole predicted peak (inputs, computed tensors, optimizer
    state); `new_bytes` is the part of it not yet allocated (computed tensors and optimizer
    state: the weights and the batch already are), compared with `available_bytes`
    (default: `psutil.virtual_memory().available`).
    """
    import psutil

    available = psutil.virtual_memory().available if available_bytes is None else available_bytes
    if new_bytes > available:
        raise InsufficientMemory(
            f"the step needs {format_bytes(new_bytes)} more memory at its peak (whole step "
            f"{format_bytes(peak_bytes)}), but this machine has {format_bytes(available)} available; shorten "
            "the sequence or the batch (--seq-len, --batch-size), keep fewer activations (policy 'mebp', or "
            "'optimal' under a budget), or split the widest tensors (vocab_slices / --vocab-slices, "
            "head_chunks / --head-chunks, mlp_chunks / --mlp-chunks)")


@dataclass
class Plan:
    """A compiled training step: the scheduled graph, its schedule and its predicted memory.

    `step(batch)` runs the step on the model's current parameter values (read at every
    call, so an optimizer may update them in place between steps).
    """

    model: torch.nn.Module
    captured: TrainingGraph
    schedule: Schedule
    graph: TrainingGraph
    profile: MemoryProfile
    runtime: Runtime
    weights: QuantizedWeights | None = None  # INT4 frozen weights, when compiled with int4=True
    optimizer: str = "adamw"  # the optimizer whose state the trainer holds beside the step

    @property
    def predicted_peak_bytes(self) -> int:
        """Predicted most bytes held at once: inputs (weights, LoRA, batch) plus computed tensors."""
        return self.profile.peak_bytes

    @property
    def predicted_peak_activation_bytes(self) -> int:
        """Predicted peak of computed tensors only (activations, gradients, loss)."""
        return self.profile.peak_activation_bytes

    @property
    def optimizer_state_bytes(self) -> int:
        """Bytes of the optimizer's state over the LoRA parameters, held outside the step."""
        return optimizer_state_bytes(self.model, self.optimizer)

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return self.graph.batch_shape

    def lora_parameters(self) -> dict[str, torch.nn.Parameter]:
        return lora_parameters(self.model, self.graph)

    def check_memory(self, available_bytes: int | None = None) -> None:
        """Raise InsufficientMemory, before any step allocates, if the step would not fit this machine.

        Compares the part of the predicted peak plus optimizer state that is not yet
        allocated with the memory available (`check_memory`). The budget of an optimal
        plan needs no check here: `compile` already refused a schedule that exceeds it.
        """
        check_memory(self.predicted_peak_bytes + self.optimizer_state_bytes,
                     self.predicted_peak_activation_bytes + self.optimizer_state_bytes, available_bytes)

    @property
    def fused_update(self) -> bool:
        """Whether the step applies the LoRA updates itself (compiled with fuse_update=True)."""
        return bool(self.graph.meta.get("fused_update"))

    def step(self, batch: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer | None = None) -> StepResult:
        """Loss and LoRA gradients of one batch, with the bytes the runtime held.

        A plan compiled with `fuse_update=True` steps `optimizer` on each LoRA parameter
        inside the step, as soon as its gradient is final, and returns no gradients.
        """
        updater = optimizer_updater(optimizer) if optimizer is not None else None
        return self.runtime.run(graph_inputs(self.model, self.graph, batch, self.weights), updater)


def lora_parameters(model: torch.nn.Module, graph: TrainingGraph) -> dict[str, torch.nn.Parameter]:
    """The model's LoRA parameters in the graph's input order."""
    params = dict(model.named_parameters())
    return {s.source: params[s.source] for s in graph.inputs if s.role == Role.LORA}


def graph_inputs(model: torch.nn.Module, graph: TrainingGraph, batch: Mapping[str, torch.Tensor],
                 weights: QuantizedWeights | None = None) -> list:
    """One tensor per graph placeholder: the model's current weights (or their INT4 form) and the batch.

    Raises BatchShapeError if the batch's keys, shapes or dtypes are not those the graph was
    captured for, and BatchValueError if a token id or label lies outside the vocabulary
    (`check_batch`), before anything runs.
    """
    check_batch(graph, batch, vocab_size(model))
    state = dict(model.named_parameters())
    state.update(model.named_buffers())
    state.update(weights.tensors if weights else {})
    return [batch[s.source] if s.role == Role.BATCH else state[s.source] for s in graph.inputs]


def check_batch(graph: TrainingGraph, batch: Mapping[str, torch.Tensor], vocab_size: int) -> None:
    """Raise unless `batch` has exactly the graph's batch inputs, each of its shape and dtype, in range.

    BatchShapeError: a key missing or extra (an `attention_mask` the plan was not compiled
    with would otherwise be dropped), or a shape or dtype other than the captured one.
    BatchValueError: a token id outside [0, vocab_size), or a label neither -100 nor in it.
    """
    wanted = {s.source: graph.info[s.name] for s in graph.inputs if s.role == Role.BATCH}
    extra = sorted(set(batch) - set(wanted))
    if extra:
        key = extra[0]
        raise BatchShapeError(f"batch['{key}'] is not an input of this plan (it takes {', '.join(wanted)}); "
                              + (f"compile with an example batch that has {key}, so the step uses it"
                                 if key in BATCH_KEYS else "remove it"))
    for key, info in wanted.items():
        value = batch.get(key)
        if not isinstance(value, torch.Tensor):
            raise BatchShapeError(f"batch['{key}'] is missing or not a tensor, but the plan was compiled with it")
        if tuple(value.shape) != graph.batch_shape:
            raise BatchShapeError(
                f"batch['{key}'] has shape {tuple(value.shape)}, but the plan was compiled for "
                f"{graph.batch_shape}; compile again with an example batch of the new shape"
            )
        if str(value.dtype).removeprefix("torch.") != info.dtype:
            raise BatchShapeError(f"batch['{key}'] is {value.dtype}, but the plan was compiled for torch.{info.dtype}; "
                                  f"convert it (e.g. .to(torch.{info.dtype}))")
    ids = batch["input_ids"]
    if bool(((ids < 0) | (ids >= vocab_size)).any()):
        raise BatchValueError(f"batch['input_ids'] holds token ids from {ids.min().item()} to {ids.max().item()}, "
                              f"outside the model's vocabulary of {vocab_size} (ids 0 to {vocab_size - 1}); "
                              "tokenize with the model's own tokenizer")
    try:
        check_labels(batch["labels"], vocab_size)
    except ValueError as exc:
        raise BatchValueError(str(exc)) from None


def make_optimizer(params: Iterable[torch.nn.Parameter], name: str = "adamw", lr: float = 1e-3,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """An optimizer over the LoRA parameters: "adamw" (torch.optim.AdamW) or "sgd"."""
    params = list(params)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZER_STATE_TENSORS)}")


def optimizer_state_bytes(model: torch.nn.Module, optimizer: str) -> int:
    """Bytes of optimizer state for the model's trainable (LoRA) parameters."""
    if optimizer not in OPTIMIZER_STATE_TENSORS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZER_STATE_TENSORS)}")
    per_copy = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return OPTIMIZER_STATE_TENSORS[optimizer] * per_copy


def _optimal(trace, example_batch, budget_bytes: int, device: DeviceProfile, head_chunks, **solve_options):
    """Capture and schedule under the budget; with head_chunks="auto", the fewest chunks that fit."""
    seq_len = example_batch["input_ids"].shape[-1]
    candidates = [head_chunks] if head_chunks != "auto" else [0, *(2**i for i in range(1, seq_len.bit_length()))]
    for chunks in candidates:
        captured = trace(chunks)
        logger.info("scheduling under a budget of %s on %s: keep, recompute or offload each tensor",
                    format_bytes(budget_bytes), device.name)
        try:
            return captured, optimal_schedule(captured, budget_bytes, device, **solve_options)
        except (BudgetInfeasible, ScheduleNotFound):
            if chunks == candidates[-1]:
                raise
    raise AssertionError("unreachable")


def compile(
    model: torch.nn.Module,
    example_batch: Mapping[str, torch.Tensor],
    policy: str = "mebp",
    *,
    checkpoints: Literal["ram", "disk"] = "ram",
    offload_dir: str | None = None,
    budget: str | int | None = None,
    device: str | DeviceProfile = "iphone15promax",
    offload: bool = True,
    work_limit: float = DEFAULT_WORK_LIMIT,
    solver_progress: ProgressCallback | None = None,
    optimizer: str = "adamw",
    head_chunks: int | Literal["auto"] = 0,
    vocab_slices: int = 0,
    mlp_chunks: int = 0,
    int4: bool = False,
    group_size: int = DEFAULT_GROUP_SIZE,
    weights_file: str | None = None,
    gguf_file: str | os.PathLike | None = None,
    fuse_update: bool = False,
    time_limit_s: float | None = None,
) -> Plan:
    """Compile one training step of a LoRA causal LM under a scheduling `policy`.

    `policy` is "none" (keep every saved activation, as plain autograd does), "mebp"
    (keep block boundaries only, recompute each block in the backward; with
    `checkpoints="disk"` the block checkpoints go to memory-mapped files in `offload_dir`,
    a temporary directory by default) or "optimal" (the scheduler's least predicted time on
    `device` whose peak - weights, LoRA, batch and computed tensors - fits `budget`, bytes
    or a human size such as "300MB"; raises `BudgetInfeasible` naming the least budget).
    The budget also covers the state of `optimizer` ("adamw" or "sgd") over the LoRA
    parameters, which the trainer holds outside the graph. The scheduler starts from
    MeBP's decisions or keep-all when one fits and returns the best schedule it finds
    within `work_limit` (CP-SAT deterministic time per solve, so the plan does not depend
    on machine load; see `passes.scheduler.solver`), or raises `ScheduleNotFound` when the
    budget is below every known schedule and the search neither found one nor proved there
    is none; `solver_progress` is called with its `Progress` as it searches. `time_limit_s`
    is the deprecated name of `work_limit`.

    `head_chunks` > 0 computes the LM head and loss in that many sequence chunks (see
    `capture`); "auto" (optimal policy only) takes the fewest chunks - 0, 2, 4, 8, ... -
    whose step fits the budget. `vocab_slices` > 0 streams the head and loss over that many
    vocabulary slices, forward and backward, so no `[tokens x vocab]` logits exist (see
    `capture`); with INT4 weights each slice of the head is decompressed on its own.
    `mlp_chunks` > 1 runs every block's MLP on that many sequence chunks, so its
    `[seq x intermediate]` products exist a chunk at a time (see `capture`).

    With `int4=True` the frozen 2-D weights become symmetric INT4 with a scale per
    `group_size` inputs, dequantized just before each use (`passes.quantize`); the step
    then equals autograd on the dequantized model. `weights_file` saves them as
    safetensors (or, if the file exists, reads it instead, checking it matches); without
    it they go to an unlinked temporary file in `offload_dir`. Either way the step reads
    them memory-mapped from the file (role MAPPED: reported, not counted as held); a
    corrupt or mismatched file raises WeightFileError before any step runs. On the meta
    device (planning only) they are planned as memory-mapped. With `gguf_file`, the GGUF
    file the model was loaded from (`models.smollm2_gguf_path()`), the weights it stores as
    Q4_1 or Q8_0 keep those blocks byte for byte instead of being quantized again
    (`passes.gguf_blocks`); the step is then exact to autograd on the model as loaded.

    With `fuse_update=True` the step applies each LoRA parameter's optimizer update as
    soon as its gradient is final and drops the gradient (`passes.fuse_update`), instead
    of holding every gradient to the end; run it with `plan.step(batch, optimizer=...)`.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if optimizer not in OPTIMIZER_STATE_TENSORS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZER_STATE_TENSORS)}")
    if checkpoints not in ("ram", "disk"):
        raise ValueError(f"checkpoints must be 'ram' or 'disk', got {checkpoints!r}")
    if (policy == "optimal") != (budget is not None):
        raise ValueError("policy 'optimal' needs a budget (e.g. budget='300MB'), and only it takes one")
    if gguf_file is not None and not int4:
        raise ValueError("gguf_file keeps a GGUF file's quantized blocks: use it with int4=True")
    if head_chunks == "auto" and policy != "optimal":
        raise ValueError("head_chunks='auto' is chosen from the budget: use it with policy 'optimal'")
    if time_limit_s is not None:
        warnings.warn("compile(time_limit_s=...) is deprecated: the scheduler's limit is deterministic work, "
                      "work_limit=... (the same number is used)", DeprecationWarning, stacklevel=2)
        work_limit = time_limit_s
    weights = None

    def trace(chunks: int) -> TrainingGraph:
        chunked = f", LM head in {chunks} chunks" if chunks else ""
        with phase(f"capturing the training step (forward and backward{chunked})"):
            graph = capture(model, example_batch, head_chunks=chunks, vocab_slices=vocab_slices, mlp_chunks=mlp_chunks)
        graph = quantized(graph)
        return fuse_lora_update(graph) if fuse_update else graph

    def quantized(graph: TrainingGraph) -> TrainingGraph:
        nonlocal weights
        if not int4:
            return graph
        if weights is None:
            how = "keeping the GGUF file's quantized blocks" if gguf_file else "quantizing frozen weights to INT4"
            with phase(f"{how} (group size {group_size})"):
                fresh = quantize_model_weights(model, graph, group_size, gguf_file)
            if weights_file is not None and not Path(weights_file).exists():
                fresh.save(weights_file)
            if weights_file is not None:
                weights = QuantizedWeights.load(weights_file)
            elif any(t.is_meta for t in fresh.tensors.values()):
                weights = dataclasses.replace(fresh, mapped=True)  # planning only: no file to map
            else:
                weights = fresh.mapped_copy(offload_dir)
            if set(weights.tensors) != set(fresh.tensors) or weights.group_size != group_size:
                raise WeightFileError(f"{weights_file} holds other weights than this model's INT4 weights "
                                      f"(group size {group_size}); delete it to quantize again")
        return rewrite_int4(graph, weights)

    if policy == "optimal":
        profile = device if isinstance(device, DeviceProfile) else DeviceProfile.load(device)
        captured, schedule = _optimal(trace, example_batch, parse_size(budget), profile, head_chunks,
                                      offload=offload, work_limit=work_limit, progress=solver_progress,
                                      reserved_bytes=optimizer_state_bytes(model, optimizer))
    else:
        captured = trace(head_chunks)
        schedule = none_schedule(captured) if policy == "none" else mebp_schedule(captured, checkpoints)
    schedule = with_origins(schedule, captured)
    with phase(f"applying the {policy} schedule"):
        graph = rewrite(captured, schedule)
        check_updates_follow_uses(graph)
    return Plan(
        model=model,
        captured=captured,
        schedule=schedule,
        graph=graph,
        profile=liveness(graph),
        runtime=Runtime(graph, offload_dir),
        weights=weights,
        optimizer=optimizer,
    )
