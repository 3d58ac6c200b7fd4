"""Write a partitioned plan as an artifact directory: one file per distinct stage, the
manifest, and (optionally) the weights."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from tqdm.auto import tqdm

from mebp_compiler.checksums import sha256_path
from mebp_compiler.offload import OffloadStore
from mebp_compiler.passes.partition import Partition
from mebp_compiler.passes.quantize import QuantizedWeights
from mebp_compiler.targets.driver import WEIGHTS_FILE, run_stages, save_weights, torch_stage_fn


def write_artifacts(partition: Partition, target: ModuleType, directory: str | Path, *,
                    weights: Mapping[str, torch.Tensor] | None = None, progress: bool = True) -> dict:
    """Export every distinct stage once with `target`, then write, if given, the weights
    (source name -> tensor) and the manifest with every file's SHA-256 (last, so a directory
    with a manifest is complete).

    Returns export facts: seconds per artifact and its size in bytes.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    manifest = partition.manifest
    manifest.target = getattr(target, "NAME", target.__name__.rsplit(".", 1)[-1])
    written: dict[str, str] = {}
    facts: dict[str, dict] = {}
    unique = partition.unique_stages()
    for signature, stage in tqdm(unique.items(), desc=f"export {manifest.target}", unit="stage",
                                 disable=not progress, dynamic_ncols=True):
        start = time.perf_counter()
        path = target.export_stage(stage.module, stage.example_inputs(manifest.values),
                                   directory / stage.spec.artifact)
        relative = path.relative_to(directory).as_posix()
        written[signature] = relative
        facts[relative] = {"export_s": time.perf_counter() - start, "bytes": _size(path),
                           "stages": sum(s.spec.signature == signature for s in partition.stages)}
    for stage in partition.stages:
        stage.spec.artifact = written[stage.spec.signature]
    if weights is not None:
        save_weights(directory, weights)
        manifest.weights_file = WEIGHTS_FILE
    manifest.files = {name: sha256_path(directory / name)
                      for name in (*written.values(), manifest.weights_file) if name}
    manifest.save(directory)
    return facts


def step_weights(model: torch.nn.Module, partition: Partition,
                 quantized: QuantizedWeights | None = None) -> dict[str, torch.Tensor]:
    """The frozen weights and LoRA parameters the manifest's stages read, by source name:
    the model's, and for a plan compiled with INT4 weights its quantized ones (`plan.weights`)."""
    state = dict(model.named_parameters())
    state.update(model.named_buffers())
    if quantized is not None:
        state.update(quantized.tensors)
    return {v.source: state[v.source] for v in partition.manifest.values.values()
            if v.kind in ("frozen", "lora", "mapped") and not v.reload_of}


def recorded_stage_inputs(partition: Partition, arrays: Mapping[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    """Signature -> the input arrays its first stage gets when the stages run in torch by the
    manifest on `arrays` (step inputs by source name): real values to check an artifact with."""
    recorded: dict[str, list[np.ndarray]] = {}
    fns = {}
    for signature, stage in partition.unique_stages().items():
        fn = torch_stage_fn(stage.module)

        def record(inputs, fn=fn, signature=signature):
            recorded.setdefault(signature, list(inputs))
            return fn(inputs)

        fns[stage.spec.artifact] = record
    run_stages(partition.manifest, fns, arrays, OffloadStore())
    return recorded


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size
