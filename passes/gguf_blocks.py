"""A GGUF file's own quantized blocks as step inputs: SmolLM2's Q4_1 weights kept byte for byte.

llama.cpp's GGUF files store a 2-D weight as rows of blocks of 32 consecutive input
features (ggml's block formats; the arithmetic below follows gguf-py's `quants.py`):

    Q4_1  20 bytes: fp16 scale d, fp16 minimum m, 16 bytes of 4-bit codes q in 0..15
          (low nibbles hold features 0..15 of the block, high nibbles 16..31); w = d * q + m
    Q8_0  34 bytes: fp16 scale d, 32 signed 8-bit codes q; w = d * q

Re-quantizing such a file to the symmetric INT4 of `passes.quantize` would round weights
that were already rounded once. `read_gguf_blocks` instead copies each weight's blocks
as they are (the query and key projections of a Llama file only get their rows put back
in Hugging Face order, see `_unpermute_rows`), and the ops below decode a weight just
before an op reads it, as `passes.quantize` does for its INT4. They decode in fp32 with
gguf-py's order of operations, so a decoded weight equals, bit for bit, the float weight
transformers loads from the same file: a step over the blocks is exact to autograd on
the model as loaded. The decode reinterprets no bytes (ONNX cannot), so the ONNX target
exports these very ops (`targets/mlx.py` and `targets/coreml.py` mirror them), and a
driver only maps the blocks. A model loaded in bfloat16 or float16 (transformers decodes to fp32,
then casts) gets the decoded weight cast to its dtype the same way (`dtype=`).
"""

from __future__ import annotations

import os

import gguf
import numpy as np
import torch

#: Features per block and bytes per block of the GGUF formats kept as they are.
BLOCK_SIZE = 32
BLOCK_BYTES = {"q4_1": 20, "q8_0": 34}
_GGML_TYPES = {gguf.GGMLQuantizationType.Q4_1: "q4_1", gguf.GGMLQuantizationType.Q8_0: "q8_0"}


def dequantize_gguf(blocks: torch.Tensor, kind: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Graph op: the weight [rows, n_blocks * 32] of uint8 blocks [rows, n_blocks * BLOCK_BYTES[kind]],
    decoded in fp32 and cast to `dtype`."""
    return _decode(blocks, kind).to(dtype)


def _decode(blocks: torch.Tensor, kind: str) -> torch.Tensor:
    """The fp32 weight of `blocks`, in gguf-py's order of operations, from exact integer-valued steps.

    No byte reinterpretation (`view(dtype)`): ONNX has none, so the fp16 scales are decoded
    from their two bytes (`half_to_float`) and Q8_0's signed codes cast from their unsigned byte.
    Every step is exact (integers below 2**24 and products by powers of two in fp32) except
    gguf-py's own `d * q` and `+ m`, done in the same order, so the weight is its bit for bit.
    """
    rows = blocks.shape[0]
    cells = blocks.reshape(rows, -1, BLOCK_BYTES[kind])
    if kind == "q8_0":  # uint8 -> int8 wraps (two's complement), as in ONNX's Cast and MLX's astype
        scale = half_to_float(cells[..., 0:1], cells[..., 1:2])
        return cells[..., 2:].to(torch.int8).to(torch.float32).mul_(scale).reshape(rows, -1)
    scale_and_minimum = half_to_float(cells[..., 0:4:2], cells[..., 1:4:2])  # d's two bytes and m's, in one pass
    scale, minimum = scale_and_minimum[..., 0:1], scale_and_minimum[..., 1:2]
    # the nibbles in fp32, where byte // 16 and byte % 16 are exact (floor of a product by a power
    # of two): contiguous float passes, faster here than integer ops on the strided bytes
    codes = cells[..., 4:].to(torch.float32)
    high = codes.mul(1 / 16).floor_()
    low = codes.sub_(high, alpha=16)
    return torch.cat((low, high), dim=-1).mul_(scale).add_(minimum).reshape(rows, -1)


_HIGH_BYTE = np.arange(256)
_EXPONENT = _HIGH_BYTE // 4 % 32
#: For each value of an fp16's high byte: the significand's high part (1024 for a normal number,
#: none for a subnormal, plus 256 * its mantissa bits 8..9), as int32.
_SIGNIFICAND_HIGH = torch.tensor(np.where(_EXPONENT > 0, 1024, 0) + _HIGH_BYTE % 4 * 256, dtype=torch.int32)
#: For each value of the high byte: the sign times the significand's weight, 2**(e - 25) for the
#: exponent field e = 1..30, 2**-24 for e = 0 (the subnormals), infinity for e = 31.
_SIGNED_POWER = torch.tensor(np.where(_HIGH_BYTE >= 128, -1.0, 1.0)
                             * np.where(_EXPONENT == 31, np.inf, 2.0 ** (np.maximum(_EXPONENT, 1) - 25)),
                             dtype=torch.float32)


def half_to_float(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Graph-safe fp16 -> fp32: the IEEE half whose little-endian bytes are `low`, `high` (uint8 or int32), as fp32.

    sign = bit 7 of `high`, exponent e = its bits 2..6, mantissa = its bits 0..1 and `low`; the
    value is (1024 + mantissa) * 2**(e - 25), a subnormal's mantissa * 2**-24, and e = 31 is
    infinity (mantissa 0) or NaN, as numpy's `astype(float32)` of the half gives. The parts that
    depend on `high` alone are looked up in 256-entry tables. Every fp16 is exact in fp32 and
    each product is an integer below 2**11 times a signed power of two, so the result is the
    conversion's bit for bit (NaN payloads aside).
    """
    index = high.reshape(-1).long()  # index_select: the fast lookup here (a [index] is ~10x slower)
    significand = _SIGNIFICAND_HIGH.index_select(0, index).reshape(high.shape) + low.to(torch.int32)
    value = significand.to(torch.float32) * _SIGNED_POWER.index_select(0, index).reshape(high.shape)
    return torch.where((value.abs() == torch.inf) & (significand != 1024), torch.nan, value)


def dequantize_gguf_rows(blocks: torch.Tensor, kind: str, start: int, end: int,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Graph op: rows [start, end) of `dequantize_gguf(blocks, kind, dtype)`, decoding only those rows."""
    return dequantize_gguf(blocks[start:end], kind, dtype)


def embedding_gguf(blocks: torch.Tensor, kind: str, indices: torch.Tensor,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Graph op: `embedding(dequantize_gguf(blocks, kind, dtype), indices)`, decoding only the rows looked up."""
    rows = dequantize_gguf(blocks.index_select(0, indices.reshape(-1)), kind, dtype)
    return rows.reshape(*indices.shape, rows.shape[-1])


def _unpermute_rows(blocks: np.ndarray, heads: int) -> np.ndarray:
    """Undo the row order llama.cpp's converter gives a Llama query or key projection.

    The converter interleaves the two rotary halves of each head's rows (its `permute`,
    in convert_hf_to_gguf.py); transformers' GGUF loader reverses that on the float
    weight. Rows are whole blocks, so the same reordering applies to the block bytes.
    """
    rows = blocks.shape[0]
    per_half = rows // heads // 2
    return blocks.reshape(heads, per_half, 2, -1).swapaxes(1, 2).reshape(rows, -1)


def _hf_name(source: str) -> str:
    """A parameter name without PEFT's wrapping: `model.layers.0.self_attn.q_proj.weight`."""
    return source.removeprefix("base_model.model.").replace(".base_layer.", ".")


def read_gguf_blocks(path: str | os.PathLike, config, sources: list[str]) -> dict[str, tuple[str, torch.Tensor]]:
    """The blocks of each weight in `sources` that `path` stores as Q4_1 or Q8_0: {source: (kind, blocks)}.

    `sources` are parameter names of the model built from `config` (PEFT-wrapped or not);
    weights stored in another format are left out, for the caller to quantize itself.
    The blocks are copied out of the file (uint8, [rows, n_blocks * BLOCK_BYTES[kind]]).

    Raises:
        ValueError: the file cannot be read as GGUF.
    """
    try:
        reader = gguf.GGUFReader(os.fspath(path))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read GGUF blocks from {path}: {exc}") from exc
    architecture = reader.fields["general.architecture"].contents()
    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == architecture)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tensors = {t.name: t for t in reader.tensors}
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    blocks = {}
    for source in sources:
        gguf_name = names.get_name(_hf_name(source), try_suffixes=(".weight",))
        tensor = tensors.get(gguf_name)
        if tensor is None or tensor.tensor_type not in _GGML_TYPES:
            continue
        kind = _GGML_TYPES[tensor.tensor_type]
        data = np.asarray(tensor.data)
        if architecture == "llama" and gguf_name.split(".")[-2] in heads:
            data = _unpermute_rows(data, heads[gguf_name.split(".")[-2]])
        blocks[source] = (kind, torch.from_numpy(np.ascontiguousarray(data).copy()))
    return blocks


def decoded_shape(kind: str, blocks: torch.Tensor) -> tuple[int, int]:
    """(rows, features) of the weight `blocks` decode to."""
    return blocks.shape[0], blocks.shape[1] // BLOCK_BYTES[kind] * BLOCK_SIZE
