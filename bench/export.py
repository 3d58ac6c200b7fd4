#!/usr/bin/env python
"""Artifact sizes and export times of the ONNX target, and one checked step, per model.

    python bench/export.py --model smollm2-135m --model qwen2.5-0.5b [--seq-len 128]
                           [--policy mebp|optimal] [--out DIR]

For each model: load it (real SmolLM2 weights; random weights at the real size for the
others), add LoRA (r=16, all 7 projections), compile the `mebp` policy with disk
checkpoints (or `optimal`, offload on, at mebp's peak), partition, and export every distinct stage to ONNX, timing each export.
Then one step runs from the files with onnxruntime and once with the stages' fx graphs
in torch, and the two losses and gradients are compared (the tests compare both with
autograd). Weights are not written (they are the model's own size, reported apart).
Results go to DIR/export-MODEL-POLICY.json and a Markdown row is printed.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import mebp_compiler  # noqa: E402
from mebp_compiler import models  # noqa: E402
from mebp_compiler.ir import format_bytes  # noqa: E402
from mebp_compiler.offload import OffloadStore  # noqa: E402
from mebp_compiler.passes.partition import partition  # noqa: E402
from mebp_compiler.plan import optimizer_state_bytes  # noqa: E402
from mebp_compiler.targets import driver, load_target  # noqa: E402
from mebp_compiler.targets.artifacts import step_weights, write_artifacts  # noqa: E402


def bench(name: str, seq_len: int, policy: str, out: pathlib.Path) -> dict:
    torch.manual_seed(0)
    start = time.perf_counter()
    model = models.add_lora(models.load(name))
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len))
    batch = {"input_ids": ids, "labels": ids.clone()}
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    plan = mebp_compiler.compile(model, batch, "mebp", checkpoints="disk")
    if policy == "optimal":  # at mebp's own peak, offload allowed
        budget = plan.predicted_peak_bytes + optimizer_state_bytes(model, "adamw")
        start = time.perf_counter()
        plan = mebp_compiler.compile(model, batch, "optimal", budget=budget)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    part = partition(plan.graph, model=name)
    partition_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as directory:
        start = time.perf_counter()
        facts = write_artifacts(part, load_target("onnx"), directory)
        export_s = time.perf_counter() - start
        weights = {k: v.detach().numpy() for k, v in step_weights(model, part).items()}
        run = driver.Driver.open(directory, load_target("onnx"), weights=weights)
        numpy_batch = {k: v.numpy() for k, v in batch.items()}
        start = time.perf_counter()
        onnx_result = run.step(numpy_batch)
        onnx_step_s = time.perf_counter() - start
    start = time.perf_counter()
    torch_result = driver.run_stages(part.manifest, driver.torch_stage_fns(part), {**weights, **numpy_batch},
                                     OffloadStore())
    torch_step_s = time.perf_counter() - start
    scale = max(float(np.abs(g).max()) for g in torch_result.grads.values())
    grad_diff = max(float(np.abs(onnx_result.grads[n] - g).max()) for n, g in torch_result.grads.items())
    per_layer_bytes = sum(facts[s.artifact]["bytes"] for s in part.manifest.stages)
    result = {
        "model": name, "seq_len": seq_len, "policy": plan.schedule.policy, "opset": load_target("onnx").OPSET,
        "stages": len(part.manifest.stages), "artifacts": len(facts),
        "artifact_bytes": sum(f["bytes"] for f in facts.values()), "unshared_bytes": per_layer_bytes,
        "weights_bytes": sum(a.nbytes for a in weights.values()),
        "export_s": export_s, "per_artifact": facts,
        "load_s": load_s, "compile_s": compile_s, "partition_s": partition_s,
        "onnx_step_s": onnx_step_s, "torch_stages_step_s": torch_step_s,
        "loss_diff": abs(onnx_result.loss - torch_result.loss), "grad_diff_over_scale": grad_diff / scale,
        "staged_peak_bytes": onnx_result.staged_peak_bytes, "plan_peak_bytes": plan.predicted_peak_bytes,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"export-{name}-{policy}.json").write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="model name (repeat; default smollm2-135m, qwen2.5-0.5b)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--policy", default="mebp", choices=("mebp", "optimal"),
                        help="mebp with disk checkpoints, or optimal (offload on) at mebp's peak")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| model | stages | distinct artifacts | artifact bytes (one file per layer would be) | "
          "export time | weights (not in artifacts) | onnx vs torch stages: grad diff / max grad |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in args.model or ["smollm2-135m", "qwen2.5-0.5b"]:
        r = bench(name, args.seq_len, args.policy, pathlib.Path(args.out))
        print(f"| {name} | {r['stages']} | {r['artifacts']} | {format_bytes(r['artifact_bytes'])} "
              f"({format_bytes(r['unshared_bytes'])}) | {r['export_s']:.1f} s | {format_bytes(r['weights_bytes'])} "
              f"| {r['grad_diff_over_scale']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
