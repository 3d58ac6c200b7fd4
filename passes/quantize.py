"""INT4 frozen weights, dequantized just before each use (MeBP's compressed base weights).

Each 2-D frozen weight (linear layers and the embedding, tied LM head included) is stored
as symmetric 4-bit integers with one scale per group of `group_size` consecutive input
features: q = clamp(round(w / s), -8, 7) with s = max|w| / 7 over the group. MeBP and its
follow-up MeSP store the base model in 4 bits; 64 is the group size MeSP reports for its
Qwen2.5 runs (the default here; 32 halves the quantization error for twice the scales).

The rewritten graph takes the packed weights (two 4-bit values per byte) and their scales
as inputs instead of the float weight, and every op that read the weight reads a fresh
`dequantize_int4` node placed right before it, dropped after that op: at any moment only
the weights in use are held in float, the rest stays at 4 bits. An embedding lookup
decompresses only the rows it gathers (`embedding_int4`), and a slice of rows (a
vocabulary slice of the LM head, see `mebp_compiler.sliced_loss`) only those rows
(`dequantize_int4_rows`).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mebp_compiler.ir import InputSpec, Phase, Role, TensorInfo, TrainingGraph

DEFAULT_GROUP_SIZE = 64


class WeightFileError(ValueError):
    """The INT4 weight file is missing, corrupt, truncated or does not match the graph."""


def quantize_int4(weight: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT4 with per-group scales: (packed uint8 [rows, cols / 2], scales fp32 [rows, cols / group])."""
    rows, cols = weight.shape
    groups = weight.detach().float().reshape(rows, cols // group_size, group_size)
    scales = groups.abs().amax(dim=-1).clamp_min(torch.finfo(torch.float32).tiny) / 7
    q = torch.clamp(torch.round(groups / scales[..., None]), -8, 7).to(torch.int8).reshape(rows, cols)
    nibbles = (q & 0x0F).to(torch.uint8)
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4), scales


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Graph op: the float weight [rows, cols] of `quantize_int4`'s output.

    Works in int8 until the one float allocation, scaled in place, so the op's scratch
    memory is about a quarter of its output rather than a second float copy.
    """
    signed = packed.view(torch.int8)
    low = torch.bitwise_right_shift(torch.bitwise_left_shift(signed, 4), 4)  # arithmetic: sign-extends
    high = torch.bitwise_right_shift(signed, 4)
    rows, groups = scales.shape
    weight = torch.stack((low, high), dim=-1).reshape(rows, -1).to(scales.dtype)
    weight.view(rows, groups, -1).mul_(scales[..., None])
    return weight


def embedding_int4(packed: torch.Tensor, scales: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Graph op: `embedding(dequantize_int4(packed, scales), indices)`, decompressing only the rows looked up."""
    flat = indices.reshape(-1)
    rows = dequantize_int4(packed.index_select(0, flat), scales.index_select(0, flat))
    return rows.reshape(*indices.shape, rows.shape[-1])


def dequantize_int4_rows(packed: torch.Tensor, scales: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Graph op: rows [start, end) of `dequantize_int4(packed, scales)`, decompressing only those rows."""
    return dequantize_int4(packed[start:end], scales[start:end])


def _row_slice(node: fx.Node) -> tuple[fx.Node, int, int] | None:
    """(weight, start, end) when `node` is a plain slice of rows `weight[start:end]`."""
    if node.target != torch.ops.aten.slice.Tensor:
        return None
    weight, dim, start, end, step = (*node.args, *[None] * (5 - len(node.args)))[:5]
    rows = weight.meta["val"].shape[0]
    if dim != 0 or step not in (None, 1) or start is None or end is None:
        return None
    return weight, max(start, 0), min(end, rows)


@dataclass(frozen=True)
class QuantizedWeights:
    """INT4 weights as graph inputs, by input source name (`<weight>.qweight`, `<weight>.scales`).

    `mapped` weights were read back from their file by `load`: their tensors are views of
    the memory-mapped file (clean, file-backed pages), not memory the process allocated.
    """

    tensors: dict[str, torch.Tensor]
    group_size: int
    mapped: bool = False

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def save(self, path: str | os.PathLike) -> Path:
        """Write one safetensors file (atomically: a temporary file renamed over the target)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(self.tensors, str(tmp), metadata={"format": "mebp-int4", "group_size": str(self.group_size)})
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> QuantizedWeights:
        """Memory-map the file; a corrupt or truncated one raises WeightFileError before any compute.

        safetensors maps the file and hands out tensors over the mapping, so the weights
        stay on flash until an op reads them, as MeBP's memory-mapped weights do.
        """
        try:
            with safe_open(str(path), framework="pt") as weight_file:
                tensors = {name: weight_file.get_tensor(name) for name in weight_file.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightFileError(f"cannot read INT4 weights from {path}: {exc}; quantize the model again") from exc
        group_sizes = {t.shape[1] * 2 // s.shape[1] for n, t in tensors.items() if n.endswith(".qweight")
                       for s in [tensors.get(n.removesuffix(".qweight") + ".scales")] if s is not None}
        if len(group_sizes) != 1 or len(tensors) % 2:
            raise WeightFileError(f"{path} does not hold matching INT4 weights and scales; quantize again")
        return cls(tensors, group_sizes.pop(), mapped=True)

    def mapped_copy(self, directory: str | os.PathLike | None = None) -> QuantizedWeights:
        """These weights written to a file in `directory` (default: the system's temporary one) and mapped back.

        The file is unlinked at once: the mapping keeps its pages readable, and nothing is
        left on disk when the process ends.
        """
        handle, name = tempfile.mkstemp(prefix="mebp-int4-", suffix=".safetensors", dir=directory)
        os.close(handle)
        try:
            self.save(name)
            return self.load(name)
        finally:
            os.unlink(name)


def quantizable(weight: torch.Tensor, group_size: int) -> bool:
    return weight.dim() == 2 and weight.is_floating_point() and weight.shape[1] % group_size == 0


def quantize_model_weights(model: torch.nn.Module, graph: TrainingGraph,
                           group_size: int = DEFAULT_GROUP_SIZE) -> QuantizedWeights:
    """INT4 copies of every quantizable frozen weight the graph takes as input."""
    params = dict(model.named_parameters())
    tensors = {}
    for spec in graph.inputs:
        weight = params.get(spec.source)
        if spec.role == Role.FROZEN and weight is not None and quantizable(weight, group_size):
            tensors[f"{spec.source}.qweight"], tensors[f"{spec.source}.scales"] = quantize_int4(weight, group_size)
    return QuantizedWeights(tensors, group_size)


def release_float_weights(model: torch.nn.Module, weights: QuantizedWeights) -> int:
    """Drop the model's float copies of the weights `weights` holds in INT4; return the bytes released.

    A plan compiled with INT4 weights reads only the INT4 file for them, so the float
    copies are dead weight in a process that trains with the plan (on a phone they never
    exist). Afterwards the model can no longer run eagerly; LoRA parameters, norms and
    other unquantized tensors stay, so training and saving the adapter still work.
    """
    params = dict(model.named_parameters())
    released = 0
    for name in weights.tensors:
        if name.endswith(".qweight"):
            param = params[name.removesuffix(".qweight")]
            released += param.numel() * param.element_size()
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)
    return released


def rewrite_int4(graph: TrainingGraph, weights: QuantizedWeights) -> TrainingGraph:
    """Replace each quantized weight input by its INT4 inputs and a dequantize node before every use.

    The INT4 inputs have role MAPPED when `weights` are memory-mapped from their file (not
    held), else FROZEN. A backward use of a weight reads the forward's decompressed copy,
    so that keeping it (resident from forward to backward) or recomputing it (reading
    and decompressing it again) is a scheduling decision like any other.
    """
    input_role = Role.MAPPED if weights.mapped else Role.FROZEN
    new_graph = fx.Graph()
    remap: dict[fx.Node, fx.Node] = {}
    info: dict[str, TensorInfo] = {}
    inputs: list[InputSpec] = []
    quantized: dict[fx.Node, tuple[fx.Node, fx.Node]] = {}
    forward_dequant: dict[fx.Node, fx.Node] = {}  # weight -> its forward decompression
    for node in graph.module.graph.nodes:
        if node.op != "placeholder":
            continue
        spec = next(s for s in graph.inputs if s.name == node.name)
        if f"{spec.source}.qweight" in weights.tensors:
            pair = []
            for suffix in ("qweight", "scales"):
                tensor = weights.tensors[f"{spec.source}.{suffix}"]
                placeholder = new_graph.placeholder(f"{node.name}_{suffix}")
                placeholder.meta["val"] = tensor
                inputs.append(InputSpec(placeholder.name, input_role, f"{spec.source}.{suffix}"))
                info[placeholder.name] = TensorInfo(input_role, Phase.INPUT, tuple(tensor.shape),
                                                    str(tensor.dtype).removeprefix("torch."),
                                                    (tensor.numel() * tensor.element_size(),), (None,))
                pair.append(placeholder)
            quantized[node] = tuple(pair)
        else:
            remap[node] = new_graph.node_copy(node)
            inputs.append(dataclasses.replace(spec, name=remap[node].name))
            info[remap[node].name] = graph.info[node.name]
    for node in graph.module.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            new_graph.output(fx.node.map_arg(node.args[0], lambda a: remap[a]))
            continue
        ti = graph.info[node.name]

        # padding_idx and the other embedding arguments only shape the weight's gradient,
        # and a quantized weight is frozen: the lookup's value is a plain row gather.
        weight = node.args[0] if node.target == torch.ops.aten.embedding.default else None
        if weight in quantized:
            remap[node] = new_graph.create_node("call_function", embedding_int4,
                                                (*quantized[weight], remap[node.args[1]]), name=node.name)
            remap[node].meta = dict(node.meta)
            info[remap[node].name] = ti
            continue

        row_slice = _row_slice(node)
        if row_slice is not None and row_slice[0] in quantized:
            weight, start, end = row_slice
            remap[node] = new_graph.create_node("call_function", dequantize_int4_rows,
                                                (*quantized[weight], start, end), name=node.name)
            remap[node].meta = dict(node.meta)
            rows = node.meta["val"]
            info[remap[node].name] = dataclasses.replace(
                ti, role=Role.DEQUANTIZED, output_nbytes=(rows.numel() * rows.element_size(),),
                output_alias=(None,), flops=3 * rows.numel())
            continue

        def arg(a: fx.Node, ti=ti) -> fx.Node:
            if a not in quantized:
                return remap[a]
            if ti.phase == Phase.BACKWARD and a in forward_dequant:
                return forward_dequant[a]
            packed, scales = quantized[a]
            dequant = new_graph.create_node("call_function", dequantize_int4, (packed, scales),
                                            name=f"dequant_{a.name}")
            dequant.meta["val"] = a.meta["val"]
            weight_info = graph.info[a.name]
            info[dequant.name] = dataclasses.replace(
                weight_info, role=Role.DEQUANTIZED, phase=ti.phase, block=ti.block, module=ti.module,
                flops=3 * a.meta["val"].numel(),
            )
            if ti.phase == Phase.FORWARD:
                forward_dequant[a] = dequant
            return dequant

        remap[node] = new_graph.node_copy(node, arg)
        info[remap[node].name] = ti
    module = fx.GraphModule(graph.module, new_graph)
    return graph.replace(module=module, info=info, inputs=inputs,
                         meta={**graph.meta, "int4_group_size": weights.group_size})
