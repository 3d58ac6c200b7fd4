"""MeZO (Malladi et al., 2023): zeroth-order LoRA fine-tuning with forward passes only.

One step, for a direction z ~ N(0, I) over all LoRA parameters regenerated from a seed:

    L+ = L(theta + eps z),   L- = L(theta - eps z),   g = (L+ - L-) / (2 eps),
    theta <- theta - lr * g * z

The loss is the forward-only graph of `capture(..., backward=False)` run by the same CPU
runtime as the backprop plans, so held bytes are counted the same way.

Exact restoration. In float32, `theta + eps z - 2 eps z + eps z` is not theta, and no
in-place perturbation of every parameter at once can be undone exactly without storing
something per element (float translation is not injective). So the parameters are never
written during the two evaluations: the forward graph is rewritten so that each LoRA
parameter p_i is perturbed *just in time*, by a node inserted right before its first use,
`p_i + (s * z_i)` with s = +eps or -eps, whose output the runtime frees after the
parameter's last use (its extra memory is one LoRA parameter tensor at a time, and it is
counted in the held bytes as an activation). z_i is drawn from a `torch.Generator` seeded
by (seed, i), so it is regenerated on demand and never stored. After the two evaluations
the parameters are bitwise what they were; the update then regenerates each z_i once
more and applies `p_i -= (lr * g) * z_i` in place, one parameter at a time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from mebp_compiler.capture import capture
from mebp_compiler.ir import Phase, Role, TrainingGraph
from mebp_compiler.passes.liveness import MemoryProfile, liveness
from mebp_compiler.plan import check_memory, graph_inputs, lora_parameters
from mebp_compiler.runtime import Runtime, StepResult
from mebp_compiler.app.train import TrainHistory, lora_norm


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (distinct tuples give unrelated seeds)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def direction(param: torch.Tensor, seed: int, index: int) -> torch.Tensor:
    """z_i ~ N(0, I) shaped like `param`: the part of the direction of `seed` for LoRA parameter `index`.

    Regenerated identically at every call, so no direction is ever stored.
    """
    generator = torch.Generator(device=param.device).manual_seed(_mix(seed, index))
    return torch.randn(param.shape, generator=generator, dtype=param.dtype, device=param.device)


def perturbed(param: torch.Tensor, seed: int, index: int, scale: float) -> torch.Tensor:
    """`param + (scale * z_i)` as a new tensor (the only buffer it allocates is its output)."""
    out = direction(param, seed, index)
    out.mul_(scale)
    out.add_(param)
    return out


class _Perturber:
    """The op inserted before each LoRA parameter's first use: perturbs it by the active (seed, scale)."""

    __name__ = "mezo_perturb"
    __qualname__ = "mezo_perturb"

    def __init__(self) -> None:
        self.seed: int | None = None
        self.scale = 0.0

    def __call__(self, param: torch.Tensor, index: int) -> torch.Tensor:
        if self.seed is None:
            raise RuntimeError("no MeZO perturbation is active")
        return perturbed(param, self.seed, index, self.scale)


def perturb_graph(graph: TrainingGraph, perturber) -> TrainingGraph:
    """A copy of the forward-only `graph` in which every LoRA input goes through `perturber(p, i)`.

    The perturbation node sits right before the parameter's first user, so the perturbed
    copy lives only from there to the parameter's last use.
    """
    new = fx.Graph()
    value_map: dict[fx.Node, fx.Node] = {}
    out = new.graph_copy(graph.module.graph, value_map)
    new.output(out)
    by_name = {n.name: n for n in new.nodes}
    order = {n: k for k, n in enumerate(new.nodes)}
    info = dict(graph.info)
    lora = [s for s in graph.inputs if s.role == Role.LORA]
    for index, spec in enumerate(lora):
        placeholder = by_name[spec.name]
        users = sorted(placeholder.users, key=order.__getitem__)
        if not users:
            continue
        with new.inserting_before(users[0]):
            node = new.call_function(perturber, (placeholder, index))
        placeholder.replace_all_uses_with(node, delete_user_cb=lambda u, node=node: u is not node)
        node.meta["val"] = placeholder.meta.get("val")
        first = info.get(users[0].name)
        info[node.name] = dataclasses.replace(
            info[spec.name], role=Role.ACTIVATION, phase=Phase.FORWARD, output_alias=(None,),
            flops=2 * math.prod(info[spec.name].shape or ()),  # one multiply, one add per element
            block=first.block if first else None, module=first.module if first else "",
        )
    module = fx.GraphModule(graph.module, new)
    return graph.replace(module=module, info=info, meta={**graph.meta, "mezo_perturbed": True})


@dataclass
class MezoPlan:
    """A compiled forward-only step for MeZO, with and without the just-in-time perturbation."""

    model: torch.nn.Module
    graph: TrainingGraph  # forward + loss only
    perturbed_graph: TrainingGraph  # the same, LoRA parameters perturbed just in time
    forward_profile: MemoryProfile
    profile: MemoryProfile
    runtime: Runtime
    perturbed_runtime: Runtime
    perturber: _Perturber

    @property
    def predicted_peak_bytes(self) -> int:
        """Predicted most bytes one perturbed evaluation holds (inputs + computed tensors)."""
        return self.profile.peak_bytes

    @property
    def predicted_peak_activation_bytes(self) -> int:
        return self.profile.peak_activation_bytes

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return self.graph.batch_shape

    def lora_parameters(self) -> dict[str, torch.nn.Parameter]:
        """LoRA parameters in graph order: index i is the one direction() seeds with i."""
        return lora_parameters(self.model, self.graph)

    def check_memory(self, available_bytes: int | None = None) -> None:
        """Raise InsufficientMemory if one evaluation would not fit this machine (MeZO keeps no optimizer state)."""
        check_memory(self.predicted_peak_bytes, self.predicted_peak_activation_bytes, available_bytes=available_bytes)

    def loss(self, batch: Mapping[str, torch.Tensor], *, seed: int | None = None, scale: float = 0.0) -> StepResult:
        """Loss of `batch` at the current parameters, or at theta + scale * z(seed) when `seed` is given."""
        inputs = graph_inputs(self.model, self.graph, batch)
        if seed is None:
            return self.runtime.run(inputs)
        self.perturber.seed, self.perturber.scale = seed, scale
        try:
            return self.perturbed_runtime.run(inputs)
        finally:
            self.perturber.seed, self.perturber.scale = None, 0.0


def compile_mezo(model: torch.nn.Module, example_batch: Mapping[str, torch.Tensor],
                 offload_dir: str | None = None) -> MezoPlan:
    """Capture the forward-only step of `model` once and prepare it for MeZO steps."""
    graph = capture(model, example_batch, backward=False)
    perturber = _Perturber()
    perturbed_graph = perturb_graph(graph, perturber)
    return MezoPlan(
        model=model,
        graph=graph,
        perturbed_graph=perturbed_graph,
        forward_profile=liveness(graph),
        profile=liveness(perturbed_graph),
        runtime=Runtime(graph, offload_dir),
        perturbed_runtime=Runtime(perturbed_graph, offload_dir),
        perturber=perturber,
    )


class MezoStep(NamedTuple):
    projected_grad: float
    loss_plus: float
    loss_minus: float
    held_peak_bytes: int


def mezo_step(plan: MezoPlan, batch: Mapping[str, torch.Tensor], *, lr: float, eps: float, seed: int) -> MezoStep:
    """One MeZO step on `batch` along the direction of `seed`; updates the LoRA parameters in place.

    The parameters are not modified by the two evaluations (see the module docstring),
    so before the update they are bitwise what they were. `held_peak_bytes` is the most
    the runtime held in either evaluation.
    """
    plus = plan.loss(batch, seed=seed, scale=eps)
    minus = plan.loss(batch, seed=seed, scale=-eps)
    loss_plus, loss_minus = float(plus.loss), float(minus.loss)
    grad = (loss_plus - loss_minus) / (2 * eps)
    step = lr * grad
    with torch.no_grad():
        for index, param in enumerate(plan.lora_parameters().values()):
            z = direction(param, seed, index)
            z.mul_(step)
            param.sub_(z)
            del z
    return MezoStep(grad, loss_plus, loss_minus, max(plus.held_peak_bytes, minus.held_peak_bytes))


def train_mezo(
    plan: MezoPlan,
    batches: Iterable[Mapping[str, torch.Tensor]],
    steps: int,
    *,
    lr: float = 1e-4,
    eps: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> TrainHistory:
    """`steps` MeZO steps over `batches`; step t uses the direction seeded by (seed, t).

    The recorded loss of a step is the mean of L+ and L- (the loss at theta, to first order).
    """
    plan.check_memory()
    lora = plan.lora_parameters().values()
    history = TrainHistory(start_lora_norm=lora_norm(lora))
    bar = tqdm(total=steps, desc="mezo", unit="step", disable=not progress, dynamic_ncols=True)
    batch_iter = iter(batches)
    for t in range(steps):
        batch = next(batch_iter)
        start = time.perf_counter()
        result = mezo_step(plan, batch, lr=lr, eps=eps, seed=_mix(seed, t))
        elapsed = time.perf_counter() - start
        history.record((result.loss_plus + result.loss_minus) / 2, elapsed, result.held_peak_bytes, lora_norm(lora),
                       bar)
    bar.close()
    return history
