"""Predicted time of a scheduled step on a device: compute, recompute and flash I/O.

Each op falls in one op class (`op_class`) whose roofline the device profile gives
(`DeviceProfile.op_classes`, measured by `mebp calibrate`): matmuls are bound by FLOP/s,
reductions, data movement and element-wise ops by bytes moved, and every op pays the
per-op overhead; a view op pays only that.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass

import torch

from mebp_compiler.device import DeviceProfile
from mebp_compiler.ir import Phase, Role, TensorInfo, TrainingGraph
from mebp_compiler.schedule import Schedule, StepKind

_MATMUL = {"mm", "bmm", "addmm", "baddbmm", "matmul", "linear", "convolution", "_scaled_dot_product_flash_attention",
           "_scaled_dot_product_flash_attention_backward", "_scaled_dot_product_efficient_attention",
           "_scaled_dot_product_efficient_attention_backward", "_scaled_dot_product_attention_math"}
_REDUCTION = {"sum", "mean", "amax", "amin", "max", "min", "var", "var_mean", "std", "norm", "linalg_vector_norm",
              "prod", "cumsum", "logsumexp", "_softmax", "_softmax_backward_data", "_log_softmax",
              "_log_softmax_backward_data", "nll_loss_forward", "nll_loss_backward", "nll_loss", "argmax",
              "native_layer_norm", "native_layer_norm_backward", "embedding_dense_backward"}
_MOVEMENT = {"clone", "cat", "stack", "index", "index_select", "index_put", "index_add", "gather", "scatter",
             "scatter_add", "slice_backward", "select_backward", "embedding", "_to_copy", "copy", "copy_",
             "constant_pad_nd", "contiguous", "repeat", "flip", "roll", "zeros", "zeros_like", "ones",
             "ones_like", "new_ones", "new_zeros", "full", "full_like", "empty", "empty_like", "arange",
             "scalar_tensor", "embedding_int4", "dequantize_int4", "dequantize_int4_rows"}


def op_class(node: torch.fx.Node, ti: TensorInfo) -> str:
    """The op class of a call node: view, matmul, reduction, movement or elementwise (the rest)."""
    if ti.is_view or node.target is operator.getitem:
        return "view"
    packet = getattr(node.target, "_overloadpacket", None)
    name = getattr(packet or node.target, "__name__", str(node.target))
    if name in _MATMUL:
        return "matmul"
    if name in _REDUCTION:
        return "reduction"
    if name in _MOVEMENT:
        return "movement"
    return "elementwise"


def op_seconds(node: torch.fx.Node, ti: TensorInfo, device: DeviceProfile) -> float:
    """Seconds of one op on `device` past its overhead: its class's roofline; a view moves nothing.

    Decompressing an INT4 weight also reads it from flash and decompresses it
    (`DeviceProfile.decompress_s`): what keeping a decompressed weight instead saves.
    """
    if ti.is_view or ti.phase == Phase.INPUT:
        return 0.0
    seconds = device.compute_s(ti.flops, bytes_moved(node, ti), op_class(node, ti))
    if ti.role == Role.DEQUANTIZED:
        seconds += device.decompress_s(sum(ti.output_nbytes) / 8)  # 4 of 32 bits per weight
    return seconds


def bytes_moved(node: torch.fx.Node, ti: TensorInfo) -> int:
    """Bytes an op reads and writes: its inputs' and outputs' tensor sizes (not their storages)."""
    total = sum(ti.output_nbytes)
    for arg in node.all_input_nodes:
        val = arg.meta.get("val")
        if isinstance(val, torch.Tensor):
            total += val.numel() * val.element_size()
    return total


@dataclass(frozen=True)
class StepCost:
    """Seconds of one step. Flash I/O overlaps `io_overlap` x the step's compute time."""

    compute_s: float  # every op of the captured step, once
    recompute_s: float  # the schedule's recomputations
    io_s: float  # flash writes and reads of offloaded tensors
    unhidden_io_s: float  # the part of io_s that compute cannot hide

    @property
    def total_s(self) -> float:
        return self.compute_s + self.recompute_s + self.unhidden_io_s

    @property
    def extra_s(self) -> float:
        """Time over the plain step: recomputation plus un-hidden I/O."""
        return self.recompute_s + self.unhidden_io_s


def step_cost(graph: TrainingGraph, schedule: Schedule, device: DeviceProfile) -> StepCost:
    """Cost of executing `schedule` on the captured `graph` (the same model for every policy)."""
    nodes = {n.name: n for n in graph.module.graph.nodes}

    def seconds(name: str) -> float:
        return op_seconds(nodes[name], graph.info[name], device) + device.op_overhead_s

    compute = sum(seconds(n.name) for n in graph.module.graph.nodes if n.op == "call_function")
    recompute = sum(seconds(s.tensor) for s in schedule.sequence if s.kind == StepKind.RECOMPUTE)
    io = sum(device.offload_s(sum(graph.info[s.tensor].output_nbytes))
             for s in schedule.sequence if s.kind == StepKind.OFFLOAD)
    return StepCost(compute, recompute, io, max(0.0, io - device.io_overlap * compute))


def seconds_by_class(graph: TrainingGraph, device: DeviceProfile) -> dict[str, float]:
    """Predicted seconds of every op of `graph`, run once, summed per op class (overheads included)."""
    total: dict[str, float] = defaultdict(float)
    for node in graph.module.graph.nodes:
        if node.op == "call_function":
            ti = graph.info[node.name]
            total[op_class(node, ti)] += op_seconds(node, ti, device) + device.op_overhead_s
    return dict(total)
