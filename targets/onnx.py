"""ONNX target: each stage as an `.onnx` file, run here with onnxruntime.

A stage is decomposed to core ATen first (`make_fx` with torch's core-ATen decomposition
table), because the ONNX exporter has no function for some ops of a captured backward
(`aten.silu_backward`, the CPU flash-attention backward; see the toolchain notes), then
exported with `torch.onnx.export(..., dynamo=True, optimize=False)`: the exporter's
optimiser is slow on training graphs and onnxruntime optimises at load time anyway.
Weights are graph inputs, so the files hold only the graph and small constants.

Inputs and outputs are positional (`input_0`, ..., `output_0`, ...): one file serves every
stage of the same structure (every block of a model), the manifest binds the names.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.fx as fx
from torch._decomp import core_aten_decompositions
from torch.fx.experimental.proxy_tensor import make_fx

from mebp_compiler.files import atomic_write

#: ONNX opset of every exported stage (ai.onnx domain); onnxruntime 1.32 runs it.
OPSET = 18
SUFFIX = ".onnx"
NAME = "onnx"

_ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 7: "int64", 9: "bool", 10: "float16", 11: "float64", 6: "int32",
                16: "bfloat16"}


def decompose(stage: fx.GraphModule, example_inputs: list[torch.Tensor]) -> fx.GraphModule:
    """The stage re-traced over core ATen ops (what the ONNX exporter translates)."""
    return make_fx(stage, decomposition_table=core_aten_decompositions())(*example_inputs)


def export_stage(stage: fx.GraphModule, example_inputs: list[torch.Tensor], path: Path) -> Path:
    """Write `stage` as ONNX to `path` with the `.onnx` suffix added; return the file's path."""
    path = Path(path)
    path = path.with_name(path.name + SUFFIX) if path.suffix != SUFFIX else path
    decomposed = decompose(stage, example_inputs)
    num_outputs = len(stage.graph.output_node().args[0])
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level

    def write(tmp: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                decomposed, tuple(example_inputs), str(tmp), dynamo=True, optimize=False, opset_version=OPSET,
                input_names=[f"input_{k}" for k in range(len(example_inputs))],
                output_names=[f"output_{k}" for k in range(num_outputs)], external_data=False, verbose=False,
            )

    exporter_log.setLevel(logging.ERROR)  # it warns that torchvision's ops are not registered
    try:
        return atomic_write(path, write)
    finally:
        exporter_log.setLevel(level)


def describe_stage(path: Path) -> tuple[list[tuple[list[int], str]], list[tuple[list[int], str]]]:
    """Shapes and dtypes of the file's inputs and outputs, read without loading a session."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def spec(value) -> tuple[list[int], str]:
        tensor = value.type.tensor_type
        shape = [d.dim_value for d in tensor.shape.dim]
        return shape, _ONNX_DTYPES.get(tensor.elem_type, f"onnx-type-{tensor.elem_type}")

    return [spec(v) for v in model.graph.input], [spec(v) for v in model.graph.output]


def load_stage(path: Path):
    """An onnxruntime session for the file, as a callable from input arrays to output arrays."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    input_names = [i.name for i in session.get_inputs()]
    output_names = [o.name for o in session.get_outputs()]

    def run(inputs: list[np.ndarray]) -> list[np.ndarray]:
        return session.run(output_names, dict(zip(input_names, inputs, strict=True)))

    return run
