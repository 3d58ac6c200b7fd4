"""mebp-compiler: exact, memory-budgeted LoRA backpropagation, compiled for phones."""

from mebp_compiler.plan import POLICIES, BatchShapeError, Plan, compile

__all__ = ["POLICIES", "BatchShapeError", "Plan", "compile"]
