"""The torch.compile backend `mebp`: memory-budgeted training inside an ordinary PyTorch loop.

    model = torch.compile(model, backend="mebp", options={"activation_budget": "512MB"})
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()

Each graph dynamo hands over goes through AOTAutograd (`aot_module_simplified`) with a
partition function driven by our scheduler: the joint forward+backward graph becomes the
scheduler's plain DAG (`passes.scheduler.from_graph.training_dag`), CP-SAT decides for every
forward storage whether the forward keeps it for the backward, the backward recomputes it,
or it is offloaded (written to a memory-mapped file after its last forward use and mapped
back for the backward, so its pages are read from flash only when the backward touches them),
and the forward and backward graphs are cut accordingly. The graphs run as plain fx code
(no Inductor): every value is dropped after its last use and the backward frees each saved
tensor after its last use (boxed calling convention), which is the execution the
scheduler's memory model describes.

Freed is not yet returned: after torch.compile, glibc's heap holds hundreds of MiB of free
chunks left by tracing and solving, and glibc serves even large tensors from those chunks
before it maps new memory, so a freed temporary's pages stay resident and the step's
allocations keep touching fresh ones (measured on SmolLM2-135M, seq 128, budget 200 MB:
RSS over base 203-232 MiB in five runs, against 174 MiB of tensors the torch profiler
counts and a 190.7 MiB budget; 168-169 MiB trimmed). With `trim_heap` (default) both graphs
call `malloc_trim(0)` when they start and where one transformer layer's ops end and the
next one's begin, so freed pages go back to the OS once per layer and the RSS follows the
bytes the plan holds.

What `activation_budget` covers, per graph: every tensor the graph computes (forward
activations, the tensors kept for the backward, backward temporaries, gradients and the
graph's outputs) plus its inputs that are not parameters (token ids, a hidden state passed
from an earlier graph, the backward's incoming gradients; buffers too). Not covered:
parameters (`nn.Parameter`s, held by the module whether or not the model trains), optimizer
state, and what the Python code around the graphs allocates. That is why it is not called
a budget alone: `compile(budget=...)` and `mebp train --budget` cap the whole step, weights,
LoRA parameters and optimizer state included (README, "What a budget counts"). The option's
old name `memory_budget` is deprecated and means the same bytes.

Under `torch.no_grad()` dynamo hands over inference graphs: nothing is kept for a backward,
so there is nothing to decide, but the budget still holds: a graph whose predicted peak
(computed tensors and non-parameter inputs) exceeds it raises `BudgetInfeasible`.

Several graphs (graph breaks): the graphs of one compiled model run one after another in
the forward and in reverse order in the backward, so while graph k runs, every earlier
graph's kept tensors are held. Graph k is therefore scheduled under the budget minus what
graphs 1..k-1 keep (a ledger in compile order). Every graph compiled for training is an
entry, recompiles too: a recompiled frame may be a second graph that runs in the same
step (the same layer code for another layer instance), so it cannot replace the first.
Kept bytes plus the running graph's peak then stay within the budget. Earlier graphs take
what their least-time plan needs; when a later graph no longer fits, `BudgetInfeasible`
says how much the earlier graphs keep. Not covered: what a later graph leaves behind
while an earlier one runs its backward (returned logits, LoRA gradients).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.backends.debugging import boxed_nop
from torch._functorch.partitioners import (
    _extract_fwd_bwd_modules,
    _has_tag_is_forward,
    _is_primal,
    raise_getitems,
    reordering_to_mimic_autograd_engine,
)

from mebp_compiler.capture import make_info
from mebp_compiler.device import DeviceProfile, parse_size
from mebp_compiler.heap import release_freed_memory
from mebp_compiler.ir import InputSpec, Phase, Role, TensorInfo, TrainingGraph, format_bytes
from mebp_compiler.offload import OffloadStore
from mebp_compiler.passes.liveness import liveness
from mebp_compiler.passes.policies import known_starts
from mebp_compiler.passes.scheduler.from_graph import training_dag
from mebp_compiler.passes.scheduler.problem import build_problem
from mebp_compiler.passes.scheduler.solver import DEFAULT_WORK_LIMIT, BudgetInfeasible, solve
from mebp_compiler.schedule import Decision

OPTION_NAMES = ("activation_budget", "device", "offload_dir", "work_limit", "offload", "trim_heap")
#: Old option name -> (new name, what the warning adds).
DEPRECATED_OPTIONS = {
    "time_limit_s": ("work_limit", "the scheduler's limit is deterministic work; the same number is used"),
    "memory_budget": ("activation_budget", "it counts what the compiled graphs compute and hold, not the parameters "
                                           "or optimizer state that a whole-step budget counts; the same bytes"),
}

_LAYER = re.compile(r"layers\W*(\d+)")


NEEDS_BUDGET = ('the mebp backend needs options={"activation_budget": ...}, e.g. "512MB": the bytes its graphs '
                'may compute and hold, parameters and optimizer state not counted')


class BackendError(ValueError):
    """The backend cannot plan this graph or these options; the message says what to change."""


@dataclass(frozen=True)
class BackendOptions:
    """What `options={...}` of `torch.compile(..., backend="mebp")` may set.

    `activation_budget`: bytes or a human size ("512MB", "1.5GiB"), for all graphs of the
    compiled model together (see the module docstring for what it covers; `memory_budget`
    is its deprecated name).
    `device`: a device profile name or JSON path; it turns FLOPs and bytes into the seconds
    the scheduler trades off (default `cpu-local`). `offload_dir`: where offloaded tensors
    go (default: a temporary directory). `work_limit`: the scheduler's limit per graph, in
    CP-SAT deterministic time (work, not seconds: the plan does not depend on machine load;
    `passes.scheduler.solver`); `time_limit_s` is its deprecated name.
    `offload`: allow offloading at all (default True). `trim_heap`: return freed heap
    pages to the OS at the start of both graphs and at every transformer-layer boundary
    (default True; see the module docstring; a no-op where the C library has no
    `malloc_trim`).
    """

    activation_budget_bytes: int
    device: DeviceProfile
    offload_dir: str | None = None
    work_limit: float = DEFAULT_WORK_LIMIT
    offload: bool = True
    trim_heap: bool = True

    @classmethod
    def parse(cls, options: Mapping[str, Any] | None) -> BackendOptions:
        options = dict(options or {})
        for old, (new, why) in DEPRECATED_OPTIONS.items():
            if old in options:
                warnings.warn(f"the mebp backend option {old!r} is deprecated: use {new!r} ({why})",
                              DeprecationWarning, stacklevel=3)
                options.setdefault(new, options.pop(old))
        unknown = sorted(set(options) - set(OPTION_NAMES))
        if unknown:
            raise BackendError(f"unknown mebp backend option(s) {unknown}; the options are {list(OPTION_NAMES)}")
        if "activation_budget" not in options:
            raise BackendError(NEEDS_BUDGET)
        budget = parse_size(options["activation_budget"])
        if budget <= 0:
            raise BackendError(f"activation_budget must be positive, got {options['activation_budget']!r}")
        work_limit = float(options.get("work_limit", DEFAULT_WORK_LIMIT))
        if not work_limit > 0:
            raise BackendError(f"work_limit must be positive, got {work_limit}")
        return cls(budget, DeviceProfile.load(options.get("device", "cpu-local")),
                   options.get("offload_dir"), work_limit, bool(options.get("offload", True)),
                   bool(options.get("trim_heap", True)))


@dataclass
class GraphPlan:
    """What the backend decided for one compiled graph, and what its forward last held.

    Bytes are unique storages. `kept_bytes` (planned) and `last_saved_bytes` (measured on
    the last forward) count the tensors the forward hands to the backward that stay in RAM:
    neither parameters nor offloaded tensors.
    """

    key: int  # the graph's place in compile order
    budget_bytes: int  # this graph's share: the budget minus what earlier graphs keep
    model_peak_bytes: int  # the scheduler's (upper-bound) peak of this graph
    decisions: dict[str, Decision]
    kept_bytes: int
    offloaded_bytes: int
    solver_status: str
    solve_s: float
    saved_names: list[str] = field(default_factory=list)
    offloaded_names: list[str] = field(default_factory=list)
    forward_calls: int = 0
    last_saved_bytes: int = 0
    last_offloaded_bytes: int = 0
    heap_trims: tuple[int, int] = (0, 0)  # malloc_trim calls placed in (forward, backward)

    def counts(self) -> dict[str, int]:
        """How many storages got each decision."""
        out = {d.value: 0 for d in Decision}
        for d in self.decisions.values():
            out[d.value] += 1
        return out


class MebpBackend:
    """A torch.compile backend object; one instance plans all graphs of one compiled model.

    `torch.compile(model, backend=MebpBackend(activation_budget="512MB"))` is the same as
    `backend="mebp", options={...}`; the instance keeps the plans (`graphs`) for inspection.
    """

    def __init__(self, **options: Any) -> None:
        self.options = BackendOptions.parse(options)
        self.store = OffloadStore(self.options.offload_dir)
        self.graphs: list[GraphPlan] = []
        self.inference_peaks: list[int] = []  # predicted peak of each inference graph (torch.no_grad())
        self._keys = itertools.count()  # graphs in compile order

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]):
        key = next(self._keys)
        earlier = list(self.graphs)
        is_parameter = [isinstance(x, torch.nn.Parameter) for x in (*gm.parameters(), *gm.buffers())]
        is_parameter += [isinstance(x, torch.nn.Parameter) for x in example_inputs]
        state = _GraphState(self, key, earlier, is_parameter)
        return aot_autograd(
            fw_compiler=state.compile_forward,
            bw_compiler=boxed_nop,
            inference_compiler=state.compile_inference,
            partition_fn=state.partition,
        )(gm, example_inputs)

    def summary(self) -> str:
        lines = [f"mebp backend: activation budget {format_bytes(self.options.activation_budget_bytes)}, "
                 f"device {self.options.device.name}, {len(self.graphs)} graph(s)"]
        for i, g in enumerate(self.graphs):
            lines.append(f"  graph {i}: share {format_bytes(g.budget_bytes)}, model peak "
                         f"{format_bytes(g.model_peak_bytes)}, keeps {format_bytes(g.kept_bytes)}, offloads "
                         f"{format_bytes(g.offloaded_bytes)}, {g.counts()}, solver {g.solver_status} "
                         f"in {g.solve_s:.1f} s")
        return "\n".join(lines)


class _GraphState:
    """The partition and forward compiler of one graph, sharing its plan."""

    def __init__(self, backend: MebpBackend, key: int, earlier: list[GraphPlan],
                 is_parameter: list[bool]):
        self.backend = backend
        self.key = key
        self.earlier = earlier
        self.is_parameter = is_parameter
        self.plan: GraphPlan | None = None
        self.free_inputs: set[str] = set()
        self.num_fwd_outputs = 0

    def partition(self, joint: fx.GraphModule, joint_inputs, *, num_fwd_outputs: int, **_):
        options = self.backend.options
        self.num_fwd_outputs = num_fwd_outputs
        graph = joint_training_graph(joint, self.is_parameter)
        self.free_inputs = {s.name for s in graph.inputs if s.role == Role.FROZEN}
        dag = training_dag(graph, options.device)
        for name in self.free_inputs:
            dag.nodes[name]["size_bytes"] = 0
        for name, attrs in dag.nodes.items():
            if attrs.get("output"):  # a forward output the caller holds: offloading frees nothing
                attrs["offloadable"] = False
        held_before = sum(g.kept_bytes for g in self.earlier)
        share = options.activation_budget_bytes - held_before
        problem = build_problem(dag)
        try:
            solution = solve(problem, max(share, 0), options.device, work_limit=options.work_limit,
                             starts=known_starts(graph, problem, options.offload), offload=options.offload)
        except BudgetInfeasible as exc:
            least = exc.least_budget_bytes + held_before
            dominated = list(exc.dominated_by)
            if held_before:
                dominated.append((f"kept by {len(self.earlier)} earlier graph(s) of this model", held_before))
            raise BudgetInfeasible(options.activation_budget_bytes, least,
                                   sorted(dominated, key=lambda kv: -kv[1]), exc.least, exc.least_proven) from None

        saved = saved_for_backward(joint, graph, solution.decisions)
        offloaded = [n for n in saved if solution.decisions.get(n.name) == Decision.OFFLOAD]
        sizes = {n: dag.nodes[n]["size_bytes"] for n in dag.nodes}
        kept = [n.name for n in saved if n.name not in self.free_inputs and n not in offloaded]
        self.plan = GraphPlan(
            key=self.key, budget_bytes=share, model_peak_bytes=solution.model_peak_bytes,
            decisions=solution.decisions,
            kept_bytes=sum(sizes[n] for n in kept),
            offloaded_bytes=sum(sizes[n.name] for n in offloaded),
            solver_status=solution.status, solve_s=solution.solve_s,
            saved_names=[n.name for n in saved], offloaded_names=[n.name for n in offloaded],
        )
        self.backend.graphs.append(self.plan)

        fw_module, bw_module = _extract_fwd_bwd_modules(joint, saved, saved_sym_nodes=[],
                                                        num_fwd_outputs=num_fwd_outputs)
        fw_module.graph.eliminate_dead_code()
        bw_module.graph.eliminate_dead_code()
        bw_module = reordering_to_mimic_autograd_engine(bw_module)
        fw_module, bw_module = raise_getitems(fw_module), raise_getitems(bw_module)
        if options.trim_heap:
            self.plan.heap_trims = (insert_heap_trims(fw_module, "nn_module_stack"),
                                    insert_heap_trims(bw_module, "fwd_nn_module_stack"))
        return fw_module, bw_module

    def compile_inference(self, gm: fx.GraphModule, example_inputs):
        """Check an inference graph (run under `torch.no_grad()`) against the budget, then run it as boxed fx code.

        Nothing is kept for a backward, so there is nothing to schedule: every value is
        dropped after its last use, and the graph's predicted peak (liveness; what the budget
        covers: computed tensors and non-parameter inputs) must fit the whole budget, or
        BudgetInfeasible names that peak. No training step runs alongside, so no earlier
        graph's kept tensors are counted.
        """
        options = self.backend.options
        profile = liveness(joint_training_graph(gm, self.is_parameter))
        covered = tuple(r for r in Role if r != Role.FROZEN)
        peak = profile.peak_bytes_of(covered)
        if peak > options.activation_budget_bytes:
            dominated = [(f"{s.owner} (inference graph)", s.nbytes) for s in profile.live_at_peak if s.role in covered]
            raise BudgetInfeasible(options.activation_budget_bytes, peak, dominated)
        self.backend.inference_peaks.append(peak)
        return boxed_nop(gm, example_inputs)

    def compile_forward(self, fw_module: fx.GraphModule, example_inputs):
        """Insert the offload writes into the forward, then run it as boxed fx code."""
        if self.plan is None:
            raise BackendError("the forward was compiled without a partition; this is a bug in the mebp backend")
        plan = self.plan
        output_node = fw_module.graph.output_node()
        outputs = list(output_node.args[0])
        names = [a.name if isinstance(a, fx.Node) else None for a in outputs]
        saved_positions = [i for i, name in enumerate(names)
                           if i >= self.num_fwd_outputs and name in set(plan.saved_names)]
        offload_positions = [i for i in saved_positions if names[i] in set(plan.offloaded_names)]
        counted_positions = [i for i in saved_positions
                             if names[i] not in self.free_inputs and i not in offload_positions]
        offloader = _Offloader(self.backend.store, f"g{len(self.backend.graphs)}-{id(self):x}")
        order = {n: k for k, n in enumerate(fw_module.graph.nodes)}
        for i in offload_positions:
            node = outputs[i]
            last = max((u for u in node.users if u.op != "output"), key=order.__getitem__, default=node)
            with fw_module.graph.inserting_after(last):
                outputs[i] = fw_module.graph.call_function(offloader, (node,))
        output_node.args = (type(output_node.args[0])(outputs),)
        fw_module.recompile()
        run = boxed_nop(fw_module, example_inputs)

        def forward(args: list[Any]) -> list[Any]:
            outs = run(args)
            plan.forward_calls += 1
            plan.last_saved_bytes = _unique_bytes(outs[i] for i in counted_positions)
            plan.last_offloaded_bytes = _unique_bytes(outs[i] for i in offload_positions)
            return outs

        forward._boxed_call = True
        return forward


class _Offloader:
    """Forward graph op: write a tensor to a memory-mapped file and return the mapped copy.

    The file is unlinked at once: the private mapping keeps its pages until the backward
    drops the tensor, and they are read from flash only when the backward touches them.
    """

    def __init__(self, store: OffloadStore, prefix: str) -> None:
        self.store = store
        self.prefix = prefix
        self.calls = itertools.count()
        self.__name__ = "mebp_offload"

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        handle = self.store.write(tensor, f"{self.prefix}-{next(self.calls)}")
        mapped = self.store.read(handle)
        os.unlink(handle.path)
        return mapped


def insert_heap_trims(gm: fx.GraphModule, stack_key: str) -> int:
    """Call `release_freed_memory` before the graph's first op and where each layer's ops begin.

    A node's layer comes from `node.meta[stack_key]` (forward: `nn_module_stack`, backward:
    `fwd_nn_module_stack`), or its `nn_module_stack` for forward ops recomputed in the
    backward; nodes outside any layer do not start a new one. The call at the start returns
    what the Python code between graphs freed (one graph per layer after graph breaks).
    Edits `gm` in place and returns how many calls it placed.
    """
    placed = 0
    current = None
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        layer = _layer(node.meta.get(stack_key) or node.meta.get("nn_module_stack"))
        if placed and (layer is None or layer == current):
            continue
        with gm.graph.inserting_before(node):
            gm.graph.call_function(release_freed_memory, ())
        placed += 1
        current = layer
    if placed:
        gm.recompile()
    return placed


def joint_training_graph(joint: fx.GraphModule, is_parameter: list[bool]) -> TrainingGraph:
    """The joint forward+backward graph of AOTAutograd as a TrainingGraph (for `training_dag`).

    Forward nodes are those AOTAutograd tags `is_forward`; every other computed node is
    backward. A node's block is the transformer layer in its (forward) module path, so
    a backward segment is one layer's backward; ops outside any layer join the block of
    the backward op before them. Parameters are inputs of role FROZEN, every other input
    (tokens, activations from an earlier graph, incoming gradients) role BATCH.
    """

    info: dict[str, TensorInfo] = {}
    specs = []
    primal_index = 0
    phase_seen = Phase.FORWARD
    current_block = None
    for node in joint.graph.nodes:
        if node.op == "output":
            continue
        if node.op in ("placeholder", "get_attr"):
            role = Role.BATCH
            if _is_primal(node):
                if primal_index < len(is_parameter) and is_parameter[primal_index]:
                    role = Role.FROZEN
                primal_index += 1
            elif node.op == "get_attr":
                role = Role.FROZEN
            if node.op == "placeholder":
                specs.append(InputSpec(node.name, role, node.name))
            info[node.name] = make_info(node, role, Phase.INPUT)
            _check_static(node)
            continue
        _check_static(node)
        forward = _has_tag_is_forward(node)
        if forward and phase_seen == Phase.BACKWARD:
            raise BackendError(f"forward op {node.name} comes after backward ops in the joint graph; "
                               "the mebp backend needs the forward first")
        if torch.Tag.nondeterministic_seeded in getattr(node.target, "tags", ()):
            raise BackendError(f"op {node.target} draws random numbers; a recomputation would differ. "
                               "Set dropout probabilities to 0 (LoRA dropout too) or call model.eval()")
        if forward:
            block = _layer(node.meta.get("nn_module_stack"))
            info[node.name] = make_info(node, Role.ACTIVATION, Phase.FORWARD, block=block)
        else:
            phase_seen = Phase.BACKWARD
            block = _layer(node.meta.get("fwd_nn_module_stack"))
            block = current_block if block is None else block
            current_block = block
            info[node.name] = make_info(node, Role.GRADIENT, Phase.BACKWARD, block=block)
    outputs = [str(i) for i, _ in enumerate(joint.graph.output_node().args[0])]
    return TrainingGraph(module=joint, info=info, inputs=specs, outputs=outputs, num_blocks=0)


def saved_for_backward(joint: fx.GraphModule, graph: TrainingGraph,
                       decisions: Mapping[str, Decision]) -> list[fx.Node]:
    """The forward nodes (and primals) the backward reads once recomputation is applied.

    Walk back from every backward op's inputs: a recomputed storage, a view and a tuple
    node are rebuilt in the backward from their own inputs; anything else (kept,
    offloaded, a primal) is handed over by the forward. Joint order.
    """
    saved: set[fx.Node] = set()
    seen: set[fx.Node] = set()
    stack = [arg for node in joint.graph.nodes
             if node.op != "output" and graph.info[node.name].phase == Phase.BACKWARD
             for arg in node.all_input_nodes]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        ti = graph.info[node.name]
        if ti.phase != Phase.FORWARD:
            if _is_primal(node):
                saved.add(node)
            continue
        if node.name in decisions:
            if decisions[node.name] == Decision.RECOMPUTE:
                stack.extend(node.all_input_nodes)
            else:
                saved.add(node)
        elif ti.is_view or isinstance(node.meta.get("val"), (list, tuple)):
            stack.extend(node.all_input_nodes)
        else:
            raise BackendError(f"the scheduler left {node.name}, which the backward reads, undecided; "
                               "this is a bug in the mebp backend")
    return [n for n in joint.graph.nodes if n in saved]


def _unique_bytes(tensors) -> int:
    storages = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def _layer(stack: Mapping[str, Any] | None) -> int | None:
    """The transformer layer index in the innermost module path that names one."""
    for path, _ in reversed(list((stack or {}).values())):
        match = _LAYER.search(str(path))
        if match:
            return int(match.group(1))
    return None


def _check_static(node: fx.Node) -> None:
    val = node.meta.get("val")
    values = val if isinstance(val, (list, tuple)) else [val]
    for v in values:
        if isinstance(v, torch.SymInt) or (isinstance(v, torch.Tensor) and any(
                isinstance(d, torch.SymInt) for d in (*v.shape, v.untyped_storage().nbytes()))):
            raise BackendError("the mebp backend plans memory for static shapes, and this graph has "
                               "symbolic ones; compile with torch.compile(..., dynamic=False) (each "
                               "new shape then gets its own plan) or pad batches to one shape")


_BACKENDS: dict[str, MebpBackend] = {}


def backend_for(options: Mapping[str, Any]) -> MebpBackend:
    """The MebpBackend that `backend="mebp", options=options` uses: one per distinct options, matched by value.

    Equal options give the same backend, and so one budget ledger, however often they are
    copied on their way to dynamo (HF Trainer and accelerate copy them; each recompile
    passes them again). Two models compiled with equal options therefore share a budget:
    give each its own `MebpBackend(...)` object (`backend=MebpBackend(...)`) to plan them
    apart.
    """
    key = json.dumps({k: options[k] for k in sorted(options)}, default=str)
    backend = _BACKENDS.get(key)
    if backend is None:
        backend = _BACKENDS[key] = MebpBackend(**options)
    return backend


def mebp_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: Mapping[str, Any] | None = None):
    """The `mebp` backend as dynamo calls it: `torch.compile(model, backend="mebp", options={...})`."""
    if options is None:
        raise BackendError(NEEDS_BUDGET)
    return backend_for(options)(gm, example_inputs)
