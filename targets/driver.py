"""Run a partitioned training step by its manifest, with any target's stage artifacts.

The driver is what a phone app's training loop does, in Python: it holds the step inputs
(frozen weights, LoRA parameters, batch), runs the stages in the manifest's order, keeps
each value until its last reader, writes offloaded values to memory-mapped files and maps
them back when a later stage reads them, counts the bytes it holds, and applies the LoRA
update (AdamW or SGD, as `mebp_compiler.plan.make_optimizer`) after the step - or, for a
plan compiled with fused updates, carries the new LoRA parameters and optimizer state the
stages return (the manifest's `updates`) into the next step.

Everything is checked before any compute: the manifest's version, checksum and consistency,
that every file it lists has the SHA-256 it records, that every artifact exists and (where
the target can describe one) has the stage's input and output shapes and dtypes, and that
the weights match the manifest.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.fx as fx

from mebp_compiler.checksums import sha256_path, unseal_json
from mebp_compiler.files import atomic_write
from mebp_compiler.offload import OffloadStore
from mebp_compiler.passes.partition import (
    MANIFEST_FILE,
    MANIFEST_FORMAT_VERSION,
    STEP_INPUT_KINDS,
    UNHELD_KINDS,
    Manifest,
    ManifestError,
    Partition,
)
from mebp_compiler.plan import make_optimizer

StageFn = Callable[[list[np.ndarray]], list[np.ndarray]]
#: (input (shape, dtype) list, output (shape, dtype) list) of a stage artifact.
StageSignature = tuple[list[tuple[list[int], str]], list[tuple[list[int], str]]]


@dataclass
class DriverResult:
    """Loss and LoRA gradients of one step, and the bytes the driver held, measured per stage.

    `held_before_bytes[k]` is what the driver held when stage k started; `held_during_bytes[k]`
    adds stage k's outputs (inputs and outputs coexist when the stage returns). The
    intermediates inside a stage belong to the target's runtime and are not visible here;
    `staged_peak_bytes` adds the manifest's prediction of them to the measured held bytes.
    """

    loss: float
    grads: dict[str, np.ndarray]
    held_before_bytes: list[int]
    held_during_bytes: list[int]
    staged_peak_bytes: int
    flash_bytes_written: int = 0
    flash_bytes_read: int = 0
    updates: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def held_peak_bytes(self) -> int:
        """Most bytes the driver itself held at once (step inputs, carried values, stage outputs)."""
        return max(self.held_during_bytes, default=0)


def load_manifest(directory: str | Path) -> Manifest:
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(f"{directory} has no {MANIFEST_FILE}; is it an artifact directory written by "
                            "`mebp compile --target ...`?")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path} is not valid JSON ({exc}); compile the artifacts again") from exc
    if isinstance(data, dict) and data.get("format_version") == MANIFEST_FORMAT_VERSION:
        unsealed = unseal_json(data)
        if unsealed is None:
            raise ManifestError(f"{path} does not match its SHA-256 checksum (its bytes changed after it was "
                                "written); compile the artifacts again")
        data = unsealed
    try:
        return Manifest.from_json(data)
    except ManifestError as exc:
        raise ManifestError(f"{path}: {exc}") from exc


def check_files(manifest: Manifest, directory: str | Path, skip: tuple[str, ...] = ()) -> None:
    """Raise ManifestError naming the first file the manifest lists whose bytes differ from its SHA-256.

    Files that are missing are left to `check_artifacts` and `load_weights` to report, and
    those in `skip` (not read) are not checked. Reads every file once, at the SHA-256 rate
    of 0.3-0.7 GB/s here: 1-2 s for SmolLM2-135M's 540 MB of fp32 weights.
    """
    for name, digest in manifest.files.items():
        path = Path(directory) / name
        if name in skip or not path.exists():
            continue
        if sha256_path(path) != digest:
            raise ManifestError(f"{path} does not match its SHA-256 in the manifest (its bytes changed after "
                                "`mebp compile` wrote it); compile the artifacts again")


IOForm = Callable[[list[int], str], tuple[list[int], str]]


def check_artifacts(manifest: Manifest, directory: str | Path,
                    describe_stage: Callable[[Path], StageSignature] | None = None,
                    io_form: IOForm | None = None) -> None:
    """Raise ManifestError if an artifact is missing or its signature differs from its stages'.

    `io_form` maps a manifest value's (shape, dtype) to the form the artifact declares, for a
    target whose runtime types differ from torch's (Core ML: int64 as int32, rank 0 as (1,)).
    """
    directory = Path(directory)
    described: dict[str, StageSignature] = {}
    for stage in manifest.stages:
        path = directory / stage.artifact
        if not path.exists():
            raise ManifestError(f"stage {stage.name}: artifact {path} is missing; copy the whole artifact "
                                "directory or compile again")
        if describe_stage is None:
            continue
        if stage.artifact not in described:
            described[stage.artifact] = describe_stage(path)
        ins, outs = described[stage.artifact]
        for role, names, actual in (("input", stage.inputs, ins), ("output", stage.outputs, outs)):
            expected = [(manifest.values[n].shape, manifest.values[n].dtype) for n in names]
            if io_form is not None:
                expected = [io_form(shape, dtype) for shape, dtype in expected]
            if len(actual) != len(expected):
                raise ManifestError(f"stage {stage.name}: {path.name} has {len(actual)} {role}s, the manifest "
                                    f"lists {len(expected)}; the artifact and manifest are from different compiles")
            for k, ((shape, dtype), (want_shape, want_dtype)) in enumerate(zip(actual, expected)):
                if list(shape) != list(want_shape) or dtype != want_dtype:
                    raise ManifestError(
                        f"stage {stage.name}: {role} {k} ({names[k]}) of {path.name} is {dtype}{list(shape)}, "
                        f"the manifest says {want_dtype}{list(want_shape)}; compile the artifacts again")


def check_step_inputs(manifest: Manifest, arrays: Mapping[str, np.ndarray], kinds=STEP_INPUT_KINDS) -> None:
    """Raise ManifestError if a step input (by source name) is missing or of another shape or dtype."""
    for value in manifest.values.values():
        if value.kind not in kinds or value.reload_of:
            continue
        array = arrays.get(value.source)
        if array is None:
            raise ManifestError(f"no array for {value.kind} input '{value.source}' the manifest needs")
        if list(array.shape) != value.shape or str(array.dtype) != value.dtype:
            raise ManifestError(f"{value.kind} input '{value.source}' is {array.dtype}{list(array.shape)}, "
                                f"the manifest says {value.dtype}{value.shape}"
                                + ("; compile again for this batch shape" if value.kind == "batch" else ""))


def run_stages(manifest: Manifest, stage_fns: Mapping[str, StageFn], arrays: Mapping[str, np.ndarray],
               store: OffloadStore) -> DriverResult:
    """Execute one step: `stage_fns` maps artifact -> callable, `arrays` source name -> array."""
    values = manifest.values
    env: dict[str, np.ndarray] = {name: arrays[v.source] for name, v in values.items()
                                  if v.kind in STEP_INPUT_KINDS and not v.reload_of}
    held = sum(a.nbytes for name, a in env.items() if values[name].kind not in UNHELD_KINDS)
    handles = {}
    held_before, held_during = [], []
    staged_peak = 0
    written, read = store.bytes_written, store.bytes_read
    for stage in manifest.stages:
        for name in stage.inputs:
            if name not in env and values[name].reload_of:
                env[name] = store.read(handles[values[name].reload_of]).numpy()
                held += env[name].nbytes
        held_before.append(held)
        staged_peak = max(staged_peak, held + stage.internal_peak_bytes)
        outputs = stage_fns[stage.artifact]([env[name] for name in stage.inputs])
        if len(outputs) != len(stage.outputs):
            raise ManifestError(f"stage {stage.name} returned {len(outputs)} outputs, the manifest lists "
                                f"{len(stage.outputs)}")
        for name, array in zip(stage.outputs, outputs):
            env[name] = array
            held += array.nbytes
        held_during.append(held)
        for name in stage.offload_after:
            handles[name] = store.write(torch.from_numpy(np.ascontiguousarray(env[name])), name)
        for name in stage.free_after:
            held -= env.pop(name).nbytes
    return DriverResult(
        loss=float(env[manifest.loss]), grads={p: env[v] for p, v in manifest.grads.items()},
        updates={source: env[v] for source, v in manifest.updates.items()},
        held_before_bytes=held_before, held_during_bytes=held_during, staged_peak_bytes=staged_peak,
        flash_bytes_written=store.bytes_written - written, flash_bytes_read=store.bytes_read - read,
    )


def torch_stage_fn(module: fx.GraphModule) -> StageFn:
    """Run a stage's fx graph in torch on numpy arrays: the reference every target must equal."""

    def run(inputs: list[np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            outputs = module(*(torch.from_numpy(np.asarray(a)) for a in inputs))
        return [t.contiguous().numpy() for t in outputs]

    return run


def torch_stage_fns(partition: Partition) -> dict[str, StageFn]:
    """artifact -> fx runner of the first stage with that artifact (shared artifacts run one graph)."""
    return {stage.spec.artifact: torch_stage_fn(stage.module) for stage in partition.unique_stages().values()}


@dataclass
class Driver:
    """Runs an artifact directory: `Driver.open(dir, target)` checks everything, then `step`/`train_step`."""

    manifest: Manifest
    stage_fns: dict[str, StageFn]
    arrays: dict[str, np.ndarray]  # frozen weights and LoRA parameters by source name
    store: OffloadStore
    optimizer: torch.optim.Optimizer | None = field(default=None, repr=False)

    @classmethod
    def open(cls, directory: str | Path, target, *, weights: Mapping[str, np.ndarray] | None = None,
             offload_dir: str | None = None) -> Driver:
        """Load and check an artifact directory written for `target` (a module with
        `load_stage` and optionally `describe_stage`). `weights` (source name -> array)
        replaces the directory's weights file."""
        directory = Path(directory)
        manifest = load_manifest(directory)
        check_files(manifest, directory, skip=(manifest.weights_file,) if weights is not None else ())
        io_form = getattr(target, "io_form", None)
        check_artifacts(manifest, directory, getattr(target, "describe_stage", None), io_form)
        # Loading the stages before the weights: a target that cannot run here says so first.
        fns = {artifact: target.load_stage(directory / artifact) for artifact in manifest.unique_artifacts()}
        if io_form is not None:
            fns = {artifact: _in_manifest_form(fn, manifest, artifact) for artifact, fn in fns.items()}
        if weights is None:
            weights = load_weights(directory, manifest)
        arrays = {**initial_optimizer_state(manifest), **weights}
        check_step_inputs(manifest, arrays, kinds=("frozen", "lora", "mapped", "optimizer"))
        return cls(manifest, fns, arrays, OffloadStore(offload_dir))

    def step(self, batch: Mapping[str, np.ndarray]) -> DriverResult:
        """Loss and LoRA gradients of one batch (`input_ids`, `labels`, and `attention_mask` when
        the step was compiled with one, as the manifest's arrays); a key the manifest does not
        take raises ManifestError rather than being dropped."""
        takes = sorted({v.source for v in self.manifest.values.values() if v.kind == "batch"})
        extra = sorted(set(batch) - set(takes))
        if extra:
            raise ManifestError(f"batch input '{extra[0]}' is not an input of these artifacts (they take "
                                f"{', '.join(takes)}); compile them with an example batch that has it, or drop it")
        arrays = {**self.arrays, **{k: np.asarray(v) for k, v in batch.items()}}
        check_step_inputs(self.manifest, arrays, kinds=("batch",))
        return run_stages(self.manifest, self.stage_fns, arrays, self.store)

    def lora_arrays(self) -> dict[str, np.ndarray]:
        return {v.source: self.arrays[v.source] for v in self.manifest.values.values() if v.kind == "lora"}

    @property
    def fused(self) -> bool:
        """Whether the stages apply the LoRA updates themselves (the manifest's `updates`)."""
        return bool(self.manifest.updates)

    def use_optimizer(self, name: str = "adamw", lr: float = 2e-3) -> None:
        """Update the LoRA arrays in place after each `train_step`, with torch's AdamW or SGD.

        Raises ValueError for a manifest whose stages apply the updates with other settings."""
        if self.fused:
            settings = self.manifest.optimizer
            if (name, lr) != (settings["name"], settings["lr"]):
                raise ValueError(f"the stages apply {settings['name']} with lr {settings['lr']:g} (compiled with "
                                 f"fused updates); {name} with lr {lr:g} needs another compile")
            return
        params = [torch.nn.Parameter(torch.from_numpy(a)) for a in self.lora_arrays().values()]
        self.optimizer = make_optimizer(params, name, lr)
        self.manifest.optimizer.update({"name": name, "lr": lr})

    def train_step(self, batch: Mapping[str, np.ndarray]) -> DriverResult:
        """One step and the LoRA update (`use_optimizer` first; AdamW lr 2e-3 if not). With fused
        updates the stages' new LoRA parameters and optimizer state replace the old ones."""
        if self.fused:
            result = self.step(batch)
            if not np.isfinite(result.loss):
                raise FloatingPointError(f"the loss is {result.loss:g}; the step's updates were not kept")
            self.arrays.update(result.updates)
            return result
        if self.optimizer is None:
            self.use_optimizer()
        result = self.step(batch)
        params = self.optimizer.param_groups[0]["params"]
        for param, name in zip(params, self.lora_arrays()):
            param.grad = torch.from_numpy(np.ascontiguousarray(result.grads[name]))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return result


def initial_optimizer_state(manifest: Manifest) -> dict[str, np.ndarray]:
    """Zeros for every `optimizer` step input (AdamW's moments and step count start at zero)."""
    return {v.source: np.zeros(v.shape, dtype=v.dtype) for v in manifest.values.values()
            if v.kind == "optimizer" and not v.reload_of}


def _in_manifest_form(fn: StageFn, manifest: Manifest, artifact: str) -> StageFn:
    """`fn` with its outputs cast and reshaped to the manifest's dtypes and shapes (a target's
    I/O form, e.g. Core ML's int32 and (1,), back to torch's)."""
    stage = next(s for s in manifest.stages if s.artifact == artifact)
    specs = [(manifest.values[n].shape, manifest.values[n].dtype) for n in stage.outputs]

    def run(inputs: list[np.ndarray]) -> list[np.ndarray]:
        return [np.asarray(y).astype(dtype, copy=False).reshape(shape) for y, (shape, dtype) in zip(fn(inputs), specs)]

    return run


WEIGHTS_FILE = "weights.safetensors"


def save_weights(directory: str | Path, tensors: Mapping[str, torch.Tensor]) -> Path:
    """Write frozen weights and initial LoRA parameters (source name -> tensor) as safetensors, atomically."""
    from safetensors.torch import save_file

    tensors = {k: t.detach().contiguous() for k, t in tensors.items()}
    return atomic_write(Path(directory) / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp)))


def load_weights(directory: Path, manifest: Manifest) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = directory / (manifest.weights_file or WEIGHTS_FILE)
    if not path.is_file():
        raise ManifestError(f"{path} is missing: the step's frozen weights and LoRA parameters; compile again "
                            "without --no-weights, or pass weights=")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ManifestError(f"{path} cannot be read ({exc}); compile the artifacts again") from exc
