"""MLX target: a stage's ATen ops translated to `mlx.core` and written as an `.mlxfn` file.

`export_stage` traces the translation with `mx.export_function` on the stage's example
inputs, so the file holds MLX's own graph with fixed shapes: MLX-Swift loads it on iOS
(`ImportedFunction`) and `mx.import_function` runs it here (`load_stage`). Frozen
weights, LoRA parameters and activations are all function inputs; only small constants
the graph itself holds are baked in.

Translated ops (every op the captured training step of tiny Llama, Qwen2 and Gemma-3
configs and SmolLM2-135M contains, as `mebp_compiler.capture` traces it without
decomposition, plus a few close relatives and the INT4 dequantization ops):

    views and copies   view, _unsafe_view, reshape, t, transpose.int, permute, expand,
                       squeeze.dim, squeeze.dims, unsqueeze, slice.Tensor, select.int,
                       alias, detach, clone, _to_copy, lift_fresh_copy
    creation           arange (3 overloads), zeros, ones, full, scalar_tensor, new_zeros,
                       new_ones, new_full, zeros_like, ones_like, full_like
    arithmetic         add/sub (Tensor, Scalar; alpha), rsub.Scalar, mul/div (Tensor, Scalar),
                       neg, abs, reciprocal, pow (Tensor_Scalar, Tensor_Tensor, Scalar),
                       rsqrt, sqrt, exp, log, sin, cos, tanh, sigmoid, where.self
    comparison, logic  eq, ne, lt, le, gt, ge (Tensor, Scalar), bitwise_and/or.Tensor,
                       logical_and, logical_or, logical_not, bitwise_not, maximum, minimum,
                       clamp, clamp_min, clamp_max
    reductions         sum.default, sum.dim_IntList, mean.dim, amax, all.default, cumsum
    linear algebra     mm, bmm, addmm, matmul
    indexing, shape    embedding, index.Tensor, index_select, gather, cat, stack,
                       constant_pad_nd, slice_backward
    nn                 _softmax, _log_softmax, silu, gelu (none / tanh)
    backward           _softmax_backward_data, _log_softmax_backward_data, silu_backward,
                       gelu_backward, nll_loss_forward, nll_loss_backward,
                       embedding_dense_backward (a trained embedding: `modules_to_save`)
    INT4 weights       passes.quantize.dequantize_int4, dequantize_int4_rows, embedding_int4
    GGUF blocks        passes.gguf_blocks.dequantize_gguf, dequantize_gguf_rows, embedding_gguf
                       (Q4_1 / Q8_0 decoded with integer ops, fp16 scales from their bytes)

Any other op raises `UnsupportedStageOpError` naming it. Each op's result is cast to the
dtype torch gives it (from the trace) and its shape is checked against the trace, so a
translation that drifts from ATen's semantics fails at export, not on the phone.

Each op of an exported stage runs after the op before it in the stage graph (`mx.depends`
edges, `_PlanOrder`), the order whose live bytes the plan priced; MLX's own order held every
vocabulary slice's logits at once.

Limits: shapes are fixed at export (one file per stage shape); numpy cannot hold
bfloat16, so `load_stage` takes and returns float16/float32/int/bool arrays only.
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Callable

import numpy as np
import torch
import torch.fx as fx

from mebp_compiler.files import atomic_write
from mebp_compiler.passes import quantize
from mebp_compiler.passes.gguf_blocks import BLOCK_BYTES
from mebp_compiler.targets.fx_stage import (
    OpContext,
    StageError,
    ensure_values,
    output_signature,
    rule_name,
    stage_placeholders,
    translate,
)

try:
    import mlx.core as mx
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the MLX target needs the 'mlx' package: pip install 'mebp-compiler[mlx]' "
        "(on Linux this installs mlx[cpu])"
    ) from error

aten = torch.ops.aten
SUFFIX = ".mlxfn"
NAME = "mlx"

_DTYPES = {
    torch.float32: mx.float32,
    torch.float16: mx.float16,
    torch.bfloat16: mx.bfloat16,
    torch.int64: mx.int64,
    torch.int32: mx.int32,
    torch.int16: mx.int16,
    torch.int8: mx.int8,
    torch.uint8: mx.uint8,
    torch.bool: mx.bool_,
}


def mx_dtype(dtype: torch.dtype) -> mx.Dtype:
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise StageError(f"the MLX target has no dtype for {dtype}") from None


def export_stage(stage: fx.GraphModule, example_inputs: list[torch.Tensor], path: pathlib.Path) -> pathlib.Path:
    """Write `stage` as an MLX function file (`.mlxfn`) for inputs shaped like `example_inputs`.

    The file is written atomically; `path` gets the `.mlxfn` suffix if it lacks it. The
    function takes the stage inputs in placeholder order and returns the stage outputs
    in order. Raises UnsupportedStageOpError for an op without a translation.
    """
    ensure_values(stage, example_inputs)
    path = pathlib.Path(path)
    if path.suffix != SUFFIX:
        path = path.with_name(path.name + SUFFIX)
    fn = stage_function(stage)
    args = [_to_mx(x) for x in example_inputs]
    signature = {
        "inputs": [[list(x.shape), _dtype_name(x.dtype)] for x in example_inputs],
        "outputs": [[list(s.shape), _dtype_name(s.dtype)] for s in output_signature(stage)],
    }

    def write(tmp: pathlib.Path) -> None:
        tmp.unlink(missing_ok=True)  # mx.export_function does not overwrite
        mx.export_function(str(tmp), fn, *args, metadata=json.dumps(signature))

    return atomic_write(path, write)


def stage_function(stage: fx.GraphModule, in_plan_order: bool = True) -> Callable[..., tuple[mx.array, ...]]:
    """The stage as a Python function over MLX arrays (what `export_stage` traces).

    With `in_plan_order` every op runs after the op before it in the stage graph, the order
    whose live bytes the plan priced (`_PlanOrder`); without it MLX picks its own order."""
    n_inputs = len(stage_placeholders(stage))

    def run(*inputs: mx.array) -> tuple[mx.array, ...]:
        if len(inputs) != n_inputs:
            raise StageError(f"the stage takes {n_inputs} inputs, got {len(inputs)}")
        if not in_plan_order:
            return tuple(translate(stage, inputs, RULES, "mlx", _to_mx, _finish))
        order = _PlanOrder()
        return tuple(translate(stage, inputs, order.rules(RULES), "mlx", _to_mx, order.finish))

    return run


class _PlanOrder:
    """Chains a stage's ops in graph order with `mx.depends` edges, one per op.

    An `.mlxfn` is one lazy graph that MLX evaluates in its own (depth-first) order, not in
    the op order the liveness pass priced: on SmolLM2's loss over 64 vocabulary slices, which
    keeps a log-sum-exp chain and a target-logit chain, MLX finished the first chain over all
    slices before starting the second, so every slice's logits were live at once. Here the
    first array argument of each op is made to depend on the previous op's result (a
    `Depends` node shares its input's buffer: no copy), so MLX can evaluate an op only after
    every op before it, and frees each value after its last use as the plan does. Values are
    unchanged; ops without array arguments (creation) stay unchained."""

    def __init__(self) -> None:
        self.previous: mx.array | None = None

    def rules(self, rules: dict[object, Callable]) -> dict[object, Callable]:
        return {op: self._after_previous(rule) for op, rule in rules.items()}

    def finish(self, ctx: OpContext, value):
        value = _finish(ctx, value)
        self.previous = value[0] if isinstance(value, tuple) else value
        return value

    def _after_previous(self, rule: Callable) -> Callable:
        def ordered(ctx: OpContext, **args):
            if self.previous is not None:
                args = self._chain_first_array(args)
            return rule(ctx, **args)

        return ordered

    def _chain_first_array(self, args: dict) -> dict:
        for name, value in args.items():
            if isinstance(value, mx.array):
                return {**args, name: mx.depends([value], [self.previous])[0]}
            if isinstance(value, (list, tuple)):
                for k, item in enumerate(value):
                    if isinstance(item, mx.array):
                        chained = list(value)
                        chained[k] = mx.depends([item], [self.previous])[0]
                        return {**args, name: type(value)(chained)}
        return args


def describe_stage(path: pathlib.Path) -> tuple[list[tuple[list[int], str]], list[tuple[list[int], str]]]:
    """(inputs, outputs) of an `.mlxfn` stage as ([shape], dtype name) pairs, from the signature
    `export_stage` stores in the file's metadata (the imported function itself refuses inputs
    of other shapes or dtypes, but MLX does not expose its signature). Runs nothing."""
    path = pathlib.Path(path)
    _, metadata = mx.import_function(str(path), return_metadata=True)
    try:
        signature = json.loads(metadata)
        return ([(list(shape), dtype) for shape, dtype in signature["inputs"]],
                [(list(shape), dtype) for shape, dtype in signature["outputs"]])
    except (ValueError, KeyError, TypeError):
        raise StageError(f"{path.name} has no stage signature in its metadata; export it again with "
                         "targets.mlx.export_stage") from None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def load_stage(path: pathlib.Path) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
    """Load an `.mlxfn` stage: a function from the input arrays (in order) to the output arrays."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no MLX stage file at {path}; export it with targets.mlx.export_stage")
    imported = mx.import_function(str(path))

    def run(inputs: list[np.ndarray]) -> list[np.ndarray]:
        outputs = imported([mx.array(np.asarray(x)) for x in inputs])
        return [np.array(y) for y in outputs]

    return run


def _to_mx(x: torch.Tensor) -> mx.array:
    x = x.detach().cpu()
    if x.dtype == torch.bfloat16:
        return mx.array(x.float().numpy()).astype(mx.bfloat16)
    return mx.array(x.numpy())


def _finish(ctx: OpContext, value):
    if isinstance(value, tuple):
        return value
    if value.dtype != mx_dtype(ctx.dtype):
        value = value.astype(mx_dtype(ctx.dtype))
    if tuple(value.shape) != ctx.shape:
        raise AssertionError(
            f"MLX translation of {ctx.node.name} ({ctx.node.target}) gave shape {tuple(value.shape)}, "
            f"torch gives {ctx.shape}"
        )
    return value


# ---------------------------------------------------------------- translation rules
# Each rule takes the OpContext and the op's arguments by ATen schema name.


def _as(x, dtype: torch.dtype):
    """`x` (array or Python scalar) in the dtype torch computes in."""
    return x.astype(mx_dtype(dtype)) if isinstance(x, mx.array) else x


def _binary(fn: Callable) -> Callable:
    def rule(ctx: OpContext, input, other, alpha=1, **_):
        dtype = ctx.promoted("input", "other")
        if alpha != 1:
            other = other * alpha
        return fn(_as(input, dtype), _as(other, dtype))

    return rule


def _compare(fn: Callable) -> Callable:
    def rule(ctx: OpContext, input, other, **_):
        dtype = ctx.promoted("input", "other")
        return fn(_as(input, dtype), _as(other, dtype))

    return rule


def _unary(fn: Callable) -> Callable:
    return lambda ctx, input, **_: fn(_as(input, ctx.dtype))


def _dims(dim, ndim: int) -> list[int] | None:
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return None
    dims = [dim] if isinstance(dim, int) else list(dim)
    return [d % ndim if ndim else 0 for d in dims]


def _reduce(fn: Callable) -> Callable:
    def rule(ctx: OpContext, input, dim=None, keepdim=False, dtype=None, **_):
        axes = _dims(dim, input.ndim)
        return fn(_as(input, ctx.dtype), axis=axes, keepdims=keepdim)

    return rule


#: Elements summed per block by `_sum`: MLX's CPU float32 sum accumulates sequentially
#: (measured: 9e-5 relative error over a 49152-wide vocabulary row, against 9e-7 when
#: summed in blocks of 256), which over a loss's log-softmax costs ~1e-4 of the gradients.
SUM_BLOCK = 256


def _sum(x: mx.array, axis=None, keepdims: bool = False) -> mx.array:
    """`mx.sum` of a float array summed in blocks of `SUM_BLOCK` (two-level, pairwise-like), so
    its rounding error grows with the number of blocks, not of elements. Exact for ints."""
    axes = list(range(x.ndim)) if axis is None else [a % x.ndim for a in ([axis] if isinstance(axis, int) else axis)]
    count = math.prod(x.shape[a] for a in axes)
    if not mx.issubdtype(x.dtype, mx.floating) or count <= SUM_BLOCK:
        return mx.sum(x, axis=axes, keepdims=keepdims)
    kept = [a for a in range(x.ndim) if a not in axes]
    flat = mx.transpose(x, kept + axes).reshape(*[x.shape[a] for a in kept], count)
    blocks = -(-count // SUM_BLOCK)
    if blocks * SUM_BLOCK != count:
        flat = mx.pad(flat, [(0, 0)] * len(kept) + [(0, blocks * SUM_BLOCK - count)])
    partial = mx.sum(flat.reshape(*flat.shape[:-1], blocks, SUM_BLOCK), axis=-1)
    total = _sum(partial, axis=-1)
    if keepdims:
        total = total.reshape([1 if a in axes else x.shape[a] for a in range(x.ndim)])
    return total


def _mean(x: mx.array, axis=None, keepdims: bool = False) -> mx.array:
    axes = list(range(x.ndim)) if axis is None else ([axis] if isinstance(axis, int) else axis)
    return _sum(x, axis=axes, keepdims=keepdims) / math.prod(x.shape[a] for a in axes)


#: Length of the contraction (K) blocks `_matmul` multiplies separately: the mlx wheel's
#: reference BLAS accumulates a long K with an error that grows with K (measured on SmolLM2's
#: lm_head backward, [16, 49152] @ [49152, 576]: 2.3e-4 of the largest output entry away
#: from float64, torch's mm 1.6e-6, in blocks of 256 1.3e-6), which carried through the 30
#: blocks' backward drifted the LoRA gradients to ~1e-4 of the largest. Up to K = 2048 it is
#: within 2.0e-6 (torch 3.2e-7; OpenBLAS, what `mebp-native` binds, 5.5e-7 at any K), and
#: splitting a block's K of 576-1536 made its matmuls 1.6-2x as slow on OpenBLAS (strided
#: slices copied, partial sums added): docs/native.md, "Where the seconds go". One call also
#: holds only its output, where the running sum holds the sum and a block's product (Qwen2.5-0.5B's
#: block backward [256 x 896] @ [896 x 4864] held 10.0 MiB above its inputs in blocks of 256).
MATMUL_BLOCK = 2048


def _matmul(a: mx.array, b: mx.array) -> mx.array:
    """`a @ b` (matmul broadcasting) with the contraction in blocks of `MATMUL_BLOCK`: one
    product per block, accumulated block by block. A running sum rather than a balanced tree
    of the products because MLX then evaluates few blocks at once (measured on [128, 49152]
    @ [49152, 576]: 7.5 MiB above the inputs, the tree 26.5 MiB, mx.matmul 0.3 MiB; MLX
    copies each column slice of `a`) at the same accuracy. Each block's product waits for
    the sum before it (`mx.depends`, no copy): MLX otherwise computed every block's product
    (and its operands' copies) before the first add, e.g. 16.9 MiB above the inputs for a
    0.9 MiB [256 x 896] = [256 x 4864] @ [4864 x 896] in 19 blocks of 256, 3.1 MiB chained, with
    every kernel waited for; the same products and sums, so the same values."""
    k = a.shape[-1]
    if k <= MATMUL_BLOCK or min(a.ndim, b.ndim) < 2 or not mx.issubdtype(a.dtype, mx.floating):
        return mx.matmul(a, b)
    total = mx.matmul(a[..., :MATMUL_BLOCK], b[..., :MATMUL_BLOCK, :])
    for start in range(MATMUL_BLOCK, k, MATMUL_BLOCK):
        block = mx.depends([a[..., start:start + MATMUL_BLOCK]], [total])[0]
        total = total + mx.matmul(block, b[..., start:start + MATMUL_BLOCK, :])
    return total


def _addmm(ctx, input, mat1, mat2, beta=1, alpha=1, **_):
    product = _matmul(mat1, mat2)
    if alpha != 1:
        product = alpha * product
    if beta == 0:  # as in torch, `input` is then ignored (even NaN)
        return mx.broadcast_to(product, ctx.shape)
    return (input if beta == 1 else beta * input) + product


def _full(ctx: OpContext, value) -> mx.array:
    return mx.full(ctx.shape, value, dtype=mx_dtype(ctx.dtype))


def _slice_index(ndim: int, dim: int, index) -> tuple:
    return (slice(None),) * (dim % ndim) + (index,)


def _clamped(size: int, start, end, step) -> slice:
    """A slice with ATen's out-of-range bounds (e.g. end = 2**63 - 1) clamped to `size`."""
    return slice(*slice(start, end, step).indices(size))


def _slice(ctx, input, dim=0, start=None, end=None, step=1, **_):
    return input[_slice_index(input.ndim, dim, _clamped(input.shape[dim], start, end, step))]


def _slice_backward(ctx, grad_output, input_sizes, dim, start, end, step, **_):
    out = mx.zeros(tuple(input_sizes), dtype=grad_output.dtype)
    out[_slice_index(len(input_sizes), dim, _clamped(input_sizes[dim], start, end, step))] = grad_output
    return out


def _embedding_dense_backward(ctx, grad_output, indices, num_weights, padding_idx, scale_grad_by_freq, **_):
    """ATen's embedding backward: each token's gradient row added into its row of the table
    (scatter-add, as `embedding_dense_backward` sums repeated tokens); none for `padding_idx`
    (-1: no padding row). The rows a trained embedding (`modules_to_save`) gets."""
    if scale_grad_by_freq:
        raise StageError("the MLX target translates embedding backward without scale_grad_by_freq; "
                         "build the embedding with scale_grad_by_freq=False")
    width = grad_output.shape[-1]
    rows = mx.reshape(grad_output, (-1, width))
    tokens = mx.reshape(indices, (-1,))
    if padding_idx >= 0:
        rows = mx.where(mx.expand_dims(tokens == padding_idx, 1), mx.zeros_like(rows), rows)
    return mx.zeros((num_weights, width), dtype=grad_output.dtype).at[tokens].add(rows)


def _expand(ctx, input, size, **_):
    return mx.broadcast_to(input, ctx.shape)


def _squeeze(ctx, input, dim=None, **_):
    return mx.reshape(input, ctx.shape)


def _transpose(ctx, input, dim0, dim1, **_):
    return mx.swapaxes(input, dim0, dim1)


def _t(ctx, input, **_):
    return input.T if input.ndim == 2 else input


def _exp(x: mx.array) -> mx.array:
    """e**x as `mx.power(e, x)`: MLX's CPU `exp` (its own polynomial, not vectorized on x86) took
    6-8x as long on [256 x 1536] float32, and the power was the closer to float64's exp (max
    relative error 6.6e-7 against 9.8e-7 on [-20, 20]; docs/native.md, "Where the seconds go")."""
    return mx.power(math.e, x)


def _pow_scalar(ctx, input, exponent, **_):
    """x**exponent with ATen's own special cases for exponents 1 and 2 (`pow_tensor_scalar_optimized_kernel`:
    x, x * x): torch's values bit for bit (MLX's `power` of 2 differed in the last bit on 0.07%
    of normal samples) and a multiply's time, not std::pow's per element (RMSNorm's square and
    its backward's x**1)."""
    x = _as(input, ctx.dtype)
    if exponent == 1:
        return x
    if exponent == 2:
        return x * x
    return mx.power(x, exponent)


def _sigmoid(x: mx.array) -> mx.array:
    return 1 / (1 + _exp(-x))


def _softmax(ctx, input, dim, half_to_float=False, **_):
    exps = _exp(input - mx.max(input, axis=dim, keepdims=True))
    return exps / _sum(exps, axis=dim, keepdims=True)


def _log_softmax(ctx, input, dim, half_to_float=False, **_):
    shifted = input - mx.max(input, axis=dim, keepdims=True)
    return shifted - mx.log(_sum(_exp(shifted), axis=dim, keepdims=True))


def _softmax_backward(ctx, grad_output, output, dim, input_dtype, **_):
    return output * (grad_output - _sum(grad_output * output, axis=dim, keepdims=True))


def _log_softmax_backward(ctx, grad_output, output, dim, input_dtype, **_):
    return grad_output - _exp(output) * _sum(grad_output, axis=dim, keepdims=True)


def _silu_backward(ctx, grad_output, input, **_):
    s = _sigmoid(input)
    return grad_output * s * (1 + input * (1 - s))


_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)
_GELU_KAPPA = 0.044715


def _gelu(ctx, input, approximate="none", **_):
    x = input
    if approximate == "tanh":
        return 0.5 * x * (1 + mx.tanh(_SQRT_2_OVER_PI * (x + _GELU_KAPPA * x * x * x)))
    return 0.5 * x * (1 + mx.erf(x / math.sqrt(2)))


def _gelu_backward(ctx, grad_output, input, approximate="none", **_):
    # The derivatives torch's own gelu_backward decomposition computes.
    x = input
    if approximate == "tanh":
        inner_tanh = mx.tanh(_SQRT_2_OVER_PI * (x + _GELU_KAPPA * x * x * x))
        left_derivative = 0.5 * (1 + inner_tanh)
        right_derivative = 0.5 * x * (1 - inner_tanh * inner_tanh) * _SQRT_2_OVER_PI * (1 + 3 * _GELU_KAPPA * x * x)
        return grad_output * (left_derivative + right_derivative)
    cdf = 0.5 * (1 + mx.erf(x / math.sqrt(2)))
    pdf = mx.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    return grad_output * (cdf + x * pdf)


def _nll_check(weight, reduction):
    if weight is not None:
        raise StageError("nll_loss with class weights is not translated (the captured LM loss has none)")
    if reduction not in (0, 1, 2):
        raise StageError(f"nll_loss reduction {reduction} is unknown")


def _nll_loss_forward(ctx, input, target, weight, reduction, ignore_index, **_):
    # input [N, C] log-probabilities (or [C]), target [N] class indices.
    _nll_check(weight, reduction)
    keep = target != ignore_index
    safe = mx.where(keep, target, 0)
    picked = mx.take_along_axis(input, mx.expand_dims(safe, -1), axis=-1).squeeze(-1)
    losses = mx.where(keep, -picked, 0.0).astype(input.dtype)
    total_weight = mx.sum(keep).astype(input.dtype)
    if reduction == 0:
        return losses, mx.zeros((), dtype=input.dtype)
    total = _sum(losses)
    return (total / total_weight if reduction == 1 else total), total_weight


def _nll_loss_backward(ctx, grad_output, input, target, weight, reduction, ignore_index, total_weight, **_):
    _nll_check(weight, reduction)
    keep = target != ignore_index
    classes = mx.arange(input.shape[-1], dtype=target.dtype)
    one_hot = (mx.expand_dims(target, -1) == classes) & mx.expand_dims(keep, -1)
    scale = grad_output / total_weight if reduction == 1 else grad_output
    if reduction == 0:
        scale = mx.expand_dims(scale, -1)
    return mx.where(one_hot, -scale, 0.0).astype(input.dtype)


def _index(ctx, input, indices, **_):
    return input[tuple(slice(None) if i is None else i for i in indices)]


def _constant_pad_nd(ctx, input, pad, value=0, **_):
    # pad lists (before, after) pairs from the last dim backwards; negative pads crop.
    widths = [[0, 0] for _ in range(input.ndim)]
    for k in range(0, len(pad), 2):
        widths[input.ndim - 1 - k // 2] = [pad[k], pad[k + 1]]
    crop = tuple(slice(-min(b, 0) or None, min(a, 0) or None) for b, a in widths)
    padded = mx.pad(input[crop], [(max(b, 0), max(a, 0)) for b, a in widths], constant_values=value)
    return padded


def _repeat_index(node: fx.Node) -> int:
    """How many earlier ops of `node`'s stage compute the same op on the same arguments."""
    count = 0
    for other in node.graph.nodes:
        if other is node:
            return count
        count += other.target is node.target and other.args == node.args and other.kwargs == node.kwargs
    return count


def _distinct(x: mx.array, ctx) -> mx.array:
    """`x`, made structurally distinct per repeat of the same decode in a stage, for free (a
    reshape of a contiguous array is a view). MLX's export merges equal subgraphs: the
    plan decodes a weight once per use (passes.quantize), and two decodes of it in one stage
    (a recomputed forward and the backward) became one, held from the first use to the last
    - on SmolLM2's head over 64 vocabulary slices every slice's decoded rows at once (113 MiB)."""
    for _ in range(_repeat_index(ctx.node)):
        x = x.reshape(-1).reshape(x.shape)
    return x


def _dequantize_int4(ctx, packed, scales, **_):
    # Mirrors passes.quantize.dequantize_int4: two signed 4-bit values per byte, low nibble first.
    # Sign-extended by int8 arithmetic shifts (low: << 4 then >> 4); MLX's CPU `where` and its int8
    # scalar comparisons made the nibble-then-where form 18x slower (docs/native.md, "Seconds").
    packed = _distinct(packed, ctx)
    if _read_transposed_by_matmuls(ctx.node):
        return _decode_int4_columns(packed, scales).T
    signed = packed.astype(mx.int8)
    q = mx.stack([(signed << 4) >> 4, signed >> 4], axis=-1).reshape(packed.shape[0], -1).astype(scales.dtype)
    groups = scales.shape[1]
    return (q.reshape(q.shape[0], groups, -1) * mx.expand_dims(scales, -1)).reshape(q.shape)


def _decode_int4_columns(packed: mx.array, scales: mx.array) -> mx.array:
    """The transpose of `_dequantize_int4`'s [rows, columns] result, [columns, rows] and
    contiguous: the same integer ops and products, in the layout a matmul reading the weight
    transposed (`x @ W.t()`) takes its contraction blocks from without copying them. In the
    rows layout each block of `W.t()` is strided and MLX copies it: 4.75 MiB per block of a
    Qwen2.5-0.5B MLP weight."""
    signed = packed.T.astype(mx.int8)
    q = mx.stack([(signed << 4) >> 4, signed >> 4], axis=1).reshape(-1, packed.shape[0]).astype(scales.dtype)
    groups = scales.shape[1]
    return (q.reshape(groups, -1, q.shape[1]) * mx.expand_dims(scales.T, 1)).reshape(q.shape)


def _read_transposed_by_matmuls(node: fx.Node) -> bool:
    """Whether every use of `node` is `node.t()` as the right operand of an mm (a linear layer)."""
    def right_operand(t: fx.Node) -> bool:
        return bool(t.users) and all(u.target is torch.ops.aten.mm.default and u.args[1] is t
                                     and u.args[0] is not t for u in t.users)

    return bool(node.users) and all(u.target is torch.ops.aten.t.default and right_operand(u) for u in node.users)


def _dequantize_int4_rows(ctx, packed, scales, start, end, **_):
    return _dequantize_int4(ctx, packed[start:end], scales[start:end])


def _embedding_int4(ctx, packed, scales, indices, **_):
    flat = indices.reshape(-1)
    rows = _dequantize_int4(ctx, mx.take(packed, flat, axis=0), mx.take(scales, flat, axis=0))
    return rows.reshape(*indices.shape, rows.shape[-1])


_HALF_POWERS = [2.0 ** -24] + [2.0 ** (e - 25) for e in range(1, 32)]


def _half_to_float(low: mx.array, high: mx.array) -> mx.array:
    """An fp16 from its two bytes, with integer ops (shifts and masks of the non-negative high
    byte) and exact products: the value passes.gguf_blocks.half_to_float gives (there by table
    lookup)."""
    high = high.astype(mx.int32)
    exponent = (high >> 2) & 31
    mantissa = (((high & 3) << 8) + low.astype(mx.int32)).astype(mx.float32)
    significand = mx.where(exponent > 0, mantissa + 1024, mantissa)
    magnitude = significand * mx.take(mx.array(_HALF_POWERS, dtype=mx.float32), exponent)
    magnitude = mx.where(exponent == 31, mx.where(mantissa == 0, math.inf, math.nan), magnitude)
    return mx.where(high >= 128, -magnitude, magnitude)


def _decode_gguf(blocks: mx.array, kind: str) -> mx.array:
    """Mirrors passes.gguf_blocks' decode: the fp32 weight of GGUF Q4_1 or Q8_0 blocks, in gguf-py's order."""
    rows = blocks.shape[0]
    cells = blocks.reshape(rows, -1, BLOCK_BYTES[kind])
    scale = _half_to_float(cells[..., 0:1], cells[..., 1:2])
    if kind == "q8_0":  # uint8 -> int8 wraps (two's complement): no float temporary for the sign
        return (cells[..., 2:].astype(mx.int8).astype(mx.float32) * scale).reshape(rows, -1)
    minimum = _half_to_float(cells[..., 2:3], cells[..., 3:4])
    codes = cells[..., 4:]
    # Shifts and masks, not `% 16` and `// 16`: the same bytes (codes are uint8), and MLX's CPU
    # uint8 remainder and floor division are scalar loops (7% of SmolLM2's GGUF step, `perf`).
    weight = mx.concatenate([codes & 15, codes >> 4], axis=-1).astype(mx.float32)
    return (weight * scale + minimum).reshape(rows, -1)


def _dequantize_gguf(ctx, blocks, kind, dtype=torch.float32, **_):
    return _decode_gguf(_distinct(blocks, ctx), kind).astype(mx_dtype(dtype))


def _dequantize_gguf_rows(ctx, blocks, kind, start, end, dtype=torch.float32, **_):
    return _dequantize_gguf(ctx, blocks[start:end], kind, dtype)


def _embedding_gguf(ctx, blocks, kind, indices, dtype=torch.float32, **_):
    flat = indices.reshape(-1)
    rows = _dequantize_gguf(ctx, mx.take(blocks, flat, axis=0), kind, dtype)
    return rows.reshape(*indices.shape, rows.shape[-1])


def _arange(ctx, start=0, end=None, step=1, **_):
    if end is None:
        start, end = 0, start
    return mx.arange(start, end, step, dtype=mx_dtype(ctx.dtype))


def _clamp(ctx, input, min=None, max=None, **_):
    x = _as(input, ctx.dtype)
    if min is not None:
        x = mx.maximum(x, _as(min, ctx.dtype))
    if max is not None:
        x = mx.minimum(x, _as(max, ctx.dtype))
    return x


def _identity(ctx, input, **_):
    return input


RULES: dict[object, Callable] = {
    # views and copies
    aten.view.default: lambda ctx, input, size, **_: mx.reshape(input, ctx.shape),
    aten._unsafe_view.default: lambda ctx, input, size, **_: mx.reshape(input, ctx.shape),
    aten.reshape.default: lambda ctx, input, shape, **_: mx.reshape(input, ctx.shape),
    aten.t.default: _t,
    aten.transpose.int: _transpose,
    aten.permute.default: lambda ctx, input, dims, **_: mx.transpose(input, [d % input.ndim for d in dims]),
    aten.expand.default: _expand,
    aten.squeeze.dim: _squeeze,
    aten.squeeze.dims: _squeeze,
    aten.unsqueeze.default: _squeeze,
    aten.slice.Tensor: _slice,
    aten.select.int: lambda ctx, input, dim, index, **_: input[_slice_index(input.ndim, dim, index)],
    aten.alias.default: _identity,
    aten.detach.default: _identity,
    aten.clone.default: _identity,
    aten.lift_fresh_copy.default: _identity,
    aten._to_copy.default: _identity,  # the dtype cast is applied to every result
    # creation
    aten.arange.default: lambda ctx, end, **_: _arange(ctx, 0, end),
    aten.arange.start: lambda ctx, start, end, **_: _arange(ctx, start, end),
    aten.arange.start_step: lambda ctx, start, end, step, **_: _arange(ctx, start, end, step),
    aten.zeros.default: lambda ctx, **_: _full(ctx, 0),
    aten.ones.default: lambda ctx, **_: _full(ctx, 1),
    aten.full.default: lambda ctx, size, fill_value, **_: _full(ctx, fill_value),
    aten.scalar_tensor.default: lambda ctx, s, **_: _full(ctx, s),
    aten.new_zeros.default: lambda ctx, input, size, **_: _full(ctx, 0),
    aten.new_ones.default: lambda ctx, input, size, **_: _full(ctx, 1),
    aten.new_full.default: lambda ctx, input, size, fill_value, **_: _full(ctx, fill_value),
    aten.zeros_like.default: lambda ctx, input, **_: _full(ctx, 0),
    aten.ones_like.default: lambda ctx, input, **_: _full(ctx, 1),
    aten.full_like.default: lambda ctx, input, fill_value, **_: _full(ctx, fill_value),
    # arithmetic
    aten.add.Tensor: _binary(mx.add),
    aten.add.Scalar: _binary(mx.add),
    aten.sub.Tensor: _binary(mx.subtract),
    aten.sub.Scalar: _binary(mx.subtract),
    aten.mul.Tensor: _binary(mx.multiply),
    aten.mul.Scalar: _binary(mx.multiply),
    aten.div.Tensor: _binary(mx.divide),
    aten.div.Scalar: _binary(mx.divide),
    aten.neg.default: _unary(mx.negative),
    aten.abs.default: _unary(mx.abs),
    aten.reciprocal.default: _unary(mx.reciprocal),
    aten.rsub.Scalar: lambda ctx, input, other, alpha=1, **_: _as(other, ctx.dtype) - _as(input, ctx.dtype) * alpha,
    aten.pow.Scalar: lambda ctx, input, exponent, **_: mx.power(_as(mx.array(input), ctx.dtype), _as(exponent, ctx.dtype)),
    aten.pow.Tensor_Scalar: _pow_scalar,
    aten.pow.Tensor_Tensor: _binary(mx.power),
    aten.rsqrt.default: _unary(mx.rsqrt),
    aten.sqrt.default: _unary(mx.sqrt),
    aten.exp.default: _unary(_exp),
    aten.log.default: _unary(mx.log),
    aten.sin.default: _unary(mx.sin),
    aten.cos.default: _unary(mx.cos),
    aten.tanh.default: _unary(mx.tanh),
    aten.sigmoid.default: _unary(_sigmoid),
    aten.where.self: lambda ctx, condition, input, other, **_: mx.where(
        condition, _as(input, ctx.dtype), _as(other, ctx.dtype)
    ),
    # comparison and logic
    aten.eq.Tensor: _compare(mx.equal),
    aten.eq.Scalar: _compare(mx.equal),
    aten.ne.Tensor: _compare(mx.not_equal),
    aten.ne.Scalar: _compare(mx.not_equal),
    aten.lt.Tensor: _compare(mx.less),
    aten.lt.Scalar: _compare(mx.less),
    aten.le.Tensor: _compare(mx.less_equal),
    aten.le.Scalar: _compare(mx.less_equal),
    aten.gt.Tensor: _compare(mx.greater),
    aten.gt.Scalar: _compare(mx.greater),
    aten.ge.Tensor: _compare(mx.greater_equal),
    aten.ge.Scalar: _compare(mx.greater_equal),
    aten.bitwise_and.Tensor: _binary(mx.bitwise_and),
    aten.bitwise_or.Tensor: _binary(mx.bitwise_or),
    aten.maximum.default: _binary(mx.maximum),
    aten.minimum.default: _binary(mx.minimum),
    aten.clamp.default: _clamp,
    aten.clamp_min.default: lambda ctx, input, min, **_: _clamp(ctx, input, min=min),
    aten.clamp_max.default: lambda ctx, input, max, **_: _clamp(ctx, input, max=max),
    aten.logical_and.default: lambda ctx, input, other, **_: mx.logical_and(input, other),
    aten.logical_or.default: lambda ctx, input, other, **_: mx.logical_or(input, other),
    aten.logical_not.default: lambda ctx, input, **_: mx.logical_not(input),
    aten.bitwise_not.default: lambda ctx, input, **_: (
        mx.logical_not(input) if input.dtype == mx.bool_ else mx.bitwise_invert(input)
    ),
    # reductions
    aten.sum.default: _reduce(_sum),
    aten.sum.dim_IntList: _reduce(_sum),
    aten.mean.dim: _reduce(_mean),
    aten.amax.default: _reduce(mx.max),
    aten.all.default: lambda ctx, input, **_: mx.all(input),
    aten.cumsum.default: lambda ctx, input, dim, **_: mx.cumsum(_as(input, ctx.dtype), axis=dim),
    # linear algebra
    aten.mm.default: lambda ctx, input, mat2, **_: _matmul(input, mat2),
    aten.bmm.default: lambda ctx, input, mat2, **_: _matmul(input, mat2),
    aten.matmul.default: lambda ctx, input, other, **_: _matmul(input, other),
    aten.addmm.default: _addmm,
    # indexing and shape
    aten.embedding.default: lambda ctx, weight, indices, **_: mx.take(weight, indices, axis=0),
    aten.index.Tensor: _index,
    aten.index_select.default: lambda ctx, input, dim, index, **_: mx.take(input, index, axis=dim),
    aten.gather.default: lambda ctx, input, dim, index, sparse_grad=False, **_: mx.take_along_axis(
        input, index, axis=dim),
    aten.cat.default: lambda ctx, tensors, dim=0, **_: mx.concatenate(
        [_as(t, ctx.dtype) for t in tensors], axis=dim
    ),
    aten.stack.default: lambda ctx, tensors, dim=0, **_: mx.stack([_as(t, ctx.dtype) for t in tensors], axis=dim),
    aten.constant_pad_nd.default: _constant_pad_nd,
    aten.slice_backward.default: _slice_backward,
    aten.embedding_dense_backward.default: _embedding_dense_backward,
    # nn
    aten._softmax.default: _softmax,
    aten._log_softmax.default: _log_softmax,
    aten.silu.default: lambda ctx, input, **_: input * _sigmoid(input),
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
    # a GGUF file's own Q4_1 / Q8_0 blocks (passes.gguf_blocks)
    quantize.dequantize_gguf: _dequantize_gguf,
    quantize.dequantize_gguf_rows: _dequantize_gguf_rows,
    quantize.embedding_gguf: _embedding_gguf,
}
"""ATen op (or graph function) -> MLX translation rule."""


def supported_ops() -> list[str]:
    """Names of the ops this target translates."""
    return sorted(rule_name(op) for op in RULES)
