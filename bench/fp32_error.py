#!/usr/bin/env python
"""How far float32 steps are from float64 autograd on SmolLM2-135M, over seeds and CPU kernel paths.

    python bench/fp32_error.py [--seeds 0,1,2,3] [--seq-len 16] [--targets onnx,mlx] [--out DIR]
    python bench/fp32_error.py --sweep-kernels [...]   # each setting of KERNEL_SETTINGS in a fresh process

The tests hold the float32 steps of the real SmolLM2 (the ONNX, MLX and native drivers)
to a tolerance - max gradient error <= SMOLLM2_FLOAT64_TOLERANCE x the largest gradient -
against float64 autograd on the same weights, the step without float32 rounding. The
tolerance is not derived from the arithmetic (a worst-case rounding bound over 30 blocks
and a 49,152-long vocabulary contraction is orders of magnitude looser); it is twice the
worst error this script measures: that of each float32 implementation in units of 1e-5,
for several batches (seeds) and for every kernel path this machine offers (threads, MKL's
instruction sets, ATen's CPU capability). Each kernel setting runs in a fresh process,
since the libraries read their settings once. Results go to DIR/fp32-error.json and a
Markdown table is printed; `docs/tolerances.md` records a run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import mebp_compiler  # noqa: E402
from mebp_compiler.app import models  # noqa: E402
from mebp_compiler.passes.partition import partition  # noqa: E402
from mebp_compiler.targets import driver, load_target  # noqa: E402
from mebp_compiler.targets.artifacts import step_weights, write_artifacts  # noqa: E402

PROJECT_TOLERANCE = 1e-5
#: Environment settings that change which CPU kernels torch (MKL, oneDNN, ATen) and
#: onnxruntime run on this machine kind; the empty one is the default.
KERNEL_SETTINGS = (
    {},
    {"OMP_NUM_THREADS": "2", "MEBP_TORCH_THREADS": "2"},
    {"ATEN_CPU_CAPABILITY": "default"},
    {"MKL_ENABLE_INSTRUCTIONS": "AVX"},
    {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    {"MKL_CBWR": "COMPATIBLE"},
)


def lora_smollm2() -> torch.nn.Module:
    """SmolLM2-135M with LoRA r=16 as the tests' `smollm2` fixture builds it (seeded A and B)."""
    model = models.load("smollm2-135m")
    torch.manual_seed(0)
    model = models.add_lora(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    return model


def step_error(loss: float, grads: dict, reference) -> dict:
    """Max gradient error / largest reference gradient, and the loss's relative error."""
    ref_loss, ref_grads = reference
    scale = max(g.abs().max().item() for g in ref_grads.values())
    worst = max((torch.as_tensor(grads[n]).double() - g).abs().max().item() for n, g in ref_grads.items())
    return {"grad": worst / scale, "loss": abs(loss - ref_loss.item()) / max(1.0, abs(ref_loss.item()))}


def autograd(model: torch.nn.Module, batch) -> tuple[torch.Tensor, dict]:
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    loss = model(**batch).loss
    return loss.detach(), dict(zip(lora, torch.autograd.grad(loss, list(lora.values()))))


def measure(seeds: list[int], seq_len: int, targets: list[str]) -> list[dict]:
    if "MEBP_TORCH_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["MEBP_TORCH_THREADS"]))
    else:
        torch.set_num_threads(1)
    model = lora_smollm2()
    float64 = copy.deepcopy(model).double()
    rows = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=generator)
        labels = ids.clone()
        labels[:, :2] = -100
        batch = {"input_ids": ids, "labels": labels}
        reference = autograd(float64, batch)
        loss, grads = autograd(model, batch)
        rows.append({"seed": seed, "impl": "torch", **step_error(loss.item(), grads, reference)})
        plan = mebp_compiler.compile(model, batch, "mebp", checkpoints="disk")
        part = partition(plan.graph, model="smollm2-135m")
        weights = {k: v.detach().numpy() for k, v in step_weights(model, part).items()}
        for name in targets:
            target = load_target(name)
            with tempfile.TemporaryDirectory() as directory:
                write_artifacts(part, target, directory, weights=None, progress=False)
                result = driver.Driver.open(directory, target, weights=weights).step(
                    {k: v.numpy() for k, v in batch.items()})
            rows.append({"seed": seed, "impl": name, **step_error(result.loss, result.grads, reference)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--targets", default="onnx,mlx")
    parser.add_argument("--sweep-kernels", action="store_true")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    targets = [t for t in args.targets.split(",") if t]
    if not args.sweep_kernels:
        rows = [{"setting": "", **r} for r in measure(seeds, args.seq_len, targets)]
    else:
        rows = []
        for setting in KERNEL_SETTINGS:
            label = " ".join(f"{k}={v}" for k, v in setting.items()) or "default"
            print(f"[fp32_error] {label}", file=sys.stderr, flush=True)
            cmd = [sys.executable, __file__, "--seeds", args.seeds, "--seq-len", str(args.seq_len),
                   "--targets", args.targets, "--json-only"]
            done = subprocess.run(cmd, env={**os.environ, **setting}, check=True, capture_output=True, text=True)
            rows += [{**r, "setting": label} for r in json.loads(done.stdout)]
    if args.json_only:
        print(json.dumps(rows))
        return
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fp32-error.json").write_text(json.dumps(rows, indent=2))
    print("| kernel setting | implementation | worst grad error / 1e-5 over seeds | worst loss error |")
    print("|---|---|---:|---:|")
    for label in dict.fromkeys(r["setting"] for r in rows):
        for impl in dict.fromkeys(r["impl"] for r in rows):
            mine = [r for r in rows if r["setting"] == label and r["impl"] == impl]
            print(f"| {label or 'default'} | {impl} | {max(r['grad'] for r in mine) / PROJECT_TOLERANCE:.2f} "
                  f"| {max(r['loss'] for r in mine):.2g} |")


if __name__ == "__main__":
    main()
