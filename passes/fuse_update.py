"""Apply each LoRA parameter's optimizer update inside the step, as soon as its gradient is final.

A plain step returns every LoRA gradient and the optimizer runs after it, so all of them
are held together at the end of the backward (for Qwen2.5-0.5B at r=16, 33.6 MiB). This
pass appends, for each LoRA parameter, an `apply_lora_update(param, grad, loss, name)` op
right after the later of the gradient's producer and the parameter's last other use; the
gradient is dropped after it. The graph's outputs become the loss alone.

The update is the optimizer's own: the runtime binds `apply_lora_update` to a function
that sets `param.grad` and steps a `torch.optim` optimizer, which skips parameters whose
`.grad` is None, so each call updates exactly one parameter with the optimizer's usual
per-parameter arithmetic and state - the same parameters as one step over all gradients.
(A global operation across gradients, such as clipping by the total norm, cannot be fused
this way.)

Each update op first checks the step's loss and its gradient and raises `NonFiniteGradient`
instead of applying a NaN or infinite one. The loss is final before the first update (it
is an input of every update op), so a non-finite loss stops the step before any parameter
changes. A finite loss with one non-finite gradient stops the step at that gradient's
update: the parameters updated before it in the backward keep this step's update, the
rest keep their values (undoing an optimizer step would need a copy of every parameter
and its optimizer state, memory the plan does not have).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.fx as fx

from mebp_compiler.ir import (InputSpec, Phase, Role, TensorInfo, TrainingGraph, collects_new_objects_only, copy_node,
                             graph_module)
from mebp_compiler.schedule import ScheduleError

Updater = Callable[[torch.Tensor, torch.Tensor], None]

_current_updater: contextvars.ContextVar[Updater | None] = contextvars.ContextVar("lora_updater", default=None)

#: FLOPs per parameter element of one AdamW update (moments, bias corrections, step).
UPDATE_FLOPS_PER_ELEMENT = 12


class UpdaterMissing(RuntimeError):
    """A fused plan ran without an optimizer to apply its LoRA updates."""


class NonFiniteGradient(FloatingPointError):
    """A fused update refused: the step's loss or the gradient of `parameter` is NaN or infinite.

    `loss` is the step's loss; `parameter` names the LoRA parameter whose update was refused.
    """

    def __init__(self, loss: float, parameter: str) -> None:
        what = f"the loss is {loss:g}" if not math.isfinite(loss) else f"the gradient of {parameter} is not finite"
        super().__init__(f"{what}; the update of {parameter} was not applied")
        self.loss = loss
        self.parameter = parameter


def apply_lora_update(param: torch.Tensor, grad: torch.Tensor, loss: torch.Tensor, name: str) -> None:
    """Graph op: hand `grad` of `param` (named `name`) to the optimizer bound by `using_updater`.

    Raises NonFiniteGradient, and updates nothing, if `loss` or `grad` is not finite.
    """
    updater = _current_updater.get()
    if updater is None:
        raise UpdaterMissing("this plan applies the LoRA update inside the step (fuse_update=True): "
                             "pass the optimizer, plan.step(batch, optimizer=...)")
    if not (torch.isfinite(loss).all() and torch.isfinite(grad).all()):
        raise NonFiniteGradient(float(loss), name)
    updater(param, grad)


@contextlib.contextmanager
def using_updater(updater: Updater | None) -> Iterator[None]:
    """Bind the function `apply_lora_update` calls, for the duration of one step."""
    token = _current_updater.set(updater)
    try:
        yield
    finally:
        _current_updater.reset(token)


def optimizer_updater(optimizer: torch.optim.Optimizer) -> Updater:
    """Step `optimizer` on one parameter: set its gradient, step, clear it."""

    def update(param: torch.Tensor, grad: torch.Tensor) -> None:
        param.grad = grad
        optimizer.step()
        param.grad = None

    return update


@collects_new_objects_only
def fuse_lora_update(graph: TrainingGraph) -> TrainingGraph:
    """The graph with an update op per LoRA parameter placed where its gradient is final; outputs: loss."""
    nodes = list(graph.module.graph.nodes)
    position = {n: k for k, n in enumerate(nodes)}
    output = graph.module.graph.output_node()
    loss, *grads = output.args[0]
    placeholders = {spec.source: n for spec, n in zip(graph.inputs, (n for n in nodes if n.op == "placeholder"))
                    if spec.role == Role.LORA}
    update_after: dict[fx.Node, list[tuple[str, fx.Node, fx.Node]]] = {}
    for name, grad in zip(graph.outputs[1:], grads, strict=True):
        param = placeholders[name]
        uses = [position[u] for u in param.users if u.op != "output"]
        last = nodes[max([position[grad], position[loss], *uses])]
        update_after.setdefault(last, []).append((name, param, grad))

    new_graph = fx.Graph()
    remap: dict[fx.Node, fx.Node] = {}
    info = dict(graph.info)
    for node in nodes:
        if node.op == "output":
            new_graph.output((remap[loss],))
            continue
        remap[node] = copy_node(new_graph, node, remap.__getitem__)
        for name, param, grad in update_after.get(node, []):
            update = new_graph.create_node("call_function", apply_lora_update,
                                           (remap[param], remap[grad], remap[loss], name),
                                           name=f"update_{param.name}")
            update.meta["val"] = None
            grad_info = graph.info[grad.name]
            info[update.name] = TensorInfo(
                role=Role.GRADIENT, phase=Phase.BACKWARD, shape=None, dtype=None,
                output_nbytes=(0,), output_alias=(None,),
                flops=UPDATE_FLOPS_PER_ELEMENT * grad.meta["val"].numel(),
                block=grad_info.block, part=grad_info.part, module=grad_info.module,
            )
    module = graph_module(graph.module, new_graph)
    return graph.replace(module=module, info=info, outputs=["loss"], meta={**graph.meta, "fused_update": True})


def check_updates_follow_uses(graph: TrainingGraph) -> None:
    """Raise ScheduleError if a (rewritten) graph reads a LoRA parameter after updating it."""
    position = {n: k for k, n in enumerate(graph.module.graph.nodes)}
    for node in graph.module.graph.nodes:
        if node.target is not apply_lora_update:
            continue
        param = node.args[0]
        late = [u.name for u in param.users if u is not node and position[u] > position[node]]
        if late:
            raise ScheduleError(f"'{late[0]}' reads LoRA parameter '{param.name}' after its fused update; "
                                "compile without fuse_update or with another schedule")


# ---------------------------------------------------------------- fused updates as graph ops (for export)


@dataclass(frozen=True)
class OptimizerSettings:
    """The optimizer a fused update applies inside exported stages: torch's AdamW or SGD (no
    momentum), as `mebp_compiler.plan.make_optimizer` makes them. Units: lr per step."""

    name: str = "adamw"
    lr: float = 2e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in STATE_TENSORS:
            raise ValueError(f"unknown optimizer {self.name!r}; choose one of {', '.join(STATE_TENSORS)}")

    def to_json(self) -> dict:
        return {"name": self.name, "lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay}


#: Per-parameter state tensors of each optimizer (each shaped like the parameter), and the
#: source name of the one step count AdamW's bias corrections read.
STATE_TENSORS = {"adamw": ("exp_avg", "exp_avg_sq"), "sgd": ()}
STEP_SOURCE = "optimizer.step"


def _one_minus_power(base: float, exponent: torch.Tensor) -> torch.Tensor:
    """1 - base**exponent in float32 for 0 < base < 1, exponent > 0, to a few roundings: as
    -expm1(exponent * log(base)) with log(base) taken in float64, and expm1 by Kahan's
    formula expm1(x) = (u - 1) * x / log(u), u = exp(x) (Goldberg, "What every computer
    scientist should know about floating-point arithmetic", 1991, Theorem 4), from ops every
    target has. Where u rounds to 1 the result is -x; below 1/2, 1 - u cancels nothing (and
    log of a denormal u would lose digits), so it is 1 - u."""
    x = exponent * math.log(base)
    u = torch.exp(x)
    kahan = (1 - u) * x / torch.log(u)
    return torch.where(u == 1, -x, torch.where(u < 0.5, 1 - u, kahan))


def _adamw(settings: OptimizerSettings):
    """torch.optim.AdamW's single-tensor update (torch/optim/adam.py) as out-of-place ops over
    (param, grad, exp_avg, exp_avg_sq, step count before this step, loss); returns the new
    (param, exp_avg, exp_avg_sq, step count). The bias corrections 1 - beta**t are float32
    (torch computes them in float64 on the host) but not computed as written: 0.999 is not a
    float32, and 1 - float32(0.999) is 1.3e-5 away from 1e-3 (what torch's `capturable=True`
    AdamW computes). `_one_minus_power` keeps them to a few float32 roundings.
    A non-finite loss or gradient leaves the parameter and its moments as they were."""
    lr, (beta1, beta2), eps, decay = settings.lr, settings.betas, settings.eps, settings.weight_decay

    def update(param, grad, exp_avg, exp_avg_sq, step, loss):
        finite = torch.logical_and(torch.isfinite(loss), torch.isfinite(grad).all())
        count = step + 1
        decayed = param * (1 - lr * decay) if decay else param
        moment = exp_avg + (grad - exp_avg) * (1 - beta1)  # exp_avg.lerp_(grad, 1 - beta1)
        moment_sq = exp_avg_sq * beta2 + grad * (1 - beta2) * grad
        bias1 = _one_minus_power(beta1, count)
        bias2_sqrt = torch.sqrt(_one_minus_power(beta2, count))
        denom = torch.sqrt(moment_sq) / bias2_sqrt + eps
        new = decayed + moment * (-lr / bias1) / denom
        return (torch.where(finite, new, param), torch.where(finite, moment, exp_avg),
                torch.where(finite, moment_sq, exp_avg_sq), count)

    return update


def _sgd(settings: OptimizerSettings):
    """torch.optim.SGD without momentum: param - lr * (grad + weight_decay * param)."""
    lr, decay = settings.lr, settings.weight_decay

    def update(param, grad, loss):
        finite = torch.logical_and(torch.isfinite(loss), torch.isfinite(grad).all())
        direction = torch.add(grad, param, alpha=decay) if decay else grad
        return (torch.where(finite, torch.add(param, direction, alpha=-lr), param),)

    return update


def update_function(settings: OptimizerSettings) -> Callable[..., tuple[torch.Tensor, ...]]:
    """The out-of-place update of one LoRA parameter: (param, grad, *state, [step count], loss)
    -> (new param, *new state, [new step count]), the state as `STATE_TENSORS[settings.name]`
    and a step count for AdamW. A non-finite loss or gradient leaves param and state as they were."""
    return _adamw(settings) if settings.name == "adamw" else _sgd(settings)


def functional_updates(graph: TrainingGraph, settings: OptimizerSettings) -> TrainingGraph:
    """Replace each `apply_lora_update` of a fused graph by the optimizer's arithmetic as ATen ops.

    What a phone runtime runs: no callback into an optimizer, the update is part of the stage
    that finishes the gradient. The optimizer state becomes graph inputs of role OPTIMIZER
    (`<param source>.exp_avg`, `.exp_avg_sq` and one `optimizer.step` for AdamW; none for
    SGD), and the new LoRA parameters and state become graph outputs of role UPDATE, named in
    `outputs` by the source they replace after the step (`outputs[0]` stays "loss"). The old
    parameter is read by nothing after its update (`check_updates_follow_uses`).
    """
    from mebp_compiler.capture import make_info
    from torch.fx.experimental.proxy_tensor import make_fx

    nodes = list(graph.module.graph.nodes)
    updates = [n for n in nodes if n.target is apply_lora_update]
    if not updates:
        raise ValueError("functional_updates needs a graph compiled with fuse_update=True")
    check_updates_follow_uses(graph)
    state_names = STATE_TENSORS[settings.name]
    fn = update_function(settings)
    g = fx.Graph()
    remap: dict[fx.Node, fx.Node] = {}
    info: dict[str, TensorInfo] = {}
    inputs = list(graph.inputs)

    def add_input(name: str, source: str, like: torch.Tensor) -> fx.Node:
        node = g.placeholder(name)
        node.meta["val"] = like
        info[node.name] = make_info(node, Role.OPTIMIZER, Phase.INPUT)
        inputs.append(InputSpec(node.name, Role.OPTIMIZER, source))
        return node

    for node in (n for n in nodes if n.op == "placeholder"):
        remap[node] = g.node_copy(node)
        info[remap[node].name] = graph.info[node.name]
    step = add_input("optimizer_step", STEP_SOURCE, torch.zeros((), dtype=torch.float32)) \
        if settings.name == "adamw" else None
    states = {u: [add_input(f"{u.args[0].name}_{s}", f"{u.args[3]}.{s}", torch.zeros_like(u.args[0].meta["val"]))
                  for s in state_names] for u in updates}
    loss = graph.module.graph.output_node().args[0][0]
    results: list[tuple[str, fx.Node]] = []
    count = None
    for node in nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            if count is not None:
                results.append((STEP_SOURCE, count))
            g.output((remap[loss], *(out for _, out in results)))
            continue
        if node.target is not apply_lora_update:
            remap[node] = copy_node(g, node, remap.__getitem__)
            info[remap[node].name] = graph.info[node.name]
            continue
        param, grad, _, name = node.args
        args = [remap[param], remap[grad], *states[node], *([step] if step is not None else []), remap[loss]]
        traced = make_fx(fn, tracing_mode="fake")(*(torch.zeros(a.meta["val"].shape, dtype=a.meta["val"].dtype)
                                                     for a in args))
        env = dict(zip((n for n in traced.graph.nodes if n.op == "placeholder"), args))
        grad_info = graph.info[grad.name]
        for op in traced.graph.nodes:
            if op.op == "output":
                outputs = [env[o] for o in op.args[0]]
            elif op.op != "placeholder":
                new = g.node_copy(op, env.__getitem__)
                new.name = g._graph_namespace.create_name(f"{node.name}_{op.name}", None)
                env[op] = new
                info[new.name] = make_info(new, Role.GRADIENT, Phase.BACKWARD, block=grad_info.block,
                                           part=grad_info.part, module=grad_info.module)
        for source, out in zip([name, *(f"{name}.{s}" for s in state_names)], outputs):
            info[out.name] = dataclasses.replace(info[out.name], role=Role.UPDATE)
            results.append((source, out))
        if step is not None:
            count = outputs[-1]
    if count is not None:
        info[count.name] = dataclasses.replace(info[count.name], role=Role.UPDATE)
    module = fx.GraphModule(graph.module, g)
    return graph.replace(module=module, info=info, inputs=inputs, outputs=["loss", *(s for s, _ in results)],
                         meta={**graph.meta, "functional_update": settings.to_json()})
