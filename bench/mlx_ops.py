"""Seconds per op class inside SmolLM2's exported stages, MLX's CPU backend against torch, one thread.

Each row runs one op of a SmolLM2-135M block or head stage at seq 256 (hidden 576, MLP 1536,
9 heads) in MLX as the MLX target exports it, and the same op in torch, and prints the best
of several runs in milliseconds. Rows marked "before" are the export's formulation before
docs/native.md's "Where the seconds go" fixes, so the table shows what each fix bought.

MLX's matmuls run on whatever `cblas_sgemm` this process binds: the mlx wheel's bundled
reference BLAS, or OpenBLAS as in `mebp-native` when the driver's forwarder is preloaded:

    LIB=$(python -c 'import scipy_openblas32 as s; print(s.get_lib_dir())')
    g++ -O2 -shared -fPIC -DMEBP_OPENBLAS targets/native/blas.cpp -o /tmp/libmebpblas.so \\
        -L$LIB -lscipy_openblas -Wl,-rpath,$LIB
    LD_PRELOAD=/tmp/libmebpblas.so python bench/mlx_ops.py
"""
from __future__ import annotations

import math
import time
from typing import Callable

import mlx.core as mx
import numpy as np
import torch

SEQ, HIDDEN, MLP, HEADS, HEAD_DIM, GROUP = 256, 576, 1536, 9, 64, 64


def best_seconds(fn: Callable[[], object], runs: int = 7) -> float:
    """The fastest of `runs` calls of `fn` (after one warm-up), in seconds."""
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def mlx_seconds(fn: Callable[[], mx.array]) -> float:
    return best_seconds(lambda: mx.eval(fn()))


def decode_before(packed: mx.array, scales: mx.array) -> mx.array:
    low, high = (packed & 0x0F).astype(mx.int8), (packed >> 4).astype(mx.int8)
    q = mx.stack([low, high], axis=-1).reshape(packed.shape[0], -1)
    q = mx.where(q > 7, q - 16, q).astype(mx.float32)
    return (q.reshape(q.shape[0], scales.shape[1], -1) * mx.expand_dims(scales, -1)).reshape(q.shape)


def decode_now(packed: mx.array, scales: mx.array) -> mx.array:
    signed = packed.astype(mx.int8)
    q = mx.stack([(signed << 4) >> 4, signed >> 4], axis=-1).reshape(packed.shape[0], -1).astype(mx.float32)
    return (q.reshape(q.shape[0], scales.shape[1], -1) * mx.expand_dims(scales, -1)).reshape(q.shape)


def decode_torch(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    low, high = (packed & 0x0F).to(torch.int8), (packed >> 4).to(torch.int8)
    q = torch.stack([low, high], -1).reshape(packed.shape[0], -1)
    q = torch.where(q > 7, q - 16, q).float()
    return (q.reshape(q.shape[0], scales.shape[1], -1) * scales.unsqueeze(-1)).reshape(q.shape)


def blocked_matmul(a: mx.array, b: mx.array, block: int) -> mx.array:
    """`a @ b` with the contraction in blocks of `block`, summed block by block (targets/mlx.py
    `_matmul`, whose block is now 2048: a block's K of 576-1536 is no longer split)."""
    total = mx.matmul(a[..., :block], b[..., :block, :])
    for start in range(block, a.shape[-1], block):
        total = total + mx.matmul(a[..., start:start + block], b[..., start:start + block, :])
    return total


def softmax_now(s: mx.array) -> mx.array:
    exps = mx.power(math.e, s - mx.max(s, axis=-1, keepdims=True))
    return exps / mx.sum(exps, axis=-1, keepdims=True)


def rows() -> list[tuple[str, Callable[[], float], Callable[[], float]]]:
    rng = np.random.default_rng(0)
    packed_np = rng.integers(0, 256, (MLP, HIDDEN // 2), dtype=np.uint8)
    scales_np = rng.random((MLP, HIDDEN // GROUP), dtype=np.float32)
    x_np = rng.standard_normal((SEQ, HIDDEN), dtype=np.float32)
    w_np = rng.standard_normal((MLP, HIDDEN), dtype=np.float32)
    g_np = rng.standard_normal((SEQ, MLP), dtype=np.float32)
    s_np = rng.standard_normal((HEADS, SEQ, SEQ), dtype=np.float32)
    q_np = rng.standard_normal((HEADS, SEQ, HEAD_DIM), dtype=np.float32)
    packed, scales, x, w, g, s, q = map(mx.array, (packed_np, scales_np, x_np, w_np, g_np, s_np, q_np))
    tpacked, tscales, tx, tw, tg, ts, tq = map(torch.from_numpy, (packed_np, scales_np, x_np, w_np, g_np, s_np, q_np))
    assert np.array_equal(np.array(decode_now(packed, scales)), decode_torch(tpacked, tscales).numpy())
    return [
        (f"matmul x @ W.T [{SEQ}x{HIDDEN}] x [{HIDDEN}x{MLP}]", lambda: mlx_seconds(lambda: x @ w.T),
         lambda: best_seconds(lambda: tx @ tw.T)),
        (f"matmul g @ W [{SEQ}x{MLP}] x [{MLP}x{HIDDEN}]", lambda: mlx_seconds(lambda: g @ w),
         lambda: best_seconds(lambda: tg @ tw)),
        (f"matmul x @ W.T, before (K in blocks of 256)", lambda: mlx_seconds(lambda: blocked_matmul(x, w.T, 256)),
         lambda: best_seconds(lambda: tx @ tw.T)),
        (f"matmul g @ W, before (K in blocks of 256)", lambda: mlx_seconds(lambda: blocked_matmul(g, w, 256)),
         lambda: best_seconds(lambda: tg @ tw)),
        (f"matmul g.T @ x (a weight gradient's shape)", lambda: mlx_seconds(lambda: g.T @ x),
         lambda: best_seconds(lambda: tg.T @ tx)),
        (f"batched q @ k.T [{HEADS}x{SEQ}x{HEAD_DIM}]", lambda: mlx_seconds(lambda: q @ q.transpose(0, 2, 1)),
         lambda: best_seconds(lambda: tq @ tq.transpose(1, 2))),
        (f"INT4 decode [{MLP}x{HIDDEN}], before (nibbles + where)", lambda: mlx_seconds(lambda: decode_before(packed, scales)),
         lambda: best_seconds(lambda: decode_torch(tpacked, tscales))),
        (f"INT4 decode [{MLP}x{HIDDEN}], now (int8 shifts)", lambda: mlx_seconds(lambda: decode_now(packed, scales)),
         lambda: best_seconds(lambda: decode_torch(tpacked, tscales))),
        (f"exp [{SEQ}x{MLP}], before (mx.exp)", lambda: mlx_seconds(lambda: mx.exp(g)),
         lambda: best_seconds(lambda: torch.exp(tg))),
        (f"exp [{SEQ}x{MLP}], now (mx.power(e, x))", lambda: mlx_seconds(lambda: mx.power(math.e, g)),
         lambda: best_seconds(lambda: torch.exp(tg))),
        (f"sigmoid [{SEQ}x{MLP}], before (mx.sigmoid)", lambda: mlx_seconds(lambda: mx.sigmoid(g)),
         lambda: best_seconds(lambda: torch.sigmoid(tg))),
        (f"sigmoid [{SEQ}x{MLP}], now (1 / (1 + e**-x))", lambda: mlx_seconds(lambda: 1 / (1 + mx.power(math.e, -g))),
         lambda: best_seconds(lambda: torch.sigmoid(tg))),
        (f"square [{SEQ}x{HIDDEN}], before (mx.power(x, 2))", lambda: mlx_seconds(lambda: mx.power(x, 2.0)),
         lambda: best_seconds(lambda: tx.pow(2))),
        (f"square [{SEQ}x{HIDDEN}], now (x * x)", lambda: mlx_seconds(lambda: x * x),
         lambda: best_seconds(lambda: tx.pow(2))),
        (f"softmax [{HEADS}x{SEQ}x{SEQ}], before (mx.softmax precise)",
         lambda: mlx_seconds(lambda: mx.softmax(s, axis=-1, precise=True)),
         lambda: best_seconds(lambda: torch.softmax(ts, -1))),
        (f"softmax [{HEADS}x{SEQ}x{SEQ}], now (max, e**x, sum)", lambda: mlx_seconds(lambda: softmax_now(s)),
         lambda: best_seconds(lambda: torch.softmax(ts, -1))),
        (f"transpose copy [{SEQ}x{HEADS}x{HEAD_DIM}] -> [{HEADS}x{SEQ}x{HEAD_DIM}]",
         lambda: mlx_seconds(lambda: mx.contiguous(q.transpose(1, 0, 2))),
         lambda: best_seconds(lambda: tq.transpose(0, 1).contiguous())),
    ]


def main() -> None:
    torch.set_num_threads(1)
    mx.set_default_device(mx.cpu)
    with open("/proc/self/maps") as maps:
        blas = "OpenBLAS (preloaded)" if "scipy_openblas" in maps.read() else "the mlx wheel's reference BLAS"
    print(f"MLX matmuls on {blas}; milliseconds, best of 7, one thread\n")
    print("| op | MLX ms | torch ms | MLX / torch |\n|---|---:|---:|---:|")
    for name, mlx_fn, torch_fn in rows():
        mlx_s, torch_s = mlx_fn(), torch_fn()
        print(f"| {name} | {mlx_s * 1e3:.2f} | {torch_s * 1e3:.2f} | {mlx_s / torch_s:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
