"""Export one transformer block's forward and backward stages to MLX and CoreML: time, size, check.

The stages are cut from the captured training step by block and phase (tests/stages.py,
until the partition pass lands). For each stage and target it reports the export wall
time, the artifact's size on disk, and the check that runs here: for MLX the re-imported
`.mlxfn` run against the torch stage, for CoreML `check_stage` (reload, signature, op
set, MIL value inference against torch).

    python bench/export_stages.py --model smollm2-135m --seq-len 128 --block 7
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from mebp_compiler.app import models  # noqa: E402
from mebp_compiler.capture import capture  # noqa: E402
from mebp_compiler.ir import Phase, format_bytes  # noqa: E402
from mebp_compiler.targets import coreml as coreml_target  # noqa: E402
from mebp_compiler.targets import mlx as mlx_target  # noqa: E402
from tests.stages import block_nodes, extract_stage, node_values, step_inputs  # noqa: E402


def disk_bytes(path: pathlib.Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--block", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = models.add_lora(models.load(args.model))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq_len), generator=generator)
    batch = {"input_ids": ids, "labels": ids.clone()}
    graph = capture(model, batch)
    values = node_values(graph, step_inputs(model, graph, batch))
    print(f"{args.model}, seq {args.seq_len}, batch 1, block {args.block}, LoRA r=16, fp32\n")
    print("| stage | ops | inputs | target | export | artifact | check here |")
    print("|---|---:|---:|---|---:|---:|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for phase in (Phase.FORWARD, Phase.BACKWARD):
            stage, inputs, expected = extract_stage(graph, block_nodes(graph, args.block, phase), values)
            ops = sum(n.op == "call_function" for n in stage.graph.nodes)
            input_bytes = sum(x.numel() * x.element_size() for x in inputs)
            row = f"| block {phase.value} | {ops} | {len(inputs)} ({format_bytes(input_bytes)}) |"

            start = time.perf_counter()
            path = mlx_target.export_stage(stage, inputs, pathlib.Path(tmp) / f"{phase.value}")
            seconds = time.perf_counter() - start
            outputs = mlx_target.load_stage(path)([x.numpy() for x in inputs])
            worst = max((torch.from_numpy(y) - r).abs().max().item() / max(1.0, r.abs().max().item())
                        for y, r in zip(outputs, expected))
            print(f"{row} MLX `.mlxfn` | {seconds * 1000:.0f} ms | {format_bytes(disk_bytes(path))} | "
                  f"re-imported run vs torch: worst relative error {worst:.1g} |")

            start = time.perf_counter()
            path = coreml_target.export_stage(stage, inputs, pathlib.Path(tmp) / f"{phase.value}")
            seconds = time.perf_counter() - start
            report = coreml_target.check_stage(path, stage, inputs)
            worst = max(e / max(1.0, s) for e, s in zip(report.max_error, report.scale))
            status = "ok" if report.ok else "FAILED"
            print(f"{row} CoreML `.mlpackage` | {seconds * 1000:.0f} ms | {format_bytes(disk_bytes(path))} | "
                  f"{status}: {sum(report.package_ops.values())} MIL ops; the saved package by value inference "
                  f"vs torch: worst relative error {worst:.1g} |")
            if not report.ok:
                sys.exit(report.summary())


if __name__ == "__main__":
    main()
