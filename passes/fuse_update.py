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
import math
from collections.abc import Callable, Iterator

import torch
import torch.fx as fx

from mebp_compiler.ir import Phase, Role, TensorInfo, TrainingGraph
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
        remap[node] = new_graph.node_copy(node, remap.__getitem__)
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
    module = fx.GraphModule(graph.module, new_graph)
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
