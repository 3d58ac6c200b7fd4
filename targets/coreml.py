"""CoreML target: a stage as an ML Program (`.mlpackage`) built op by op with MIL's Builder.

Each ATen op of the stage becomes a few MIL ops (`coremltools.converters.mil.Builder`),
the program is converted with `ct.convert` (mlprogram, minimum deployment target iOS 17
by default, fp32 or fp16 compute precision) and saved. Building MIL directly from the fx
graph avoids re-tracing it with torch.export and sidesteps the torch frontend's typing
pitfalls (e.g. nll_loss's gather indices typed as fp32).

Stage inputs are model inputs, frozen weights included (streamed by the app). Core ML
model inputs and outputs are fp32, fp16 or int32 multi-arrays of rank >= 1, so:
int64/int32/int8/uint8 tensors travel as int32, bool tensors as int32 (0/1), and rank-0
tensors as shape (1,). Names are the stage's: inputs are named after the placeholders,
outputs after the nodes that produce them (`fx_stage.output_signature`).

Optionally, named inputs can be baked in as constants (`constants=`), and with
`int4_block_size=` those constant weights are stored as INT4 with coremltools' blockwise
linear quantization (needs iOS 18).

Core ML cannot run a model on Linux, so `load_stage` refuses with a clear error;
`check_stage` checks what Linux allows: the package reloads, its inputs and outputs match
the stage's names, shapes and dtypes, its ops are ones this translation emits (or the
converter's passes introduce), and the saved program itself - read back from the package
and evaluated op by op with MIL's value inference (`package_values`; numpy fallbacks for
the ops that lack it) - equals the torch stage on the example inputs. `value_inference_stage`
evaluates a package the same way as a stage function, so a driver can run a whole artifact
directory's step here.

Translated ops (all ops of the captured training step of tiny Llama, Qwen2, Gemma-3 and
SmolLM2-135M, without decomposition, the vocabulary-sliced loss's included):

    views and copies   view, _unsafe_view, reshape, t, transpose.int, permute, expand,
                       squeeze.dim, squeeze.dims, unsqueeze, slice.Tensor, select.int,
                       alias, detach, clone, _to_copy, lift_fresh_copy
    creation           arange (3 overloads), zeros, ones, full, scalar_tensor, new_zeros,
                       new_ones, new_full, zeros_like, ones_like, full_like
    arithmetic         add/sub (Tensor, Scalar; alpha), mul/div (Tensor, Scalar), neg,
                       pow.Tensor_Scalar, rsqrt, sqrt, exp, log, sin, cos, tanh, sigmoid,
                       where.self, maximum, minimum, clamp, clamp_min, clamp_max
    comparison, logic  eq, ne, lt, le, gt, ge (Tensor, Scalar), bitwise_and/or.Tensor
                       and logical_and/or/not on bool tensors
    reductions         sum.default, sum.dim_IntList, mean.dim, amax, cumsum
    linear algebra     mm, bmm, addmm, matmul
    indexing, shape    embedding, index.Tensor (leading adjacent indices), index_select, gather,
                       cat, stack, constant_pad_nd, slice_backward (step 1)
    nn                 _softmax, _log_softmax, silu, gelu (none / tanh)
    backward           _softmax_backward_data, _log_softmax_backward_data, silu_backward,
                       gelu_backward, nll_loss_forward, nll_loss_backward
    INT4 weights       passes.quantize.dequantize_int4, dequantize_int4_rows, embedding_int4
    GGUF blocks        passes.gguf_blocks.dequantize_gguf, dequantize_gguf_rows, embedding_gguf
                       (Q4_1 / Q8_0 decoded with integer ops, fp16 scales from their bytes)

Any other op raises `UnsupportedStageOpError` naming it.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import os
import pathlib
import platform
import shutil
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from mebp_compiler.passes import quantize
from mebp_compiler.passes.gguf_blocks import BLOCK_BYTES
from mebp_compiler.targets import TargetUnavailableError
from mebp_compiler.targets.fx_stage import (
    OpContext,
    StageError,
    TensorSig,
    ensure_values,
    input_signature,
    output_signature,
    rule_name,
    run_torch,
    translate,
)

with warnings.catch_warnings():  # coremltools warns about the untested torch version on import
    warnings.simplefilter("ignore")
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.milproto.load import load as load_milproto
    from coremltools.converters.mil.mil import Function, Program, Var, types

aten = torch.ops.aten
SUFFIX = ".mlpackage"
NAME = "coreml"
#: `verify_artifacts` writes its per-artifact check results here, in the artifact directory.
CHECK_REPORT = "coreml-check.json"
DEFAULT_DEPLOYMENT_TARGET = ct.target.iOS17
PRECISIONS = {"fp32": ct.precision.FLOAT32, "fp16": ct.precision.FLOAT16}
#: Constant tensors larger than this many elements are computed on the device (e.g. `fill`,
#: rotary tables from `arange`) rather than folded into the package by the converter
#: (unless the stage has baked-in weights, which must fold).
MAX_FOLDED_ELEMENTS = 4096

_MIL_DTYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.int64: "int32",
    torch.int32: "int32",
    torch.int16: "int32",
    torch.int8: "int32",
    torch.uint8: "int32",
    torch.bool: "bool",
}
_NP_DTYPES = {"fp32": np.float32, "fp16": np.float16, "int32": np.int32, "bool": np.bool_}
#: Core ML model input/output dtype of a stage tensor of each MIL dtype.
_IO_DTYPES = {"fp32": "fp32", "fp16": "fp16", "int32": "int32", "bool": "int32"}
_SPEC_DTYPES = {"fp32": "FLOAT32", "fp16": "FLOAT16", "int32": "INT32"}
_ARRAY_TYPES = ct.proto.FeatureTypes_pb2.ArrayFeatureType
_SPEC_NP_DTYPES = {_ARRAY_TYPES.FLOAT32: np.float32, _ARRAY_TYPES.FLOAT16: np.float16, _ARRAY_TYPES.INT32: np.int32}


def mil_dtype(dtype: torch.dtype) -> str:
    try:
        return _MIL_DTYPES[dtype]
    except KeyError:
        raise StageError(f"the CoreML target has no MIL dtype for {dtype} (use fp32, fp16, int or bool)") from None


def io_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """A stage tensor's shape as a Core ML model input/output (rank 0 travels as (1,))."""
    return tuple(shape) or (1,)


def io_dtype(dtype: torch.dtype) -> str:
    """A stage tensor's dtype as a Core ML model input/output: 'fp32', 'fp16' or 'int32'."""
    return _IO_DTYPES[mil_dtype(dtype)]


def io_form(shape: Sequence[int], dtype: str) -> tuple[list[int], str]:
    """A manifest value's (shape, dtype name) as the package takes or gives it, e.g.
    ([2, 24], 'int64') -> ([2, 24], 'int32') and ([], 'float32') -> ([1], 'float32')."""
    io = io_dtype(getattr(torch, dtype))
    return list(io_shape(shape)), np.dtype(_NP_DTYPES[io]).name


def describe_stage(path: pathlib.Path) -> tuple[list[tuple[list[int], str]], list[tuple[list[int], str]]]:
    """(inputs, outputs) of a saved package as ([shape], numpy dtype name) pairs in Core ML I/O form
    (see `io_form`), read from its spec without loading a model (works on any OS)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        description = ct.models.MLModel(str(path), skip_model_load=True).get_spec().description

    def spec(feature) -> tuple[list[int], str]:
        array = feature.type.multiArrayType
        return list(array.shape), np.dtype(_SPEC_NP_DTYPES[array.dataType]).name

    return [spec(f) for f in description.input], [spec(f) for f in description.output]


# ---------------------------------------------------------------- export


def export_stage(
    stage: fx.GraphModule,
    example_inputs: list[torch.Tensor],
    path: pathlib.Path,
    *,
    precision: str = "fp32",
    deployment_target: Any = DEFAULT_DEPLOYMENT_TARGET,
    constants: Sequence[str] = (),
    int4_block_size: int | None = None,
) -> pathlib.Path:
    """Write `stage` as an ML Program package for inputs shaped like `example_inputs`.

    `precision` is the compute precision, 'fp32' or 'fp16' (fp16 keeps fp32 model inputs
    and outputs and casts inside). `constants` names placeholders whose example values are
    baked into the program instead of being inputs; with `int4_block_size`, those of them
    that are 2-D float weights are stored as symmetric INT4 with one scale per block of
    that many inputs (needs deployment target iOS 18 or later). The package is written
    to a temporary sibling and renamed into place; `path` gets the `.mlpackage` suffix if
    it lacks it. Raises UnsupportedStageOpError for an op without a translation.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if int4_block_size is not None and deployment_target < ct.target.iOS18:
        raise ValueError("INT4 blockwise weights need deployment_target=ct.target.iOS18 or later")
    ensure_values(stage, example_inputs)
    names = [s.name for s in input_signature(stage)]
    unknown = set(constants) - set(names)
    if unknown:
        raise StageError(f"constants names inputs the stage does not have: {sorted(unknown)}")
    path = pathlib.Path(path)
    if path.suffix != SUFFIX:
        path = path.with_name(path.name + SUFFIX)
    baked = {n: x for n, x in zip(names, example_inputs) if n in constants}
    program, _ = build_program(stage, deployment_target, constants=baked)
    with warnings.catch_warnings(), _quiet_converter():
        warnings.simplefilter("ignore")
        pipeline = ct.PassPipeline.DEFAULT
        if not baked:  # baked weights must fold (e.g. their transposes) to be quantized and stored once
            pipeline.set_options("common::const_elimination", {"skip_const_by_size": str(MAX_FOLDED_ELEMENTS)})
        model = ct.convert(
            program,
            convert_to="mlprogram",
            minimum_deployment_target=deployment_target,
            compute_precision=PRECISIONS[precision],
            pass_pipeline=pipeline,
            skip_model_load=True,
        )
        if int4_block_size is not None:
            model = _quantize_int4(model, int4_block_size)
    _save_atomically(model, path)
    return path


def build_program(
    stage: fx.GraphModule,
    deployment_target: Any = DEFAULT_DEPLOYMENT_TARGET,
    *,
    constants: dict[str, torch.Tensor] | None = None,
) -> tuple[Program, Counter]:
    """The stage as a MIL program, and the count of each MIL op type the translation emitted.

    Inputs named in `constants` are baked in with the given values; the others are the
    program's inputs, in Core ML I/O form (see the module docstring).
    """
    constants = constants or {}
    inputs = input_signature(stage)
    mil = _Mil()
    placeholders = {
        s.name: mb.placeholder(shape=io_shape(s.shape), dtype=types.string_to_builtin(io_dtype(s.dtype)))
        for s in inputs
        if s.name not in constants
    }
    with Function(placeholders, opset_version=deployment_target) as function:
        args = [
            mil.input_value(s, constants[s.name]) if s.name in constants
            else mil.adapt_input(s, function.inputs[s.name])
            for s in inputs
        ]
        rules = {op: functools.partial(rule, mil) for op, rule in _RULES.items()}
        results = translate(stage, args, rules, "coreml", mil.tensor_constant, mil.finish)
        outputs = [mil.adapt_output(sig, var) for sig, var in zip(output_signature(stage), results)]
        function.set_outputs(outputs)
    program = Program()
    program.add_function("main", function)
    return program, mil.emitted


def load_stage(path: pathlib.Path) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
    """On macOS, a function from the stage inputs (in order) to its outputs in Core ML I/O form
    (int32 for int and bool tensors, (1,) for rank 0). Elsewhere Core ML cannot predict, and
    this raises with what to do instead. Not exercised by the tests here (Linux)."""
    if platform.system() != "Darwin":
        raise TargetUnavailableError(
            f"cannot run {path}: Core ML predictions need macOS or iOS. On this machine use "
            "targets.coreml.check_stage (reload, signature and MIL value-inference checks; `mebp compile "
            "--target coreml` runs them on every stage), or compile for the onnx or mlx target to train here."
        )
    model = ct.models.MLModel(str(path))
    description = model.get_spec().description
    inputs_spec = [(f.name, tuple(f.type.multiArrayType.shape), _SPEC_NP_DTYPES[f.type.multiArrayType.dataType])
                   for f in description.input]
    outputs = [f.name for f in description.output]

    def run(inputs: list[np.ndarray]) -> list[np.ndarray]:
        feed = {name: np.asarray(x).astype(dtype).reshape(shape)
                for (name, shape, dtype), x in zip(inputs_spec, inputs)}
        prediction = model.predict(feed)
        return [np.asarray(prediction[name]) for name in outputs]

    return run


# ---------------------------------------------------------------- check


@dataclass
class StageCheck:
    """What `check_stage` found for one package; `ok` when `problems` is empty.

    `max_error[i]` is output i's largest absolute difference between MIL value inference
    and torch, `scale[i]` its largest absolute torch value; `package_ops` counts the MIL
    ops in the saved program by type.
    """

    path: pathlib.Path
    deployment_target: str
    package_ops: Counter
    max_error: list[float] = field(default_factory=list)
    scale: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        worst = max((e / max(1.0, s) for e, s in zip(self.max_error, self.scale)), default=0.0)
        status = "ok" if self.ok else "FAILED: " + "; ".join(self.problems)
        return (f"{self.path.name}: {self.deployment_target}, {sum(self.package_ops.values())} MIL ops "
                f"of {len(self.package_ops)} types, worst relative error {worst:.2g}: {status}")


#: Op types the converter's own passes put in a package besides what we emit, as seen with
#: coremltools 9.0: fp16 casts, fusions (linear), a select whose condition it inverts
#: (greater_equal), and the INT4 weights' decompression.
_CONVERTER_OPS = {"const", "cast", "linear", "identity", "squeeze", "expand_dims", "add", "mul", "sub", "real_div",
                  "greater_equal", "constexpr_blockwise_shift_scale"}


def check_stage(
    path: pathlib.Path,
    stage: fx.GraphModule,
    example_inputs: list[torch.Tensor],
    *,
    tol: float = 1e-5,
    constants: Sequence[str] = (),
    deployment_target: Any = DEFAULT_DEPLOYMENT_TARGET,
) -> StageCheck:
    """Check a saved stage package on any OS: reload, signature, op set, values.

    The package must reload (`skip_model_load=True`), declare the deployment target, have
    the stage's inputs (less `constants`) and outputs by name, shape and dtype (Core ML
    I/O form, see the module docstring), and contain only op types the translation emits
    or the converter introduces (casts, fusions such as linear). Numerically, the saved
    program itself, evaluated by MIL value inference on `example_inputs`
    (`package_values`), must equal the torch stage: per output, max abs diff <= tol x
    max(1, max |torch value|). This covers the converter's passes and, for an fp16 or
    INT4 package, its rounding (choose `tol` accordingly).
    """
    path = pathlib.Path(path)
    ensure_values(stage, example_inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    function = spec.mlProgram.functions["main"]
    package_ops = Counter(op.type for op in function.block_specializations[function.opset].operations)
    check = StageCheck(path, function.opset, package_ops)
    expected_opset = _opset_name(deployment_target)
    if function.opset != expected_opset:
        check.problems.append(f"opset {function.opset}, expected {expected_opset}")

    def described(features) -> list[tuple[str, tuple[int, ...], str]]:
        return [(f.name, tuple(f.type.multiArrayType.shape),
                 _ARRAY_TYPES.ArrayDataType.Name(f.type.multiArrayType.dataType)) for f in features]

    def wanted(sigs: list[TensorSig]) -> list[tuple[str, tuple[int, ...], str]]:
        return [(s.name, io_shape(s.shape), _SPEC_DTYPES[io_dtype(s.dtype)]) for s in sigs]

    inputs = input_signature(stage)
    fed = [k for k, sig in enumerate(inputs) if sig.name not in constants]
    for kind, have, want in (
        ("inputs", described(spec.description.input), wanted([inputs[k] for k in fed])),
        ("outputs", described(spec.description.output), wanted(output_signature(stage))),
    ):
        if have != want:
            check.problems.append(f"{kind} {have} differ from the stage's {want}")
    if check.problems:
        return check

    baked = {inputs[k].name: example_inputs[k] for k in range(len(inputs)) if k not in fed}
    _, emitted = build_program(stage, deployment_target, constants=baked)
    foreign = set(package_ops) - set(emitted) - _CONVERTER_OPS
    if foreign:
        check.problems.append(f"the package has op types the translation does not emit: {sorted(foreign)}")
    try:
        computed = package_values(path, [io_array(example_inputs[k]) for k in fed])
    except StageError as error:
        check.problems.append(str(error))
        return check
    for got, ref, sig in zip(computed, run_torch(stage, example_inputs), output_signature(stage)):
        ref = ref.detach().reshape(io_shape(ref.shape)).to(torch.float64 if ref.is_floating_point() else torch.int64)
        got = torch.from_numpy(np.asarray(got).astype(np.float64 if ref.is_floating_point() else np.int64))
        error = (got.reshape(ref.shape) - ref).abs().max().item() if ref.numel() else 0.0
        scale = ref.abs().max().item() if ref.numel() else 0.0
        check.max_error.append(error)
        check.scale.append(scale)
        if not error <= tol * max(1.0, scale):
            check.problems.append(f"output {sig.name}: the package's values differ from torch by {error:.3g}")
    return check


def io_array(tensor: torch.Tensor) -> np.ndarray:
    """A stage tensor as the array a Core ML model takes for it (int32 for ints and bools, (1,) for rank 0)."""
    array = tensor.detach().cpu().numpy().astype(_NP_DTYPES[io_dtype(tensor.dtype)])
    return array.reshape(io_shape(array.shape))


def package_values(path: pathlib.Path, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Evaluate a saved package on Linux: its outputs for `inputs` (in Core ML I/O form, in order).

    The package's program is read back (`milproto` loader) and each of its ops is rebuilt,
    in order, on constant inputs, so MIL's value inference computes it (numpy for the few
    ops without value inference, `_NUMPY_FALLBACKS`; compressed `constexpr_*` weights are
    decompressed by coremltools). Slow for big tensors; meant for checks.
    Raises StageError for an op that can be computed neither way.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ct.models.MLModel(str(path), skip_model_load=True)
        spec = model.get_spec()
        program = load_milproto(spec, spec.specificationVersion, model.weights_dir)
    function = program.functions["main"]
    if len(inputs) != len(function.inputs):
        raise StageError(f"{path.name} takes {len(function.inputs)} inputs, got {len(inputs)}")
    with warnings.catch_warnings(), Function({}, opset_version=function.opset_version):
        warnings.simplefilter("ignore")  # numpy overflow in fp16 programs (-inf masks) is expected
        env: dict[Var, Var] = {var: mb.const(val=np.asarray(x)) for var, x in zip(function.inputs.values(), inputs)}
        for op in function.operations:
            if op.op_type == "const":
                env[op.outputs[0]] = mb.const(val=_const_value(op.outputs[0].val))
                continue
            if op.op_type.startswith("constexpr_"):  # compressed weights, decompressed by coremltools
                env[op.outputs[0]] = mb.const(val=op.materialized_val_inference())
                continue
            kwargs = {k: [env[v] for v in arg] if isinstance(arg, (list, tuple)) else env[arg]
                      for k, arg in op.inputs.items()}
            results = getattr(mb, op.op_type)(**kwargs)
            for old, new in zip(op.outputs, results if isinstance(results, (list, tuple)) else [results]):
                env[old] = new if new.val is not None else _fallback(op.op_type, kwargs, new)
        return [np.asarray(env[var].val) for var in function.outputs]


def value_inference_stage(path: pathlib.Path) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
    """A saved package as a stage function on Linux: its inputs (in order) brought to Core ML
    I/O form, its outputs computed by `package_values`, what `load_stage` gives on macOS
    but in numpy's arithmetic. Slow; for checking a whole artifact directory's step here."""
    path = pathlib.Path(path)
    inputs, _ = describe_stage(path)

    def run(arrays: list[np.ndarray]) -> list[np.ndarray]:
        return package_values(path, [np.asarray(x).astype(dtype).reshape(shape)
                                     for x, (shape, dtype) in zip(arrays, inputs)])

    return run


def _const_value(value: Any) -> Any:
    # The loader gives scalar bools as numpy bools, which some value inferences cannot take.
    return bool(value) if np.asarray(value).dtype == np.bool_ and np.ndim(value) == 0 else value


def _fallback(op_type: str, kwargs: dict[str, Any], var: Var) -> Var:
    fallback = _NUMPY_FALLBACKS.get(op_type)
    if fallback is None:
        raise StageError(f"MIL op {op_type} has neither value inference nor a numpy fallback in targets/coreml.py")
    args = {k: v.val for k, v in kwargs.items() if not isinstance(v, list)}
    return mb.const(val=np.asarray(fallback(**args)).astype(_NP_DTYPES[types.builtin_to_string(var.dtype)]))


@contextlib.contextmanager
def _quiet_converter():
    """Silence coremltools' per-op warnings (each constant left unfolded is logged); errors still raise."""
    logger = logging.getLogger("coremltools")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _opset_name(deployment_target: Any) -> str:
    """The opset name a package of this deployment target declares (iOS 17 -> 'CoreML7')."""
    return f"CoreML{deployment_target.value - 1}" if deployment_target >= ct.target.iOS15 else str(deployment_target)


def _save_atomically(model: Any, path: pathlib.Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp{SUFFIX}")
    old = path.with_name(f".{path.stem}.old{SUFFIX}")
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    model.save(str(tmp))
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old)


def _quantize_int4(model: Any, block_size: int) -> Any:
    from coremltools.optimize.coreml import OpLinearQuantizerConfig, OptimizationConfig, linear_quantize_weights

    config = OptimizationConfig(global_config=OpLinearQuantizerConfig(
        mode="linear_symmetric", dtype="int4", granularity="per_block", block_size=block_size, weight_threshold=0,
    ))
    return linear_quantize_weights(model, config)


# ---------------------------------------------------------------- MIL building


#: numpy semantics of MIL ops that lack value inference in coremltools 9.0.
_NUMPY_FALLBACKS: dict[str, Callable[..., np.ndarray]] = {
    "silu": lambda x: x / (1 + np.exp(-x)),
    "gather_nd": lambda x, indices, batch_dims=0: x[tuple(np.moveaxis(indices, -1, 0))],
}


class _Mil:
    """Creates MIL ops under unique names and counts their types."""

    def __init__(self) -> None:
        self.emitted: Counter = Counter()
        self._names = (f"mil_{k}" for k in itertools.count())

    def op(self, op_type: str, **kwargs) -> Var:
        self.emitted[op_type] += 1
        return getattr(mb, op_type)(**kwargs, name=next(self._names))

    def const(self, value: np.ndarray) -> Var:
        return mb.const(val=value, name=next(self._names))

    def tensor_constant(self, tensor: torch.Tensor) -> Var:
        return self.const(tensor.detach().numpy().astype(_NP_DTYPES[mil_dtype(tensor.dtype)]))

    @staticmethod
    def dtype_of(var: Var) -> str:
        return types.builtin_to_string(var.dtype)

    def cast(self, x: Any, dtype: torch.dtype | str) -> Var | np.ndarray:
        """`x` (Var or Python scalar) in MIL dtype `dtype` (a torch dtype is mapped first)."""
        target = dtype if isinstance(dtype, str) else mil_dtype(dtype)
        if not isinstance(x, Var):
            return np.array(x, dtype=_NP_DTYPES[target])
        return x if self.dtype_of(x) == target else self.op("cast", x=x, dtype=target)

    def input_value(self, sig: TensorSig, tensor: torch.Tensor) -> Var:
        """A stage input baked in as a constant."""
        if tuple(tensor.shape) != sig.shape or tensor.dtype != sig.dtype:
            raise StageError(f"value for input '{sig.name}' is {tensor.dtype} {tuple(tensor.shape)}, "
                             f"the stage takes {sig.dtype} {sig.shape}")
        return self.tensor_constant(tensor)

    def adapt_input(self, sig: TensorSig, var: Var) -> Var:
        """The stage's view of a model input: rank-0 from (1,), bool from int32."""
        if not sig.shape:
            var = self.op("reshape", x=var, shape=np.zeros(0, dtype=np.int32))
        return self.cast(var, sig.dtype)

    def adapt_output(self, sig: TensorSig, var: Var) -> Var:
        """A stage output as a named model output: int32 for bool, (1,) for rank 0."""
        var = self.cast(var, io_dtype(sig.dtype))
        if not sig.shape:
            var = self.op("reshape", x=var, shape=np.array([1], dtype=np.int32))
        out = mb.identity(x=var, name=sig.name)
        self.emitted["identity"] += 1
        return out

    def finish(self, ctx: OpContext, value: Any) -> Any:
        if isinstance(value, tuple):
            return value
        value = self.cast(value, ctx.dtype)
        if tuple(value.shape) != ctx.shape:
            raise AssertionError(f"MIL translation of {ctx.node.name} ({ctx.node.target}) gave shape "
                                 f"{tuple(value.shape)}, torch gives {ctx.shape}")
        return value

    def full(self, shape: Sequence[int], value: Any, dtype: torch.dtype | str) -> Var:
        """A tensor of one value: a const when small, else a `fill` op, so the package stores no
        large block of one repeated number (the converter is told not to fold big constants)."""
        target = dtype if isinstance(dtype, str) else mil_dtype(dtype)
        value = np.array(value, dtype=_NP_DTYPES[target])
        if int(np.prod(shape, dtype=np.int64)) <= MAX_FOLDED_ELEMENTS:
            return self.const(np.full(tuple(shape), value))
        return self.op("fill", shape=np.array(shape, dtype=np.int32), value=value)

    def reshape(self, x: Var, shape: Sequence[int]) -> Var:
        return self.op("reshape", x=x, shape=np.array(shape, dtype=np.int32))


# ---------------------------------------------------------------- translation rules
# Each rule takes the _Mil builder, the OpContext and the op's arguments by schema name.


def _binary(op_type: str, compute: str = "promoted") -> Callable:
    def rule(b: _Mil, ctx: OpContext, input, other, alpha=1, **_):
        dtype = ctx.dtype if compute == "result" else ctx.promoted("input", "other")
        x, y = b.cast(input, dtype), b.cast(other, dtype)
        if alpha != 1:
            y = b.op("mul", x=y, y=b.cast(alpha, dtype))
        return b.op(op_type, x=x, y=y)

    return rule


def _logical(op_type: str) -> Callable:
    def rule(b: _Mil, ctx: OpContext, input, other, **_):
        if ctx.dtype != torch.bool:
            raise StageError(f"{ctx.node.target} on {ctx.dtype} tensors is not translated (only on bool)")
        return b.op(op_type, x=b.cast(input, torch.bool), y=b.cast(other, torch.bool))

    return rule


def _unary(op_type: str, **attrs) -> Callable:
    return lambda b, ctx, input, **_: b.op(op_type, x=b.cast(input, ctx.dtype), **attrs)


def _axes(dim, ndim: int) -> np.ndarray | None:
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return None
    dims = [dim] if isinstance(dim, int) else list(dim)
    return np.array([d % ndim for d in dims], dtype=np.int32)


def _reduce(op_type: str) -> Callable:
    def rule(b: _Mil, ctx: OpContext, input, dim=None, keepdim=False, **_):
        axes = _axes(dim, input.rank)
        kwargs = {} if axes is None else {"axes": axes}
        return b.op(op_type, x=b.cast(input, ctx.dtype), keep_dims=keepdim, **kwargs)

    return rule


def _view(b: _Mil, ctx: OpContext, input, **_):
    return b.reshape(input, ctx.shape)


def _permute(b: _Mil, ctx: OpContext, input, dims, **_):
    return b.op("transpose", x=input, perm=np.array([d % input.rank for d in dims], dtype=np.int32))


def _transpose(b: _Mil, ctx: OpContext, input, dim0, dim1, **_):
    perm = list(range(input.rank))
    perm[dim0], perm[dim1] = perm[dim1], perm[dim0]
    return _permute(b, ctx, input, perm)


def _t(b: _Mil, ctx: OpContext, input, **_):
    return _permute(b, ctx, input, [1, 0]) if input.rank == 2 else input


def _expand(b: _Mil, ctx: OpContext, input, size, **_):
    shape = (1,) * (len(ctx.shape) - input.rank) + tuple(input.shape)
    x = b.reshape(input, shape) if len(shape) != input.rank else input
    reps = [o // i if i == 1 else 1 for i, o in zip(shape, ctx.shape)]
    return b.op("tile", x=x, reps=np.array(reps, dtype=np.int32)) if any(r != 1 for r in reps) else x


def _slice_bounds(size: int, start, end, step) -> tuple[int, int, int]:
    return slice(start, end, step).indices(size)


def _slice(b: _Mil, ctx: OpContext, input, dim=0, start=None, end=None, step=1, **_):
    dim %= input.rank
    begin, stop, stride = [0] * input.rank, list(input.shape), [1] * input.rank
    begin[dim], stop[dim], stride[dim] = _slice_bounds(input.shape[dim], start, end, step)
    return b.op("slice_by_index", x=input, begin=np.array(begin, dtype=np.int32),
                end=np.array(stop, dtype=np.int32), stride=np.array(stride, dtype=np.int32))


def _select(b: _Mil, ctx: OpContext, input, dim, index, **_):
    dim %= input.rank
    index %= input.shape[dim]
    return b.reshape(_slice(b, ctx, input, dim, index, index + 1, 1), ctx.shape)


def _pad_with(b: _Mil, x: Var, dim: int, before: int, after: int, value: Any) -> Var:
    """`x` with `before`/`after` entries of `value` added along `dim` (concat of constants, any dtype)."""
    parts = []
    for count in (before, after):
        shape = list(x.shape)
        shape[dim] = count
        parts.append(b.full(shape, value, b.dtype_of(x)) if count else None)
    values = [v for v in (parts[0], x, parts[1]) if v is not None]
    return b.op("concat", values=values, axis=dim) if len(values) > 1 else x


def _constant_pad_nd(b: _Mil, ctx: OpContext, input, pad, value=0, **_):
    x = input
    for k in range(0, len(pad), 2):
        dim = input.rank - 1 - k // 2
        before, after = pad[k], pad[k + 1]
        if before < 0 or after < 0:
            x = _slice(b, ctx, x, dim, max(-before, 0), x.shape[dim] - max(-after, 0), 1)
        x = _pad_with(b, x, dim, max(before, 0), max(after, 0), value)
    return x


def _slice_backward(b: _Mil, ctx: OpContext, grad_output, input_sizes, dim, start, end, step, **_):
    dim %= len(input_sizes)
    begin, stop, stride = _slice_bounds(input_sizes[dim], start, end, step)
    if stride != 1:
        raise StageError(f"slice_backward with step {stride} is not translated (node {ctx.node.name})")
    return _pad_with(b, grad_output, dim, begin, input_sizes[dim] - stop, 0)


def _creation(value_arg: str | None = None, value: Any = 0) -> Callable:
    def rule(b: _Mil, ctx: OpContext, **kwargs):
        return b.full(ctx.shape, kwargs[value_arg] if value_arg else value, ctx.dtype)

    return rule


def _arange(b: _Mil, ctx: OpContext, start=0, end=None, step=1, **_):
    if end is None:
        start, end = 0, start
    return b.const(np.arange(start, end, step).astype(_NP_DTYPES[mil_dtype(ctx.dtype)]))


def _pow(b: _Mil, ctx: OpContext, input, exponent, **_):
    x = b.cast(input, ctx.dtype)
    if exponent == 2:  # exact, and what ATen's pow does for a square
        return b.op("mul", x=x, y=x)
    return b.op("pow", x=x, y=b.cast(exponent, ctx.dtype))


def _clamp(b: _Mil, ctx: OpContext, input, min=None, max=None, **_):
    # maximum/minimum rather than MIL's clip, which takes floats only: the sliced loss clamps int labels.
    x = b.cast(input, ctx.dtype)
    if min is not None:
        x = b.op("maximum", x=x, y=b.cast(min, ctx.dtype))
    if max is not None:
        x = b.op("minimum", x=x, y=b.cast(max, ctx.dtype))
    return x


def _gather(b: _Mil, ctx: OpContext, input, dim, index, sparse_grad=False, **_):
    # torch.gather's index may be shorter than `input` off `dim`; gather_along_axis wants equal extents there.
    dim %= input.rank
    index = b.cast(index, "int32")
    extent = [input.shape[d] if d == dim else index.shape[d] for d in range(input.rank)]
    if extent != list(input.shape):
        input = b.op("slice_by_index", x=input, begin=np.zeros(input.rank, dtype=np.int32),
                     end=np.array(extent, dtype=np.int32))
    return b.op("gather_along_axis", x=input, indices=index, axis=dim)


def _where(b: _Mil, ctx: OpContext, condition, input, other, **_):
    # MIL's select takes its result shape from a and b alone (coremltools 9.0), not from
    # cond: give the operands full rank and, when a and b are smaller than the result, tile a.
    rank = len(ctx.shape)

    def operand(v, dtype):
        v = b.cast(v, dtype)
        if not isinstance(v, Var):
            return b.full([1] * rank, v.item(), dtype)
        return b.reshape(v, (1,) * (rank - v.rank) + tuple(v.shape)) if v.rank < rank else v

    a, other = operand(input, ctx.dtype), operand(other, ctx.dtype)
    if tuple(np.broadcast_shapes(a.shape, other.shape)) != ctx.shape:
        a = _expand(b, ctx, a, ctx.shape)
    return b.op("select", cond=operand(condition, torch.bool), a=a, b=other)


def _matmul(b: _Mil, ctx: OpContext, input, mat2=None, other=None, **_):
    return b.op("matmul", x=input, y=mat2 if mat2 is not None else other)


def _addmm(b: _Mil, ctx: OpContext, input, mat1, mat2, beta=1, alpha=1, **_):
    product = b.op("matmul", x=mat1, y=mat2)
    if alpha != 1:
        product = b.op("mul", x=product, y=b.cast(alpha, ctx.dtype))
    bias = input if beta == 1 else b.op("mul", x=input, y=b.cast(beta, ctx.dtype))
    return b.op("add", x=bias, y=product)


def _index(b: _Mil, ctx: OpContext, input, indices, **_):
    """Advanced indexing by tensors on the leading dims: one gather over the flattened dims."""
    count = len(indices)
    if any(i is None for i in indices):
        raise StageError(f"index.Tensor with a full slice among the indices is not translated (node {ctx.node.name})")
    sizes = input.shape[:count]
    flat = None
    for k, index in enumerate(indices):
        index = b.cast(index, "int32")
        wrapped = b.op("add", x=index, y=np.int32(sizes[k]))
        index = b.op("select", cond=b.op("less", x=index, y=np.int32(0)), a=wrapped, b=index)
        stride = int(np.prod(sizes[k + 1:], dtype=np.int64))
        term = b.op("mul", x=index, y=np.int32(stride)) if stride != 1 else index
        flat = term if flat is None else b.op("add", x=flat, y=term)
    table = b.reshape(input, (int(np.prod(sizes)), *input.shape[count:]))
    return b.op("gather", x=table, indices=flat, axis=0)


def _softmax_backward(b: _Mil, ctx: OpContext, grad_output, output, dim, **_):
    summed = b.op("reduce_sum", x=b.op("mul", x=grad_output, y=output), axes=_axes(dim, output.rank), keep_dims=True)
    return b.op("mul", x=output, y=b.op("sub", x=grad_output, y=summed))


def _log_softmax(b: _Mil, ctx: OpContext, input, dim, **_):
    lse = b.op("reduce_log_sum_exp", x=input, axes=_axes(dim, input.rank), keep_dims=True)
    return b.op("sub", x=input, y=lse)


def _log_softmax_backward(b: _Mil, ctx: OpContext, grad_output, output, dim, **_):
    summed = b.op("reduce_sum", x=grad_output, axes=_axes(dim, output.rank), keep_dims=True)
    return b.op("sub", x=grad_output, y=b.op("mul", x=b.op("exp", x=output), y=summed))


def _silu_backward(b: _Mil, ctx: OpContext, grad_output, input, **_):
    s = b.op("sigmoid", x=input)
    one_minus = b.op("sub", x=np.float32(1), y=s)
    inner = b.op("add", x=np.float32(1), y=b.op("mul", x=input, y=one_minus))
    return b.op("mul", x=grad_output, y=b.op("mul", x=s, y=inner))


_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)
_GELU_KAPPA = 0.044715


def _gelu(b: _Mil, ctx: OpContext, input, approximate="none", **_):
    return b.op("gelu", x=input, mode="TANH_APPROXIMATION" if approximate == "tanh" else "EXACT")


def _gelu_backward(b: _Mil, ctx: OpContext, grad_output, input, approximate="none", **_):
    # The derivatives torch's own gelu_backward decomposition computes.
    f = np.float32
    x = input
    x2 = b.op("mul", x=x, y=x)
    if approximate == "tanh":
        cube = b.op("mul", x=x2, y=x)
        inner = b.op("mul", x=b.op("add", x=x, y=b.op("mul", x=cube, y=f(_GELU_KAPPA))), y=f(_SQRT_2_OVER_PI))
        th = b.op("tanh", x=inner)
        left = b.op("mul", x=b.op("add", x=th, y=f(1)), y=f(0.5))
        sech2 = b.op("sub", x=f(1), y=b.op("mul", x=th, y=th))
        slope = b.op("mul", x=b.op("add", x=b.op("mul", x=x2, y=f(3 * _GELU_KAPPA)), y=f(1)), y=f(_SQRT_2_OVER_PI))
        right = b.op("mul", x=b.op("mul", x=b.op("mul", x=x, y=f(0.5)), y=sech2), y=slope)
        return b.op("mul", x=grad_output, y=b.op("add", x=left, y=right))
    cdf = b.op("mul", x=b.op("add", x=b.op("erf", x=b.op("mul", x=x, y=f(1 / math.sqrt(2)))), y=f(1)), y=f(0.5))
    pdf = b.op("mul", x=b.op("exp", x=b.op("mul", x=x2, y=f(-0.5))), y=f(1 / math.sqrt(2 * math.pi)))
    return b.op("mul", x=grad_output, y=b.op("add", x=cdf, y=b.op("mul", x=x, y=pdf)))


def _nll_parts(b: _Mil, target, weight, reduction, ignore_index) -> tuple[Var, Var]:
    if weight is not None:
        raise StageError("nll_loss with class weights is not translated (the captured LM loss has none)")
    if reduction not in (0, 1, 2):
        raise StageError(f"nll_loss reduction {reduction} is unknown")
    target = b.cast(target, "int32")
    keep = b.op("not_equal", x=target, y=np.int32(ignore_index))
    safe = b.op("select", cond=keep, a=target, b=b.full(target.shape, 0, "int32"))
    return keep, safe


def _nll_loss_forward(b: _Mil, ctx: OpContext, input, target, weight, reduction, ignore_index, **_):
    # input [N, C] log-probabilities, target [N] class indices (ignore_index skipped).
    keep, safe = _nll_parts(b, target, weight, reduction, ignore_index)
    picked = b.op("gather_along_axis", x=input, indices=b.op("expand_dims", x=safe, axes=[-1]), axis=-1)
    picked = b.reshape(picked, safe.shape)
    mask = b.cast(keep, b.dtype_of(input))
    losses = b.op("mul", x=b.op("mul", x=picked, y=mask), y=np.float32(-1))
    total_weight = b.op("reduce_sum", x=mask, keep_dims=False)
    if reduction == 0:
        return losses, b.full((), 0, b.dtype_of(input))
    total = b.op("reduce_sum", x=losses, keep_dims=False)
    return (b.op("real_div", x=total, y=total_weight) if reduction == 1 else total), total_weight


def _nll_loss_backward(b: _Mil, ctx: OpContext, grad_output, input, target, weight, reduction, ignore_index,
                       total_weight, **_):
    keep, safe = _nll_parts(b, target, weight, reduction, ignore_index)
    classes = b.const(np.arange(input.shape[-1], dtype=np.int32))
    hit = b.op("equal", x=b.op("expand_dims", x=safe, axes=[-1]), y=classes)
    hit = b.op("logical_and", x=hit, y=b.op("expand_dims", x=keep, axes=[-1]))
    scale = b.op("real_div", x=grad_output, y=total_weight) if reduction == 1 else grad_output
    if reduction == 0:
        scale = b.op("expand_dims", x=scale, axes=[-1])
    return b.op("mul", x=b.cast(hit, b.dtype_of(input)), y=b.op("mul", x=scale, y=np.float32(-1)))


def _dequantize_rows(b: _Mil, packed: Var, scales: Var) -> Var:
    """Mirrors passes.quantize.dequantize_int4: two signed 4-bit values per byte, low nibble first."""
    low = b.op("mod", x=packed, y=np.int32(16))
    high = b.op("floor_div", x=packed, y=np.int32(16))
    rows, groups = packed.shape[0], scales.shape[1]
    q = b.reshape(b.op("stack", values=[low, high], axis=-1), (rows, -1))
    q = b.op("select", cond=b.op("greater", x=q, y=np.int32(7)), a=b.op("sub", x=q, y=np.int32(16)), b=q)
    q = b.reshape(b.cast(q, b.dtype_of(scales)), (rows, groups, -1))
    return b.reshape(b.op("mul", x=q, y=b.op("expand_dims", x=scales, axes=[-1])), (rows, -1))


def _dequantize_int4(b: _Mil, ctx: OpContext, packed, scales, **_):
    return _dequantize_rows(b, b.cast(packed, "int32"), scales)


def _dequantize_int4_rows(b: _Mil, ctx: OpContext, packed, scales, start, end, **_):
    def rows(x: Var) -> Var:
        return b.op("slice_by_index", x=x, begin=np.array([start, 0], dtype=np.int32),
                    end=np.array([end, x.shape[1]], dtype=np.int32))

    return _dequantize_rows(b, rows(b.cast(packed, "int32")), rows(scales))


def _embedding_int4(b: _Mil, ctx: OpContext, packed, scales, indices, **_):
    flat = b.reshape(b.cast(indices, "int32"), (-1,))
    packed_rows = b.op("gather", x=b.cast(packed, "int32"), indices=flat, axis=0)
    scale_rows = b.op("gather", x=scales, indices=flat, axis=0)
    return b.reshape(_dequantize_rows(b, packed_rows, scale_rows), ctx.shape)


#: 2**(e - 25) per fp16 exponent field e (2**-24 for the subnormals), as passes.gguf_blocks has it.
_HALF_POWERS = np.array([2.0 ** -24] + [2.0 ** (e - 25) for e in range(1, 32)], dtype=np.float32)


def _half_to_float(b: _Mil, low: Var, high: Var) -> Var:
    """An fp16 from its two bytes (int32), exact: the value passes.gguf_blocks.half_to_float
    gives (there by table lookup)."""
    exponent = b.op("mod", x=b.op("floor_div", x=high, y=np.int32(4)), y=np.int32(32))
    mantissa = b.op("add", x=b.op("mul", x=b.op("mod", x=high, y=np.int32(4)), y=np.int32(256)), y=low)
    mantissa = b.cast(mantissa, "fp32")
    significand = b.op("select", cond=b.op("greater", x=exponent, y=np.int32(0)),
                       a=b.op("add", x=mantissa, y=np.float32(1024)), b=mantissa)
    magnitude = b.op("mul", x=significand, y=b.op("gather", x=b.const(_HALF_POWERS), indices=exponent, axis=0))
    special = b.op("select", cond=b.op("equal", x=mantissa, y=np.float32(0)),
                   a=b.full(mantissa.shape, np.inf, "fp32"), b=b.full(mantissa.shape, np.nan, "fp32"))
    magnitude = b.op("select", cond=b.op("equal", x=exponent, y=np.int32(31)), a=special, b=magnitude)
    return b.op("select", cond=b.op("greater_equal", x=high, y=np.int32(128)),
                a=b.op("mul", x=magnitude, y=np.float32(-1)), b=magnitude)


def _decode_gguf(b: _Mil, blocks: Var, kind: str) -> Var:
    """Mirrors passes.gguf_blocks' decode: the fp32 weight of Q4_1 or Q8_0 blocks, in gguf-py's order."""
    rows, width = blocks.shape
    size = BLOCK_BYTES[kind]
    cells = b.reshape(b.cast(blocks, "int32"), (rows, width // size, size))

    def byte_range(start: int, end: int) -> Var:
        return b.op("slice_by_index", x=cells, begin=np.array([0, 0, start], dtype=np.int32),
                    end=np.array([rows, width // size, end], dtype=np.int32))

    scale = _half_to_float(b, byte_range(0, 1), byte_range(1, 2))
    if kind == "q8_0":
        codes = b.cast(byte_range(2, size), "fp32")
        codes = b.op("select", cond=b.op("greater_equal", x=codes, y=np.float32(128)),
                     a=b.op("sub", x=codes, y=np.float32(256)), b=codes)
        return b.reshape(b.op("mul", x=codes, y=scale), (rows, -1))
    minimum = _half_to_float(b, byte_range(2, 3), byte_range(3, 4))
    codes = byte_range(4, size)
    codes = b.op("concat", values=[b.op("mod", x=codes, y=np.int32(16)), b.op("floor_div", x=codes, y=np.int32(16))],
                 axis=-1)
    weight = b.op("add", x=b.op("mul", x=b.cast(codes, "fp32"), y=scale), y=minimum)
    return b.reshape(weight, (rows, -1))


def _dequantize_gguf(b: _Mil, ctx: OpContext, blocks, kind, dtype=torch.float32, **_):
    return _decode_gguf(b, blocks, kind)


def _dequantize_gguf_rows(b: _Mil, ctx: OpContext, blocks, kind, start, end, dtype=torch.float32, **_):
    rows = b.op("slice_by_index", x=blocks, begin=np.array([start, 0], dtype=np.int32),
                end=np.array([end, blocks.shape[1]], dtype=np.int32))
    return _decode_gguf(b, rows, kind)


def _embedding_gguf(b: _Mil, ctx: OpContext, blocks, kind, indices, dtype=torch.float32, **_):
    flat = b.reshape(b.cast(indices, "int32"), (-1,))
    rows = b.op("gather", x=b.cast(blocks, "int32"), indices=flat, axis=0)
    return b.reshape(_decode_gguf(b, rows, kind), ctx.shape)


def _identity(b: _Mil, ctx: OpContext, input, **_):
    return input


_RULES: dict[object, Callable] = {
    # views and copies
    aten.view.default: _view,
    aten._unsafe_view.default: _view,
    aten.reshape.default: _view,
    aten.squeeze.dim: _view,
    aten.squeeze.dims: _view,
    aten.unsqueeze.default: _view,
    aten.t.default: _t,
    aten.transpose.int: _transpose,
    aten.permute.default: _permute,
    aten.expand.default: _expand,
    aten.slice.Tensor: _slice,
    aten.select.int: _select,
    aten.alias.default: _identity,
    aten.detach.default: _identity,
    aten.clone.default: _identity,
    aten.lift_fresh_copy.default: _identity,
    aten._to_copy.default: _identity,  # the dtype cast is applied to every result
    # creation (shapes are static, so these are constants)
    aten.arange.default: lambda b, ctx, end, **_: _arange(b, ctx, 0, end),
    aten.arange.start: lambda b, ctx, start, end, **_: _arange(b, ctx, start, end),
    aten.arange.start_step: lambda b, ctx, start, end, step, **_: _arange(b, ctx, start, end, step),
    aten.zeros.default: _creation(value=0),
    aten.ones.default: _creation(value=1),
    aten.full.default: _creation("fill_value"),
    aten.scalar_tensor.default: _creation("s"),
    aten.new_zeros.default: _creation(value=0),
    aten.new_ones.default: _creation(value=1),
    aten.new_full.default: _creation("fill_value"),
    aten.zeros_like.default: _creation(value=0),
    aten.ones_like.default: _creation(value=1),
    aten.full_like.default: _creation("fill_value"),
    # arithmetic
    aten.add.Tensor: _binary("add"),
    aten.add.Scalar: _binary("add"),
    aten.sub.Tensor: _binary("sub"),
    aten.sub.Scalar: _binary("sub"),
    aten.mul.Tensor: _binary("mul"),
    aten.mul.Scalar: _binary("mul"),
    aten.div.Tensor: _binary("real_div", compute="result"),
    aten.div.Scalar: _binary("real_div", compute="result"),
    aten.neg.default: lambda b, ctx, input, **_: b.op("mul", x=input, y=b.cast(-1, ctx.dtype)),
    aten.pow.Tensor_Scalar: _pow,
    aten.rsqrt.default: _unary("rsqrt", epsilon=0.0),
    aten.sqrt.default: _unary("sqrt"),
    aten.exp.default: _unary("exp"),
    aten.log.default: _unary("log", epsilon=0.0),
    aten.sin.default: _unary("sin"),
    aten.cos.default: _unary("cos"),
    aten.tanh.default: _unary("tanh"),
    aten.sigmoid.default: _unary("sigmoid"),
    aten.where.self: _where,
    aten.maximum.default: _binary("maximum"),
    aten.minimum.default: _binary("minimum"),
    aten.clamp.default: _clamp,
    aten.clamp_min.default: lambda b, ctx, input, min, **_: _clamp(b, ctx, input, min=min),
    aten.clamp_max.default: lambda b, ctx, input, max, **_: _clamp(b, ctx, input, max=max),
    # comparison and logic
    aten.eq.Tensor: _binary("equal"),
    aten.eq.Scalar: _binary("equal"),
    aten.ne.Tensor: _binary("not_equal"),
    aten.ne.Scalar: _binary("not_equal"),
    aten.lt.Tensor: _binary("less"),
    aten.lt.Scalar: _binary("less"),
    aten.le.Tensor: _binary("less_equal"),
    aten.le.Scalar: _binary("less_equal"),
    aten.gt.Tensor: _binary("greater"),
    aten.gt.Scalar: _binary("greater"),
    aten.ge.Tensor: _binary("greater_equal"),
    aten.ge.Scalar: _binary("greater_equal"),
    aten.bitwise_and.Tensor: _logical("logical_and"),
    aten.bitwise_or.Tensor: _logical("logical_or"),
    aten.logical_and.default: _logical("logical_and"),
    aten.logical_or.default: _logical("logical_or"),
    aten.logical_not.default: lambda b, ctx, input, **_: b.op("logical_not", x=b.cast(input, torch.bool)),
    # reductions
    aten.sum.default: _reduce("reduce_sum"),
    aten.sum.dim_IntList: _reduce("reduce_sum"),
    aten.mean.dim: _reduce("reduce_mean"),
    aten.amax.default: _reduce("reduce_max"),
    aten.cumsum.default: lambda b, ctx, input, dim, **_: b.op("cumsum", x=b.cast(input, ctx.dtype), axis=dim),
    # linear algebra
    aten.mm.default: _matmul,
    aten.bmm.default: _matmul,
    aten.matmul.default: _matmul,
    aten.addmm.default: _addmm,
    # indexing and shape
    aten.embedding.default: lambda b, ctx, weight, indices, **_: b.op(
        "gather", x=weight, indices=b.cast(indices, "int32"), axis=0
    ),
    aten.index.Tensor: _index,
    aten.index_select.default: lambda b, ctx, input, dim, index, **_: b.op(
        "gather", x=input, indices=b.cast(index, "int32"), axis=dim
    ),
    aten.gather.default: _gather,
    aten.cat.default: lambda b, ctx, tensors, dim=0, **_: b.op(
        "concat", values=[b.cast(t, ctx.dtype) for t in tensors], axis=dim
    ),
    aten.stack.default: lambda b, ctx, tensors, dim=0, **_: b.op(
        "stack", values=[b.cast(t, ctx.dtype) for t in tensors], axis=dim
    ),
    aten.constant_pad_nd.default: _constant_pad_nd,
    aten.slice_backward.default: _slice_backward,
    # nn
    aten._softmax.default: lambda b, ctx, input, dim, **_: b.op("softmax", x=input, axis=dim),
    aten._log_softmax.default: _log_softmax,
    aten.silu.default: _unary("silu"),
    aten.gelu.default: _gelu,
    # backward
    aten._softmax_backward_data.default: _softmax_backward,
    aten._log_softmax_backward_data.default: _log_softmax_backward,
    aten.silu_backward.default: _silu_backward,
    aten.gelu_backward.default: _gelu_backward,
    aten.nll_loss_forward.default: _nll_loss_forward,
    aten.nll_loss_backward.default: _nll_loss_backward,
    # INT4 frozen weights (passes.quantize)
    quantize.dequantize_int4: _dequantize_int4,
    quantize.dequantize_int4_rows: _dequantize_int4_rows,
    quantize.embedding_int4: _embedding_int4,
    quantize.dequantize_gguf: _dequantize_gguf,
    quantize.dequantize_gguf_rows: _dequantize_gguf_rows,
    quantize.embedding_gguf: _embedding_gguf,
}


def supported_ops() -> list[str]:
    """Names of the ops this target translates."""
    return sorted(rule_name(op) for op in _RULES)


# ---------------------------------------------------------------- a whole artifact directory


class StageCheckFailed(ValueError):
    """A stage package failed `check_stage`; the message names it and the report file."""


def verify_artifacts(partition: Any, directory: pathlib.Path, arrays: dict[str, np.ndarray], *,
                     tol: float = 1e-5, progress: bool = True) -> dict:
    """Check every package of an artifact directory against its partition's torch stage.

    Each distinct stage is checked (`check_stage`) on the inputs its first stage really gets
    when the stages run in torch by the manifest on `arrays` (frozen weights, LoRA
    parameters and a batch, by source name). Writes the results to `CHECK_REPORT` in
    `directory` (per artifact: the stages it serves, ok, problems, worst error relative to
    max(1, output scale), MIL op count, check seconds) and returns them; raises
    StageCheckFailed after writing the report if any check fails.
    """
    import time

    from tqdm.auto import tqdm

    from mebp_compiler.files import atomic_write_json
    from mebp_compiler.targets.artifacts import recorded_stage_inputs

    directory = pathlib.Path(directory)
    inputs = recorded_stage_inputs(partition, arrays)
    artifacts = {}
    for signature, stage in tqdm(partition.unique_stages().items(), desc="check coreml", unit="stage",
                                 disable=not progress, dynamic_ncols=True):
        start = time.perf_counter()
        example = [torch.from_numpy(np.require(a, requirements="W")) for a in inputs[signature]]
        check = check_stage(directory / stage.spec.artifact, stage.module, example, tol=tol)
        artifacts[stage.spec.artifact] = {
            "stages": [s.spec.name for s in partition.stages if s.spec.signature == signature],
            "ok": check.ok, "problems": check.problems, "deployment_target": check.deployment_target,
            "worst_relative_error": max((e / max(1.0, s) for e, s in zip(check.max_error, check.scale)), default=0.0),
            "max_error": check.max_error, "scale": check.scale, "mil_ops": sum(check.package_ops.values()),
            "check_s": time.perf_counter() - start,
        }
    report = {"target": NAME, "precision": "fp32", "tolerance": tol,
              "method": "MIL value inference of the saved program vs. the torch stage, on the values the "
                        "stage gets when the manifest's stages run in torch",
              "ok": all(a["ok"] for a in artifacts.values()), "artifacts": artifacts}
    atomic_write_json(directory / CHECK_REPORT, report)
    failed = [f"{name}: {'; '.join(a['problems'])}" for name, a in artifacts.items() if not a["ok"]]
    if failed:
        raise StageCheckFailed(f"{len(failed)} of {len(artifacts)} CoreML stage packages failed their check "
                               f"(details in {directory / CHECK_REPORT}): {failed[0]}")
    return report
