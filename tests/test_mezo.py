"""MeZO: the step against its definition, exact restoration, memory, and `mebp train --method mezo`."""

from __future__ import annotations

import copy
import json

import torch

import mebp_compiler
from mebp_compiler.app.cli import main
from mebp_compiler.app.mezo import compile_mezo, direction, mezo_step, train_mezo
from tests.conftest import lora_model, random_batch

EPS = 1e-2


def _snapshot(plan) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in plan.lora_parameters().items()}


def _eager_loss_along(model, names, base, seed, scale) -> float:
    """Plain eager forward on a copy of `model` whose LoRA parameters are base + scale * z(seed)."""
    other = copy.deepcopy(model)
    params = dict(other.named_parameters())
    with torch.no_grad():
        for index, name in enumerate(names):
            params[name].copy_(base[name] + scale * direction(base[name], seed, index))
        return float(other(**copy.deepcopy(_BATCH)).loss)


_MODEL = lora_model("tiny-llama")
_BATCH = random_batch(_MODEL.config.vocab_size)


def test_projected_gradient_is_the_central_difference_along_the_regenerated_direction():
    model = copy.deepcopy(_MODEL)
    plan = compile_mezo(model, _BATCH)
    names = list(plan.lora_parameters())
    base = _snapshot(plan)
    step = mezo_step(plan, _BATCH, lr=0.0, eps=EPS, seed=7)
    plus = _eager_loss_along(model, names, base, 7, EPS)
    minus = _eager_loss_along(model, names, base, 7, -EPS)
    assert abs(step.loss_plus - plus) <= 1e-5 * abs(plus)  # the project's loss tolerance (docs/tolerances.md)
    assert abs(step.loss_minus - minus) <= 1e-5 * abs(minus)
    assert step.projected_grad == (step.loss_plus - step.loss_minus) / (2 * EPS)
    # Each loss is within 1e-5 x |loss| of eager's, so their central difference is within
    # (1e-5 |plus| + 1e-5 |minus|) / (2 EPS): the bound follows from the losses' tolerance.
    loss_tolerance = 1e-5 * (abs(plus) + abs(minus)) / (2 * EPS)
    assert abs(step.projected_grad - (plus - minus) / (2 * EPS)) <= loss_tolerance
    assert step.projected_grad != 0
    # the direction is regenerated, not stored: the same seed gives the same z, another seed another
    p = next(iter(base.values()))
    assert torch.equal(direction(p, 7, 0), direction(p, 7, 0))
    assert not torch.equal(direction(p, 7, 0), direction(p, 8, 0))
    assert not torch.equal(direction(p, 7, 0), direction(p, 7, 1))


def test_parameters_are_restored_bitwise_after_the_two_evaluations():
    model = copy.deepcopy(_MODEL)
    plan = compile_mezo(model, _BATCH)
    base = _snapshot(plan)
    for seed in range(3):
        step = mezo_step(plan, _BATCH, lr=0.0, eps=EPS, seed=seed)
        assert step.loss_plus != step.loss_minus
        assert all(torch.equal(p, base[n]) for n, p in plan.lora_parameters().items())
    # and the unperturbed loss is the eager model's
    assert float(plan.loss(_BATCH).loss) == float(model(**_BATCH).loss.detach())


def test_update_is_theta_minus_lr_g_z():
    model = copy.deepcopy(_MODEL)
    plan = compile_mezo(model, _BATCH)
    base = _snapshot(plan)
    lr = 1e-3
    step = mezo_step(plan, _BATCH, lr=lr, eps=EPS, seed=11)
    for index, (name, param) in enumerate(plan.lora_parameters().items()):
        expected = base[name] - (lr * step.projected_grad) * direction(base[name], 11, index)
        assert torch.equal(param, expected), name
    assert any(not torch.equal(p, base[n]) for n, p in plan.lora_parameters().items())


def test_forward_only_holds_less_than_backprop_and_matches_liveness():
    model = copy.deepcopy(_MODEL)
    plan = compile_mezo(model, _BATCH)
    none = mebp_compiler.compile(model, _BATCH, "none")
    assert plan.graph.outputs == ["loss"]
    forward = plan.loss(_BATCH)
    assert forward.grads == {} and forward.held_peak_bytes == plan.forward_profile.peak_bytes
    step = mezo_step(plan, _BATCH, lr=0.0, eps=EPS, seed=0)
    assert step.held_peak_bytes == plan.predicted_peak_bytes
    assert step.held_peak_bytes < none.step(_BATCH).held_peak_bytes == none.predicted_peak_bytes
    # the just-in-time perturbation adds at most one LoRA parameter tensor at any step
    largest = max(p.numel() * p.element_size() for p in plan.lora_parameters().values())
    assert plan.predicted_peak_bytes <= plan.forward_profile.peak_bytes + largest
    fwd, pert = plan.forward_profile.total, plan.profile.total
    perturb_steps = [k for k, name in enumerate(plan.profile.order) if name not in set(plan.forward_profile.order)]
    assert len(perturb_steps) == len(plan.lora_parameters())
    unperturbed = [t for k, t in enumerate(pert) if k not in set(perturb_steps)]
    assert max(u - f for u, f in zip(unperturbed, fwd)) <= largest


def test_train_mezo_lowers_the_loss_on_a_repeated_batch():
    model = copy.deepcopy(_MODEL)
    plan = compile_mezo(model, _BATCH)
    history = train_mezo(plan, [_BATCH] * 60, 60, lr=3e-3, eps=1e-3, seed=0, progress=False)
    assert len(history.loss) == 60
    assert sum(history.loss[-10:]) / 10 < history.loss[0] - 0.02
    assert all(h == plan.predicted_peak_bytes for h in history.held_peak_bytes)


def test_cli_train_mezo(tmp_path, capsys):
    code = main(["train", "--model", "tiny-llama", "--method", "mezo", "--steps", "3", "--seq-len", "16",
                 "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    history = json.loads((tmp_path / "history.json").read_text())
    assert len(history["loss"]) == 3 and history["args"]["method"] == "mezo" and history["args"]["lr"] == 1e-4
    assert history["held_peak_bytes"][0] == history["predicted_peak_bytes"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
