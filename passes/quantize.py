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

A model loaded from a GGUF file can keep that file's own blocks instead (SmolLM2's Q4_1,
its embedding's Q8_0; `passes.gguf_blocks`): `quantize_model_weights(..., gguf_file=...)`
copies them as they are and quantizes only the weights the file stores in another format.
The rewrite treats both encodings alike (`QuantizedWeights.encoding`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mebp_compiler.checksums import check_safetensors, placeholder_metadata, seal_safetensors
from mebp_compiler.files import atomic_write
from mebp_compiler.ir import InputSpec, Phase, Role, TensorInfo, TrainingGraph
from mebp_compiler.passes.gguf_blocks import (
    BLOCK_BYTES,
    decoded_shape,
    dequantize_gguf,
    dequantize_gguf_rows,
    embedding_gguf,
    read_gguf_blocks,
)

DEFAULT_GROUP_SIZE = 64


class WeightFileError(ValueError):
    """The INT4 weight file is missing, corrupt, truncated or does not match the graph."""


def quantize_int4(weight: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT4 with per-group scales: (packed uint8 [rows, cols / 2], scales [rows, cols / group]).

    The scales have the weight's dtype (float32, bfloat16 or float16), so `dequantize_int4`
    decodes straight to the model's dtype: a code (4 bits) times a scale (at most 24
    significant bits) is exact in float32, so decoding in the model's dtype rounds once, as
    decoding in float32 and casting would. The codes are chosen against the rounded scales;
    a scale too small for the dtype is raised to its least subnormal (tiny * eps).
    """
    rows, cols = weight.shape
    dtype = weight.dtype if weight.is_floating_point() else torch.float32
    groups = weight.detach().float().reshape(rows, cols // group_size, group_size)
    amax = groups.abs().amax(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
    scales = (amax / 7).to(dtype).clamp_min(torch.finfo(dtype).tiny * torch.finfo(dtype).eps)
    q = torch.clamp(torch.round(groups / scales.float()[..., None]), -8, 7).to(torch.int8).reshape(rows, cols)
    nibbles = (q & 0x0F).to(torch.uint8)
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4), scales


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Graph op: the float weight [rows, cols] of `quantize_int4`'s output.

    A 4-bit two's-complement code c (0..15) is the integer (c + 8) % 16 - 8. The codes
    stay in uint8 until the one float allocation, shifted and scaled in place, so the op's
    scratch memory is about a quarter of its output rather than a second float copy. Plain
    integer arithmetic only: ONNX has no bit reinterpretation (`view(dtype)`), and its
    exporter mistypes shifts of uint8.
    """
    codes = torch.stack((packed % 16, packed // 16), dim=-1)  # low nibble first
    codes.add_(8).remainder_(16)
    rows, groups = scales.shape
    weight = codes.reshape(rows, -1).to(scales.dtype).sub_(8)
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
class WeightEncoding:
    """How one quantized weight is stored and decoded.

    `tensor_names` are its entries in `QuantizedWeights.tensors`, the graph inputs its ops
    read first; `constants` follow them in every op's arguments (the GGUF block format), and
    `options` are every op's keyword arguments (the dtype GGUF blocks decode to).
    """

    tensor_names: tuple[str, ...]
    dequantize: Callable[..., torch.Tensor]  # (*tensors, *constants) -> weight
    dequantize_rows: Callable[..., torch.Tensor]  # (*tensors, *constants, start, end) -> rows
    embedding: Callable[..., torch.Tensor]  # (*tensors, *constants, indices) -> looked-up rows
    constants: tuple = ()
    options: dict = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class QuantizedWeights:
    """Quantized weights as graph inputs, by input source name.

    A weight is either symmetric INT4 (`<weight>.qweight`, `<weight>.scales`) or the
    blocks of a GGUF file (`<weight>.q4_1` or `<weight>.q8_0`, see `passes.gguf_blocks`);
    `group_size` is the INT4 group size (GGUF blocks always hold 32 features).

    `mapped` weights were read back from their file by `load`: their tensors are views of
    the memory-mapped file (clean, file-backed pages), not memory the process allocated.
    """

    tensors: dict[str, torch.Tensor]
    group_size: int
    mapped: bool = False

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def sources(self) -> list[str]:
        """The weights held, by source name."""
        return sorted({name.rsplit(".", 1)[0] for name in self.tensors})

    def encoding(self, source: str, dtype: torch.dtype = torch.float32) -> WeightEncoding | None:
        """How the weight `source`, of `dtype` in the model, is stored, or None when it is not quantized.

        Raises WeightFileError if its INT4 scales decode to another dtype (weights quantized
        from the model in another precision)."""
        if f"{source}.qweight" in self.tensors:
            scales = self.tensors[f"{source}.scales"].dtype
            if scales != dtype:
                raise WeightFileError(f"the INT4 weights of {source} decode to {scales}, but the model's weight is "
                                      f"{dtype}: quantize the model in the dtype it trains in (delete the weights "
                                      "file to quantize again)")
            return WeightEncoding((f"{source}.qweight", f"{source}.scales"),
                                  dequantize_int4, dequantize_int4_rows, embedding_int4)
        for kind in BLOCK_BYTES:
            if f"{source}.{kind}" in self.tensors:
                options = {} if dtype == torch.float32 else {"dtype": dtype}
                return WeightEncoding((f"{source}.{kind}",), dequantize_gguf, dequantize_gguf_rows,
                                      embedding_gguf, (kind,), options)
        return None

    def save(self, path: str | os.PathLike) -> Path:
        """Write one safetensors file, atomically, sealed with the SHA-256 of its bytes (`checksums`).

        Sealing reads the file once more after writing it."""
        metadata = {"format": "mebp-int4", "group_size": str(self.group_size), **placeholder_metadata()}

        def write(tmp: Path) -> None:
            save_file(self.tensors, str(tmp), metadata=metadata)
            seal_safetensors(tmp)

        return atomic_write(path, write)

    @classmethod
    def load(cls, path: str | os.PathLike, *, verify: bool = True) -> QuantizedWeights:
        """Memory-map the file; a corrupt or truncated one raises WeightFileError before any compute.

        safetensors maps the file and hands out tensors over the mapping, so the weights
        stay on flash until an op reads them, as MeBP's memory-mapped weights do. With
        `verify` the whole file is also read once, sequentially (through the page cache, not
        the mapping, so its pages do not count in the process's RSS), and its SHA-256 checked
        against the one `save` sealed it with: 0.4-1 s for a 265 MiB file (Qwen2.5-0.5B at
        INT4) on the 2-core development machine, quiet to loaded.
        """
        try:
            with safe_open(str(path), framework="pt") as weight_file:
                tensors = {name: weight_file.get_tensor(name) for name in weight_file.keys()}
                group_size = int((weight_file.metadata() or {}).get("group_size", 0))
            problem = check_safetensors(path) if verify else None
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightFileError(f"cannot read INT4 weights from {path}: {exc}; quantize the model again") from exc
        if problem is not None:
            raise WeightFileError(f"INT4 weights file {path}: {problem}; delete it and compile again")
        int4 = {n.rsplit(".", 1)[0] for n in tensors if n.rsplit(".", 1)[-1] in ("qweight", "scales")}
        blocks = [(n, t) for n, t in tensors.items() if n.rsplit(".", 1)[-1] in BLOCK_BYTES]
        group_sizes = {tensors[f"{w}.qweight"].shape[1] * 2 // tensors[f"{w}.scales"].shape[1] for w in int4
                       if f"{w}.qweight" in tensors and f"{w}.scales" in tensors}
        if (not group_size or group_sizes - {group_size} or 2 * len(int4) + len(blocks) != len(tensors)
                or any(t.shape[1] % BLOCK_BYTES[n.rsplit(".", 1)[-1]] for n, t in blocks)):
            raise WeightFileError(f"{path} does not hold matching quantized weights; quantize again")
        return cls(tensors, group_size, mapped=True)

    def mapped_copy(self, directory: str | os.PathLike | None = None) -> QuantizedWeights:
        """These weights written to a file in `directory` (default: the system's temporary one) and mapped back.

        The file is unlinked at once: the mapping keeps its pages readable, and nothing is
        left on disk when the process ends. It is not verified: this process wrote it a moment
        ago and no other process can open it once it is unlinked.
        """
        if directory is not None:
            Path(directory).mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix="mebp-int4-", suffix=".safetensors", dir=directory)
        os.close(handle)
        try:
            self.save(name)
            return self.load(name, verify=False)
        finally:
            os.unlink(name)


class GroupSizeError(ValueError):
    """An INT4 group size that does not divide the input features of every weight to quantize."""


def check_group_size(weights: Mapping[str, torch.Tensor], group_size: int) -> None:
    """Raise GroupSizeError unless `group_size` divides the input features (columns) of every 2-D weight.

    Every frozen 2-D weight is quantized (none silently stays float), so a group size that
    leaves a remainder is refused, naming the weights and the group sizes that would do.
    """
    widths = {name: w.shape[1] for name, w in weights.items() if w.dim() == 2 and w.is_floating_point()}
    left = sorted(name for name, width in widths.items() if width % group_size)
    if not left:
        return
    common = math.gcd(*widths.values())
    choices = [g for g in (16, 32, 64, 128) if common % g == 0] or [g for g in range(1, common + 1) if common % g == 0]
    raise GroupSizeError(
        f"INT4 group size {group_size} does not divide the {widths[left[0]]} input features of {left[0]}"
        + (f" (nor those of {len(left) - 1} more weight(s))" if len(left) > 1 else "")
        + f"; every frozen weight is quantized, so give a group size that divides them all: "
        f"{', '.join(map(str, choices))}")


def quantize_model_weights(model: torch.nn.Module, graph: TrainingGraph, group_size: int = DEFAULT_GROUP_SIZE,
                           gguf_file: str | os.PathLike | None = None) -> QuantizedWeights:
    """Quantized copies of every frozen 2-D float weight the graph takes as input.

    With `gguf_file` (the file `model` was loaded from) the weights it stores as Q4_1 or
    Q8_0 blocks keep those blocks; the others, and all without it, become symmetric INT4.

    Raises:
        GroupSizeError: `group_size` does not divide the input features of a weight to
            quantize (none stays float silently).
        WeightFileError: `gguf_file` cannot be read, or holds weights of other shapes
            than the model's (another model's file).
    """
    params = dict(model.named_parameters())
    frozen = [spec.source for spec in graph.inputs if spec.role == Role.FROZEN and spec.source in params
              and params[spec.source].dim() == 2 and params[spec.source].is_floating_point()]
    blocks = {}
    if gguf_file is not None:
        try:
            blocks = read_gguf_blocks(gguf_file, model.config, frozen)
        except ValueError as exc:
            raise WeightFileError(f"{exc}; pass the GGUF file the model was loaded from") from exc
    check_group_size({source: params[source] for source in frozen if source not in blocks}, group_size)
    tensors = {}
    for source in frozen:
        if source in blocks:
            kind, data = blocks[source]
            if decoded_shape(kind, data) != tuple(params[source].shape):
                raise WeightFileError(f"{gguf_file} stores {source} as {decoded_shape(kind, data)}, the model has "
                                      f"{tuple(params[source].shape)}; pass the GGUF file the model was loaded from")
            tensors[f"{source}.{kind}"] = data
        else:
            tensors[f"{source}.qweight"], tensors[f"{source}.scales"] = quantize_int4(params[source], group_size)
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
    for source in weights.sources:
        param = params[source]
        released += param.numel() * param.element_size()
        param.data = torch.empty(0, dtype=param.dtype, device=param.device)
    return released


def rewrite_int4(graph: TrainingGraph, weights: QuantizedWeights) -> TrainingGraph:
    """Replace each quantized weight input by its quantized inputs and a dequantize node before every use.

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
    quantized: dict[fx.Node, tuple[fx.Node, ...]] = {}  # weight -> (*its quantized inputs, *constants)
    encodings: dict[fx.Node, WeightEncoding] = {}
    forward_dequant: dict[fx.Node, fx.Node] = {}  # weight -> its forward decompression
    for node in graph.module.graph.nodes:
        if node.op != "placeholder":
            continue
        spec = next(s for s in graph.inputs if s.name == node.name)
        encoding = weights.encoding(spec.source, node.meta["val"].dtype)
        if encoding is not None:
            parts = []
            for tensor_name in encoding.tensor_names:
                tensor = weights.tensors[tensor_name]
                placeholder = new_graph.placeholder(f"{node.name}_{tensor_name.rsplit('.', 1)[-1]}")
                placeholder.meta["val"] = tensor
                inputs.append(InputSpec(placeholder.name, input_role, tensor_name))
                info[placeholder.name] = TensorInfo(input_role, Phase.INPUT, tuple(tensor.shape),
                                                    str(tensor.dtype).removeprefix("torch."),
                                                    (tensor.numel() * tensor.element_size(),), (None,))
                parts.append(placeholder)
            quantized[node] = (*parts, *encoding.constants)
            encodings[node] = encoding
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
            remap[node] = new_graph.create_node("call_function", encodings[weight].embedding,
                                                (*quantized[weight], remap[node.args[1]]),
                                                dict(encodings[weight].options), name=node.name)
            remap[node].meta = dict(node.meta)
            info[remap[node].name] = ti
            continue

        row_slice = _row_slice(node)
        if row_slice is not None and row_slice[0] in quantized:
            weight, start, end = row_slice
            remap[node] = new_graph.create_node("call_function", encodings[weight].dequantize_rows,
                                                (*quantized[weight], start, end), dict(encodings[weight].options),
                                                name=node.name)
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
            dequant = new_graph.create_node("call_function", encodings[a].dequantize, quantized[a],
                                            dict(encodings[a].options), name=f"dequant_{a.name}")
            dequant.meta["val"] = a.meta["val"]
            weight_info = graph.info[a.name]
            info[dequant.name] = dataclasses.replace(
                weight_info, role=Role.DEQUANTIZED, phase=ti.phase, block=ti.block, part=ti.part, module=ti.module,
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
