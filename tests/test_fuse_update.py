"""Fused LoRA updates: the same parameters as the unfused optimizer, fewer gradient bytes held."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

import mebp_compiler
from mebp_compiler.ir import Role
from mebp_compiler.passes.fuse_update import (
    NonFiniteGradient,
    UpdaterMissing,
    apply_lora_update,
    check_updates_follow_uses,
    optimizer_updater,
    using_updater,
)
from mebp_compiler.schedule import ScheduleError
from mebp_compiler.app.train import NonFiniteStep
from mebp_compiler.plan import make_optimizer
from tests.conftest import TINY_MODELS, assert_matches_autograd, lora_model, random_batch


def run_both(model, batches, optimizer_name: str, **options):
    """(unfused plan, its last result, fused plan, its last result) after stepping both on `batches`.

    Each step, the fused plan's gradients (seen by its optimizer as each update is applied)
    must equal the unfused plan's to the project's tolerance, and the unfused optimizer is
    then stepped on the fused plan's gradients, so both sides apply the same update: the
    parameters must then agree bit for bit. (Stepping each side on its own gradients would
    let AdamW's division by the root of the second moment turn rounding-level differences
    into parameter differences up to the learning rate.)
    """
    twin = copy.deepcopy(model)
    plain = mebp_compiler.compile(model, batches[0], **options)
    fused = mebp_compiler.compile(twin, batches[0], fuse_update=True, **options)
    plain_params, fused_params = plain.lora_parameters(), fused.lora_parameters()
    plain_opt = make_optimizer(plain_params.values(), optimizer_name, 1e-2)
    fused_opt = make_optimizer(fused_params.values(), optimizer_name, 1e-2)
    name_of = {id(p): n for n, p in fused_params.items()}
    fused_grads = {}

    def record(opt, args, kwargs):  # the fused updater steps one parameter at a time
        fused_grads.update({name_of[id(p)]: p.grad.clone() for p in fused_params.values() if p.grad is not None})

    fused_opt.register_step_pre_hook(record)
    start = {n: p.detach().clone() for n, p in plain_params.items()}
    for batch in batches:
        plain_result = plain.step(batch)
        fused_grads.clear()
        fused_result = fused.step(batch, fused_opt)
        assert_matches_autograd(SimpleNamespace(loss=fused_result.loss, grads=fused_grads),
                                (plain_result.loss, plain_result.grads))
        for name, param in plain_params.items():
            param.grad = fused_grads[name]
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)
        assert all(torch.equal(p, fused_params[n]) for n, p in plain_params.items())
    assert all(not torch.equal(p, start[n]) for n, p in plain_params.items())
    return plain, plain_result, fused, fused_result


@pytest.mark.parametrize("name", TINY_MODELS)
def test_fused_adamw_steps_give_the_parameters_of_the_unfused_optimizer(name):
    model = lora_model(name)
    batches = [random_batch(model.config.vocab_size, seed=s) for s in range(3)]
    plain, plain_result, fused, fused_result = run_both(model, batches, "adamw", policy="mebp")
    assert fused_result.grads == {}
    assert fused_result.held_peak_bytes == fused.predicted_peak_bytes
    assert fused.predicted_peak_bytes < plain.predicted_peak_bytes
    all_grads = sum(p.numel() * p.element_size() for p in plain.lora_parameters().values())
    assert plain_result.held_by_role[Role.GRADIENT][-1] >= all_grads  # held to the end
    assert fused_result.held_by_role[Role.GRADIENT][-1] < all_grads / 10  # applied and dropped


def test_fused_update_under_the_optimal_schedule_with_offload():
    model = lora_model("tiny-qwen2")
    batches = [random_batch(model.config.vocab_size, seed=s) for s in range(2)]
    budget = mebp_compiler.compile(model, batches[0], "mebp").predicted_peak_bytes
    plain, _, fused, fused_result = run_both(model, batches, "sgd", policy="optimal", budget=budget,
                                             optimizer="sgd", work_limit=5)
    assert fused_result.held_peak_bytes == fused.predicted_peak_bytes <= budget


def test_a_fused_plan_needs_an_optimizer_and_a_sound_order():
    model = lora_model("tiny-llama")
    batch = random_batch(model.config.vocab_size)
    plan = mebp_compiler.compile(model, batch, "mebp", fuse_update=True)
    with pytest.raises(UpdaterMissing, match="optimizer="):
        plan.step(batch)
    update = next(n for n in plan.graph.nodes() if n.target is apply_lora_update)
    first_use = min(update.args[0].users, key=list(plan.graph.module.graph.nodes).index)
    first_use.prepend(update)  # the update now runs before the parameter's uses
    with pytest.raises(ScheduleError, match="after its fused update"):
        check_updates_follow_uses(plan.graph)


def test_the_fused_updater_refuses_a_non_finite_loss_or_gradient_and_updates_nothing():
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = make_optimizer([param], "adamw", 0.1)
    finite_loss, finite_grad = torch.tensor(2.5), torch.ones(3)
    with using_updater(optimizer_updater(optimizer)):
        with pytest.raises(NonFiniteGradient, match="the gradient of lora_A is not finite; the update of lora_A"):
            apply_lora_update(param, torch.tensor([1.0, float("inf"), 1.0]), finite_loss, "lora_A")
        with pytest.raises(NonFiniteGradient, match="the loss is nan"):
            apply_lora_update(param, finite_grad, torch.tensor(float("nan")), "lora_A")
        assert torch.equal(param, torch.ones(3)) and not optimizer.state
        apply_lora_update(param, finite_grad, finite_loss, "lora_A")
    assert (param < 1).all()
    stopped = str(NonFiniteStep(4, 2.5, "lora_A", fused=True))
    assert "before it in this step's backward keep this step's update, the others are those of step 3" in stopped
