"""Cut a scheduled TrainingGraph into stages a phone runtime runs one after another.

A stage is a `torch.fx.GraphModule` over ATen ops whose placeholders are the stage's inputs
and whose output is a tuple of the stage's outputs. The stages, in execution order:

- `embed.forward`: everything the forward computes before the first transformer block
  (token embedding, rotary tables, attention masks);
- `block{i}.forward` for each block;
- `head.forward`: final norm, LM head (all chunks, when chunked) and the loss;
- `head.backward`, then `block{i}.backward` from the last block down to block 0, each
  with the recomputations and reloads the schedule placed right before it (MeBP's
  "recompute the block just before its backward");
- `embed.backward`, only if something outside the blocks needs a gradient.

The LoRA update is not a stage. Without fused updates the driver applies it after the step
(`targets.driver`), as MeBP's runtime does outside the per-layer graphs. A plan compiled
with `fuse_update=True` updates each LoRA parameter inside the stage that finishes its
gradient (`passes.fuse_update.functional_updates`): the optimizer state is a step input of
kind `optimizer`, the new parameters and state are values of kind `update`, and the
manifest's `updates` says which step input each replaces after the step.

Values cross stages by name. Graph inputs (frozen weights, LoRA parameters, batch) are
stage inputs wherever they are read. A tensor the schedule offloads is an output of its
stage that the driver writes to a memory-mapped file; the schedule's reload becomes a
value of its own (`reload_of`) that the driver maps back before the first stage reading
it. Views never cross a boundary: a stage that reads a view of another stage's tensor
(or of a weight) rebuilds the view from its base, which costs nothing, so what crosses
is always the storage the plan's liveness counts.

Stages of identical structure (same ops, same shapes, weights as inputs) share one
`signature` and therefore one artifact: a model ships one block graph, not one per layer.
"""

from __future__ import annotations

import hashlib
import operator
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.fx as fx

from mebp_compiler import offload
from mebp_compiler.checksums import seal_json
from mebp_compiler.files import atomic_write_json
from mebp_compiler.ir import Phase, Role, TensorInfo, TrainingGraph
from mebp_compiler.passes import fuse_update
from mebp_compiler.passes.fuse_update import OptimizerSettings
from mebp_compiler.passes.liveness import liveness

#: Version of the manifest's JSON layout; a driver refuses any other. Version 2 added the
#: files' SHA-256 (`files`) and the manifest's own (`sha256`, see `checksums.seal_json`);
#: version 3 the fused optimizer update (value kinds `optimizer` and `update`, `updates`).
MANIFEST_FORMAT_VERSION = 3
MANIFEST_FILE = "manifest.json"


class PartitionError(ValueError):
    """The graph cannot be cut into stages; the message says which tensor and why."""


#: Value kinds that are step inputs (read from the weights file or the batch; `optimizer`
#: state starts at zero), and those of them not held in RAM (INT4 weights memory-mapped from
#: the weights file, see ir.UNHELD_ROLES).
STEP_INPUT_KINDS = ("frozen", "lora", "batch", "mapped", "optimizer")
UNHELD_KINDS = ("mapped",)


class ManifestError(ValueError):
    """A manifest that is malformed, of another version, or does not match its artifacts."""


@dataclass
class ValueSpec:
    """One tensor that crosses a stage boundary or is a step input or output.

    `kind` is the TensorInfo role (frozen, lora, batch, mapped, optimizer, activation,
    gradient, loss, update);
    `source` names a step input (parameter qualified name or batch key). `offload` marks
    a tensor written to flash after the stage that produces it; `reload_of` names the
    offloaded value this one is read back from. `nbytes` is dense size in bytes.
    """

    name: str
    shape: list[int]
    dtype: str
    kind: str
    nbytes: int
    source: str = ""
    offload: bool = False
    reload_of: str = ""


@dataclass
class StageSpec:
    """One stage: what it reads and writes, in its artifact's positional order.

    `reads_frozen` lists the frozen weights (parameter names) the stage reads;
    `free_after` the values the driver drops after the stage (their last use);
    `offload_after` the values it writes to flash after the stage. `held_before_bytes`
    is what the driver holds when the stage starts (all step inputs plus carried values)
    and `internal_peak_bytes` the most bytes the stage's own tensors (intermediates and
    outputs) hold at once when run op by op, from `passes.liveness`.
    """

    name: str
    kind: str  # embed_forward | block_forward | head_forward | head_backward | block_backward | embed_backward
    block: int | None
    signature: str
    artifact: str
    inputs: list[str]
    outputs: list[str]
    reads_frozen: list[str]
    free_after: list[str]
    offload_after: list[str]
    held_before_bytes: int
    internal_peak_bytes: int


@dataclass
class Manifest:
    """What a driver needs to run a partitioned step: stages in order and every value.

    `loss` and `grads` (LoRA parameter name -> value name) are the step's results.
    `predicted_peak_bytes` = max over stages of held_before_bytes + internal_peak_bytes;
    `plan_peak_bytes` is the rewritten graph's liveness peak (op-by-op), for comparison.
    `optimizer` says how the LoRA update is applied: by the driver after the step, or, with
    `updates` (step input source -> the value that replaces it after the step; then `grads`
    is empty), by the stages themselves, with the settings it records. `files` maps each file
    of the directory the stages read (artifacts, the weights file) to its SHA-256, checked
    before any compute. `vocab_size` (0 when unknown) bounds the token ids a driver accepts;
    `adapter_keys` maps each LoRA parameter's source name to its key in a peft adapter file
    (`peft_key`). Both were added within version 2: a manifest without them still reads.
    """

    format_version: int
    model: str
    policy: str
    target: str
    batch_shape: list[int]
    values: dict[str, ValueSpec]
    stages: list[StageSpec]
    loss: str
    grads: dict[str, str]
    predicted_peak_bytes: int
    plan_peak_bytes: int
    optimizer: dict = field(default_factory=lambda: {"applied_by": "driver"})
    weights_file: str = ""
    files: dict[str, str] = field(default_factory=dict)
    vocab_size: int = 0
    adapter_keys: dict[str, str] = field(default_factory=dict)
    updates: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        data = asdict(self)
        data["values"] = list(data["values"].values())
        return data

    @classmethod
    def from_json(cls, data: dict) -> Manifest:
        version = data.get("format_version") if isinstance(data, dict) else None
        if version != MANIFEST_FORMAT_VERSION:
            raise ManifestError(f"manifest format version {version!r} is not {MANIFEST_FORMAT_VERSION}, "
                                "the version this mebp-compiler reads; compile the artifacts again")
        try:
            fields = dict(data)
            fields["values"] = {v["name"]: ValueSpec(**v) for v in data["values"]}
            fields["stages"] = [StageSpec(**s) for s in data["stages"]]
            manifest = cls(**fields)
        except (KeyError, TypeError) as exc:
            raise ManifestError(f"corrupt manifest: {exc}; compile the artifacts again") from exc
        manifest.check()
        return manifest

    def save(self, directory: str | Path) -> Path:
        """Write manifest.json atomically, sealed with the SHA-256 of its content."""
        return atomic_write_json(Path(directory) / MANIFEST_FILE, seal_json(self.to_json()))

    def check(self) -> None:
        """Raise ManifestError if a stage reads a value that is neither an input nor produced earlier."""
        available = {n for n, v in self.values.items() if v.kind in STEP_INPUT_KINDS or v.reload_of}
        for stage in self.stages:
            unknown = [n for n in stage.inputs + stage.outputs if n not in self.values]
            if unknown:
                raise ManifestError(f"stage {stage.name} names values {unknown[:3]} the manifest does not describe")
            missing = [n for n in stage.inputs if n not in available]
            if missing:
                raise ManifestError(f"stage {stage.name} reads {missing[:3]} before any stage produces them")
            available.update(stage.outputs)
        results = [self.loss, *self.grads.values(), *self.updates.values()]
        if any(r not in available for r in results):
            raise ManifestError("the manifest's loss, gradients or updates are produced by no stage")
        sources = {v.source for v in self.values.values() if v.kind in ("lora", "optimizer") and not v.reload_of}
        stray = [s for s in self.updates if s not in sources]
        if stray:
            raise ManifestError(f"the manifest updates {stray[:3]}, which are no LoRA or optimizer step inputs")

    def unique_artifacts(self) -> dict[str, str]:
        """Artifact file -> signature, one entry per distinct stage structure."""
        return {s.artifact: s.signature for s in self.stages}


@dataclass
class Stage:
    """A stage's graph (for a target to export) and its description in the manifest."""

    module: fx.GraphModule
    spec: StageSpec

    def example_inputs(self, values: dict[str, ValueSpec]) -> list[torch.Tensor]:
        """Zero tensors of the stage's input shapes and dtypes (what exporters trace with)."""
        return [torch.zeros(values[n].shape, dtype=getattr(torch, values[n].dtype)) for n in self.spec.inputs]


@dataclass
class Partition:
    """The stages, their manifest, and the capture options of the plan they were cut from
    (`head_chunks`, `vocab_slices`), which a target may not support."""

    stages: list[Stage]
    manifest: Manifest
    options: dict = field(default_factory=dict)

    def unique_stages(self) -> dict[str, Stage]:
        """Signature -> the first stage with it: what a target exports."""
        out: dict[str, Stage] = {}
        for stage in self.stages:
            out.setdefault(stage.spec.signature, stage)
        return out


#: Floating dtypes of a half-precision model, which the stages do not carry (`_refuse_unsupported_options`).
HALF_DTYPES = ("bfloat16", "float16")


def partition(graph: TrainingGraph, *, model: str = "", target: str = "",
              optimizer: OptimizerSettings | None = None) -> Partition:
    """Cut the rewritten (scheduled) `graph` into stages and describe them in a manifest.

    Artifact names are `<kind>-<signature[:12]>`, without a suffix: a target adds its own.
    A plan compiled with `fuse_update=True` applies `optimizer` (default: AdamW, lr 2e-3)
    inside its stages. Raises PartitionError if a non-tensor value would cross a stage
    boundary, or if the plan was compiled with an option the stages do not carry.
    """
    nodes = [n for n in graph.module.graph.nodes if n.op == "call_function"]
    _refuse_unsupported_options(graph)
    plan_peak = liveness(graph).peak_bytes
    fused = any(n.target is fuse_update.apply_lora_update for n in nodes)
    if fused:
        optimizer = optimizer or OptimizerSettings()
        graph = fuse_update.functional_updates(graph, optimizer)
        nodes = [n for n in graph.module.graph.nodes if n.op == "call_function"]
    # An offload that no reload reads back (a schedule may write a value the backward never
    # needs again) would be flash writes without reads: the stages skip it.
    nodes = [n for n in nodes if n.target is not offload.offload or n.users]
    handle_of = {n.name: n.args[0] for n in nodes if n.target is offload.offload}
    key_of = _stage_keys(graph, nodes)
    names = _stage_names(nodes, key_of)

    builders: dict[str, _StageBuilder] = {}
    producer: dict[str, str] = {}  # value name -> stage that produces it
    for node in nodes:
        if node.target in (offload.offload, offload.reload):
            continue
        stage = names[node.name]
        if stage not in builders:
            builders[stage] = _StageBuilder(stage, key_of[node.name], graph)
        builders[stage].add(node, producer)

    offloaded = {n.args[0].name for n in nodes if n.target is offload.offload}
    reload_of = {n.name: handle_of[n.args[0].name].name for n in nodes if n.target is offload.reload}
    order = list(builders)
    readers: dict[str, list[str]] = defaultdict(list)
    for stage in order:
        for value in builders[stage].inputs:
            readers[value].append(stage)

    result_nodes = graph.module.graph.output_node().args[0]
    result_names = [a.name for a in result_nodes]
    for value in offloaded:
        builders[producer[value]].mark_output(value)
    for value, stages in readers.items():
        if value in producer:
            builders[producer[value]].mark_output(value)
    for value in result_names:
        if value not in producer:
            raise PartitionError(f"the step's result '{value}' is read back from flash at the step's end, which no "
                                 "stage outputs; recompile the plan (the scheduler now holds every result)")
        builders[producer[value]].mark_output(value)

    values = _value_specs(graph, builders, offloaded, reload_of)
    updated = set(graph.outputs[1:]) if fused else set()
    # Each value is dropped after the last stage that reads it (or, if none does, after the
    # stage that produces it); step inputs and results are held to the end, except a step
    # input a fused update replaces, which is dropped after its update.
    drop_after = {v: stages[-1] for v, stages in readers.items()}
    for value in producer.keys() & values.keys():
        drop_after.setdefault(value, producer[value])
    for value in [*result_names, *(v for v, s in values.items() if s.kind in STEP_INPUT_KINDS
                                   and s.source not in updated)]:
        drop_after.pop(value, None)
    stages = []
    held = sum(v.nbytes for v in values.values() if v.kind in STEP_INPUT_KINDS and v.kind not in UNHELD_KINDS)
    step_peak = 0
    for stage_name in order:
        builder = builders[stage_name]
        module = builder.finish()
        held += sum(values[v].nbytes for v in builder.inputs if v in reload_of and readers[v][0] == stage_name)
        signature = structural_signature(module)
        internal = _internal_peak_bytes(module, graph)
        kind, block = builder.key
        free = [v for v in dict.fromkeys(builder.inputs + builder.outputs) if drop_after.get(v) == stage_name]
        spec = StageSpec(
            name=stage_name, kind=kind, block=block, signature=signature,
            artifact=f"{kind}-{signature[:12]}", inputs=builder.inputs, outputs=builder.outputs,
            reads_frozen=[values[v].source for v in builder.inputs if values[v].kind in ("frozen", "mapped")],
            free_after=free, offload_after=[v for v in builder.outputs if v in offloaded],
            held_before_bytes=held, internal_peak_bytes=internal,
        )
        step_peak = max(step_peak, held + internal)
        held += sum(values[v].nbytes for v in builder.outputs) - sum(values[v].nbytes for v in free)
        stages.append(Stage(module, spec))

    manifest = Manifest(
        format_version=MANIFEST_FORMAT_VERSION, model=model, policy=str(graph.meta.get("schedule", "")),
        target=target, batch_shape=list(graph.batch_shape), values=values,
        stages=[s.spec for s in stages], loss=result_names[0],
        grads={} if fused else dict(zip(graph.outputs[1:], result_names[1:], strict=True)),
        predicted_peak_bytes=step_peak, plan_peak_bytes=plan_peak,
        optimizer={"applied_by": "stages", **optimizer.to_json()} if fused else {"applied_by": "driver"},
        updates=dict(zip(graph.outputs[1:], result_names[1:], strict=True)) if fused else {},
        vocab_size=_vocab_size(nodes),
        adapter_keys={v.source: peft_key(v.source) for v in values.values() if v.kind == "lora" and v.source},
    )
    manifest.check()
    options = {k: graph.meta[k] for k in ("head_chunks", "vocab_slices") if k in graph.meta}
    return Partition(stages, manifest, options)


def peft_key(name: str) -> str:
    """The key peft's adapter file gives trainable parameter `name`: without the adapter's name after
    `lora_A`/`lora_B` (`peft.get_peft_model_state_dict` drops it; `set_peft_model_state_dict`
    inserts it again), e.g. `...q_proj.lora_A.default.weight` -> `...q_proj.lora_A.weight`, and for
    a module trained in full (`modules_to_save`) the module's own key, e.g.
    `...embed_tokens.modules_to_save.default.weight` -> `...embed_tokens.weight`."""
    name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", name)
    return re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", name)


def _vocab_size(nodes: list[fx.Node]) -> int:
    """Rows of the table the token embedding gathers from (0 when the step has no embedding)."""
    from mebp_compiler.passes import quantize

    for node in nodes:
        if node.target in (torch.ops.aten.embedding.default, quantize.embedding_int4, quantize.embedding_gguf):
            return int(node.args[0].meta["val"].shape[0])
    return 0


def _refuse_unsupported_options(graph: TrainingGraph) -> None:
    half = sorted({graph.info[s.name].dtype for s in graph.inputs if graph.info[s.name].dtype in HALF_DTYPES})
    if half:
        raise PartitionError(f"the plan's model computes in {half[0]}, and the stages, their targets (onnx, mlx, "
                             "coreml) and drivers are built and checked in float32 only; load the model in "
                             "float32 (--dtype float32) to write artifacts, or train it in the CPU runtime")


def _stage_keys(graph: TrainingGraph, nodes: list[fx.Node]) -> dict[str, tuple[str, int | None]]:
    """(kind, block) of every op. Restore ops (recomputations, reloads) join the backward
    stage of the next op that is not one, so each stage is a contiguous run."""
    info, num_blocks = graph.info, graph.num_blocks
    keys: dict[str, tuple[str, int | None]] = {}
    seen_forward_block = seen_backward_block = False
    pending: list[str] = []
    for node in nodes:
        if node.target is offload.offload:
            continue
        ti = info[node.name]
        in_block = ti.block is not None and ti.block < num_blocks
        if ti.phase == Phase.FORWARD:
            seen_forward_block |= in_block
            keys[node.name] = (("block_forward", ti.block) if in_block else
                               ("head_forward", None) if seen_forward_block else ("embed_forward", None))
            continue
        if ti.recompute_of is not None:
            pending.append(node.name)
            continue
        seen_backward_block |= in_block
        key = (("block_backward", ti.block) if in_block else
               ("embed_backward", None) if seen_backward_block else ("head_backward", None))
        keys[node.name] = key
        for name in pending:
            keys[name] = key
        pending.clear()
    if pending:
        raise PartitionError(f"the step ends with recomputations no backward op reads: {pending[:3]}")
    # A getitem runs where its tuple is produced: only tensors cross stage boundaries.
    for node in nodes:
        if node.target is operator.getitem and node.args[0].name in keys:
            keys[node.name] = keys[node.args[0].name]
    return keys


def _stage_names(nodes: list[fx.Node], key_of: dict) -> dict[str, str]:
    """Stage name of every op; a key that recurs after another stage gets a `.partN` suffix."""
    names: dict[str, str] = {}
    runs: dict[tuple, int] = defaultdict(int)
    previous = None
    for node in nodes:
        key = key_of.get(node.name)
        if key is None:
            continue
        if node.target is operator.getitem:
            continue
        if key != previous:
            runs[key] += 1
            previous = key
        kind, block = key
        base = kind.replace("_", ".", 1) if block is None else f"block{block}.{kind.split('_')[1]}"
        names[node.name] = base if runs[key] == 1 else f"{base}.part{runs[key]}"
    for node in nodes:
        if node.target is operator.getitem and node.name in key_of:
            names[node.name] = names[node.args[0].name]
    return names


class _StageBuilder:
    """Accumulates one stage's fx graph; inputs in order of first use, outputs in order produced."""

    def __init__(self, name: str, key: tuple[str, int | None], graph: TrainingGraph) -> None:
        self.name = name
        self.key = key
        self.source = graph
        self.graph = fx.Graph()
        self.root = torch.nn.Module()
        self.env: dict[str, fx.Node] = {}
        self.inputs: list[str] = []
        self.outputs: list[str] = []

    def add(self, node: fx.Node, producer: dict[str, str]) -> None:
        """Copy `node` into the stage; record the stage as the producer of its value."""
        new = self.graph.node_copy(node, self._read)
        self.env[node.name] = new
        producer[node.name] = self.name

    def _read(self, a: fx.Node) -> fx.Node:
        """The stage's node for value `a`: its own, a rebuilt view, a constant or a new input."""
        if a.name in self.env:
            return self.env[a.name]
        info = self.source.info[a.name]
        if a.op == "get_attr":
            value = getattr(self.source.module, a.target)
            setattr(self.root, a.target, value)
            new = self.graph.get_attr(a.target)
            new.meta = dict(a.meta)
        elif a.op == "call_function" and info.is_view and a.target is not operator.getitem \
                and a.target not in (offload.reload, offload.offload):
            # Rebuild the view here from its base: a view costs nothing, a copy would.
            new = self.graph.node_copy(a, self._read)
        else:
            val = a.meta.get("val")
            if not isinstance(val, torch.Tensor):
                raise PartitionError(f"stage {self.name} reads '{a.name}', which is not a single tensor "
                                     f"({type(val).__name__}); only tensors can cross stage boundaries")
            with self._at_end_of_placeholders():
                new = self.graph.placeholder(a.name)
            new.meta["val"] = val
            self.inputs.append(a.name)
        self.env[a.name] = new
        return new

    def _at_end_of_placeholders(self):
        """Placeholders stay first, in order of first use."""
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        if placeholders:
            return self.graph.inserting_after(placeholders[-1])
        return self.graph.inserting_before(next(iter(self.graph.nodes), None))

    def mark_output(self, value: str) -> None:
        if value not in self.outputs:
            self.outputs.append(value)

    def finish(self) -> fx.GraphModule:
        """The stage as a GraphModule returning its outputs (in production order) as a tuple."""
        position = {n.name: k for k, n in enumerate(self.graph.nodes)}
        self.outputs.sort(key=lambda v: position[self.env[v].name])
        self.graph.output(tuple(self.env[v] for v in self.outputs))
        self.graph.eliminate_dead_code()
        return fx.GraphModule(self.root, self.graph, class_name="Stage")


def _value_specs(graph: TrainingGraph, builders: dict[str, _StageBuilder], offloaded: set[str],
                 reload_of: dict[str, str]) -> dict[str, ValueSpec]:
    source_of = {s.name: s.source for s in graph.inputs}
    names = [v for b in builders.values() for v in b.inputs + b.outputs]
    values: dict[str, ValueSpec] = {}
    for name in dict.fromkeys(names):
        node = graph.node(name)
        val = node.meta["val"]
        role = graph.info[name].role
        kind = (graph.info[reload_of[name]].role if name in reload_of else role).value
        values[name] = ValueSpec(
            name=name, shape=list(val.shape), dtype=str(val.dtype).removeprefix("torch."), kind=kind,
            nbytes=val.numel() * val.element_size(), source=source_of.get(name, ""),
            offload=name in offloaded, reload_of=reload_of.get(name, ""),
        )
    return values


def _internal_peak_bytes(module: fx.GraphModule, graph: TrainingGraph) -> int:
    """Peak bytes of the stage's own tensors (intermediates and outputs), op by op.

    Stage nodes keep the names of the nodes they copy, so their TensorInfo carries over.
    """
    info: dict[str, TensorInfo] = {}
    base = 0
    for node in module.graph.nodes:
        if node.op == "output":
            continue
        if node.op == "placeholder":
            val = node.meta["val"]
            nbytes = val.numel() * val.element_size()
            base += nbytes
            info[node.name] = TensorInfo(Role.ACTIVATION, Phase.INPUT, tuple(val.shape), str(val.dtype),
                                         (nbytes,), (None,))
        else:
            source = graph.info[node.name]
            info[node.name] = source
            if node.op == "get_attr":
                base += source.alloc_bytes
    staged = TrainingGraph(module=module, info=info, inputs=[], outputs=[], num_blocks=0)
    return liveness(staged).peak_bytes - base


def structural_signature(module: fx.GraphModule) -> str:
    """A hash of the stage's structure with node names replaced by positions.

    Two stages with the same ops, arguments, constants and input/output shapes and dtypes
    (e.g. the forward of two identical decoder blocks, whose weights are inputs) hash alike.
    """
    index: dict[fx.Node, int] = {}
    rows = []
    for k, node in enumerate(module.graph.nodes):
        index[node] = k
        args = fx.node.map_arg((node.args, node.kwargs), lambda a: f"%{index[a]}")
        val = node.meta.get("val")
        shape = (tuple(val.shape), str(val.dtype)) if isinstance(val, torch.Tensor) else None
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        if node.op == "get_attr":
            constant = getattr(module, node.target)
            target = hashlib.sha256(constant.detach().contiguous().numpy().tobytes()).hexdigest()
        elif node.op == "call_function":
            target = str(node.target)
        rows.append((node.op, target if node.op != "placeholder" else "", repr(args) if node.op != "placeholder" else "", shape))
    return hashlib.sha256(repr(rows).encode()).hexdigest()
