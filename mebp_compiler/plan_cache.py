"""`PlanCache`: one compiled `Plan` per batch shape, each compiled on first use of its shape.

A `Plan` runs batches of the one shape it was compiled for and refuses any other with
`BatchShapeError`. Data whose examples vary in length is padded into a few lengths
(`mebp_compiler.app.data.length_buckets`); a cache then holds a plan per length, each
compiled with the same options (policy, budget, chunking, ...), so each fits the same
budget. The number of shapes is bounded: a batch of a new shape past the bound raises
`TooManyShapes` (a `BatchShapeError`) before anything compiles.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from mebp_compiler.plan import BatchShapeError, Plan, compile
from mebp_compiler.progress import logger
from mebp_compiler.runtime import StepResult

#: Shapes a `PlanCache` compiles at most, unless told otherwise.
DEFAULT_MAX_SHAPES = 4

#: A batch's shape key: (key, shape, dtype) of each of its tensors, in key order.
ShapeKey = tuple[tuple[str, tuple[int, ...], str], ...]


class TooManyShapes(BatchShapeError):
    """A batch of a new shape when the cache already holds plans for as many shapes as it may."""


def shape_key(batch: Mapping[str, torch.Tensor]) -> ShapeKey:
    """What tells two batches' plans apart: each tensor's key, shape and dtype."""
    return tuple((k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in sorted(batch.items()))


@dataclass
class PlanCache:
    """Plans of one LoRA model, one per batch shape, compiled (`mebp_compiler.compile` with
    `policy` and `options`) the first time a batch of that shape is stepped.

    It stands in for a `Plan` wherever a trainer steps one (`train`, `accumulated`):
    `step`, `lora_parameters`, `fused_update`, `check_memory`, `predicted_peak_bytes`.
    Each new plan is checked against this machine's memory (`Plan.check_memory`) before it
    runs. `max_shapes` bounds how many shapes (and so how many compiles and plans held)
    there may be.
    """

    model: torch.nn.Module
    policy: str = "mebp"
    options: dict[str, Any] = field(default_factory=dict)
    max_shapes: int = DEFAULT_MAX_SHAPES
    plans: dict[ShapeKey, Plan] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_shapes < 1:
            raise ValueError(f"max_shapes must be 1 or more, got {self.max_shapes}")

    def plan_for(self, batch: Mapping[str, torch.Tensor]) -> Plan:
        """The plan for `batch`'s shape, compiled now if this is the first batch of that shape.

        Raises:
            TooManyShapes: a new shape while `max_shapes` plans exist (the message lists them).
        """
        key = shape_key(batch)
        plan = self.plans.get(key)
        if plan is not None:
            return plan
        if len(self.plans) >= self.max_shapes:
            known = "; ".join(_describe(k) for k in self.plans)
            raise TooManyShapes(f"a batch of shape {_describe(key)}, but this cache holds plans for its "
                                f"{self.max_shapes} shapes already ({known}); pad the data into at most "
                                f"{self.max_shapes} lengths, or allow more shapes (max_shapes)")
        logger.info("compiling a plan for batch shape %s (%d of at most %d)", _describe(key), len(self.plans) + 1,
                    self.max_shapes)
        plan = compile(self.model, batch, self.policy, **self.options)
        plan.check_memory()
        self.plans[key] = plan
        return plan

    def step(self, batch: Mapping[str, torch.Tensor], optimizer: torch.optim.Optimizer | None = None) -> StepResult:
        """`Plan.step` of the plan for `batch`'s shape (compiled first if new)."""
        return self.plan_for(batch).step(batch, optimizer)

    def lora_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The model's trainable parameters, in the order every plan's graph takes them (capture's)."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    @property
    def fused_update(self) -> bool:
        return bool(self.options.get("fuse_update"))

    @property
    def predicted_peak_bytes(self) -> int:
        """The largest predicted peak of the plans compiled so far (0 before the first)."""
        return max((p.predicted_peak_bytes for p in self.plans.values()), default=0)

    @property
    def predicted_peak_activation_bytes(self) -> int:
        return max((p.predicted_peak_activation_bytes for p in self.plans.values()), default=0)

    def check_memory(self, available_bytes: int | None = None) -> None:
        """`Plan.check_memory` of every plan compiled so far (each new one is checked when compiled)."""
        for plan in self.plans.values():
            plan.check_memory(available_bytes)

    def __len__(self) -> int:
        return len(self.plans)


def _describe(key: ShapeKey) -> str:
    shapes = {shape for _, shape, _ in key}
    return str(next(iter(shapes))) if len(shapes) == 1 else ", ".join(f"{k} {s}" for k, s, _ in key)
