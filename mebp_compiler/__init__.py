"""mebp-compiler: exact, memory-budgeted LoRA backpropagation, compiled for phones."""

from mebp_compiler.device import DeviceProfile, parse_size
from mebp_compiler.passes.schedule.solver import BudgetInfeasible, ScheduleNotFound
from mebp_compiler.plan import POLICIES, BatchShapeError, InsufficientMemory, Plan, compile

__all__ = ["POLICIES", "BatchShapeError", "BudgetInfeasible", "DeviceProfile", "InsufficientMemory", "Plan",
           "ScheduleNotFound", "compile",
           "parse_size"]
