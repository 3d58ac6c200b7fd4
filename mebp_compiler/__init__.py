"""mebp-compiler: exact, memory-budgeted LoRA backpropagation, compiled for phones.

The names below are imported on first use (PEP 562), so `import mebp_compiler.app.cli` and
`mebp --help` do not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DeviceProfile": "mebp_compiler.device", "parse_size": "mebp_compiler.device",
    "BudgetInfeasible": "mebp_compiler.passes.scheduler.solver", "ScheduleNotFound": "mebp_compiler.passes.scheduler.solver",
    "POLICIES": "mebp_compiler.plan", "BatchShapeError": "mebp_compiler.plan", "InsufficientMemory": "mebp_compiler.plan",
    "Plan": "mebp_compiler.plan", "compile": "mebp_compiler.plan",
    "PlanCache": "mebp_compiler.plan_cache", "TooManyShapes": "mebp_compiler.plan_cache",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mebp_compiler' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
