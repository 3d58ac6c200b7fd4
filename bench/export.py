#!/usr/bin/env python
"""Artifact sizes and export times of a target (ONNX, MLX, CoreML), and one checked step, per model.

    python bench/export.py --model smollm2-135m --model qwen2.5-0.5b [--seq-len 128]
                           [--policy mebp|optimal] [--target onnx|mlx|coreml] [--out DIR]

For each model: load it (real SmolLM2 weights; random weights at the real size for the
others), add LoRA (r=16, all 7 projections), compile the `mebp` policy with disk
checkpoints (or `optimal`, offload on, at mebp's peak), partition, and export every distinct stage with the target, timing each export.
Then one step runs from the files (onnxruntime, or mlx[cpu]) and once with the stages' fx
graphs in torch, and the two losses and gradients are compared (the tests compare both
with autograd); CoreML, which cannot run here, gets `coreml.verify_artifacts` instead
(every package's MIL value inference against its torch stage, on the step's real values)
and the last column is the worst error relative to max(1, output scale). Weights are not
written (they are the model's own size, reported apart). Results go to
DIR/export-MODEL-POLICY[-TARGET].json and a Markdown row is printed.
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
from mebp_compiler.app import models  # noqa: E402
from mebp_compiler.ir import format_bytes  # noqa: E402
from mebp_compiler.offload import OffloadStore  # noqa: E402
from mebp_compiler.passes.partition import partition  # noqa: E402
from mebp_compiler.plan import optimizer_state_bytes  # noqa: E402
from mebp_compiler.targets import driver, load_target  # noqa: E402
from mebp_compiler.targets.artifacts import step_weights, write_artifacts  # noqa: E402


def bench(name: str, seq_len: int, policy: str, out: pathlib.Path, target_name: str = "onnx") -> dict:
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
    target = load_target(target_name)
    weights = {k: v.detach().numpy() for k, v in step_weights(model, part).items()}
    numpy_batch = {k: v.numpy() for k, v in batch.items()}
    with tempfile.TemporaryDirectory() as directory:
        start = time.perf_counter()
        facts = write_artifacts(part, target, directory)
        export_s = time.perf_counter() - start
        start = time.perf_counter()
        if hasattr(target, "verify_artifacts"):
            report = target.verify_artifacts(part, pathlib.Path(directory), {**weights, **numpy_batch})
            target_result = None
        else:
            run = driver.Driver.open(directory, target, weights=weights)
            target_result = run.step(numpy_batch)
        target_step_s = time.perf_counter() - start
    start = time.perf_counter()
    torch_result = driver.run_stages(part.manifest, driver.torch_stage_fns(part), {**weights, **numpy_batch},
                                     OffloadStore())
    torch_step_s = time.perf_counter() - start
    if target_result is None:
        difference = max(a["worst_relative_error"] for a in report["artifacts"].values())
        loss_diff = None
    else:
        scale = max(float(np.abs(g).max()) for g in torch_result.grads.values())
        difference = max(float(np.abs(target_result.grads[n] - g).max())
                         for n, g in torch_result.grads.items()) / scale
        loss_diff = abs(target_result.loss - torch_result.loss)
    per_layer_bytes = sum(facts[s.artifact]["bytes"] for s in part.manifest.stages)
    result = {
        "model": name, "seq_len": seq_len, "policy": plan.schedule.policy, "target": target_name,
        "stages": len(part.manifest.stages), "artifacts": len(facts),
        "artifact_bytes": sum(f["bytes"] for f in facts.values()), "unshared_bytes": per_layer_bytes,
        "weights_bytes": sum(a.nbytes for a in weights.values()),
        "export_s": export_s, "per_artifact": facts,
        "load_s": load_s, "compile_s": compile_s, "partition_s": partition_s,
        "target_step_or_check_s": target_step_s, "torch_stages_step_s": torch_step_s,
        "loss_diff": loss_diff, "difference": difference,
        "difference_is": "worst check error / max(1, output scale)" if target_result is None
        else "max grad diff / max grad, vs the torch stages", "staged_peak_bytes": torch_result.staged_peak_bytes,
        "plan_peak_bytes": plan.predicted_peak_bytes,
    }
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if target_name == "onnx" else f"-{target_name}"
    (out / f"export-{name}-{policy}{suffix}.json").write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="model name (repeat; default smollm2-135m, qwen2.5-0.5b)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--policy", default="mebp", choices=("mebp", "optimal"),
                        help="mebp with disk checkpoints, or optimal (offload on) at mebp's peak")
    parser.add_argument("--target", default="onnx", choices=("onnx", "mlx", "coreml"))
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| model | stages | distinct artifacts | artifact bytes (one file per layer would be) | "
          f"export time | weights (not in artifacts) | {args.target} vs torch stages: "
          + ("worst check error |" if args.target == "coreml" else "grad diff / max grad |"))
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in args.model or ["smollm2-135m", "qwen2.5-0.5b"]:
        r = bench(name, args.seq_len, args.policy, pathlib.Path(args.out), args.target)
        print(f"| {name} | {r['stages']} | {r['artifacts']} | {format_bytes(r['artifact_bytes'])} "
              f"({format_bytes(r['unshared_bytes'])}) | {r['export_s']:.1f} s | {format_bytes(r['weights_bytes'])} "
              f"| {r['difference']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
