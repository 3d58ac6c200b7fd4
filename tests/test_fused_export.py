"""Fused optimizer updates in exported stages: each LoRA parameter is updated inside the stage
that finishes its gradient, the optimizer state is carried by the driver between steps.

The update's arithmetic is checked apart from the gradients (as tests/test_onnx.py's AdamW
test does): fed the same gradients, a target's update equals torch.optim's. The whole fused
step is then checked against autograd through what the update makes of its gradient: SGD's
new parameter is linear in it, AdamW's first moment after step one is (1 - beta1) x it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import mebp_compiler
from mebp_compiler.offload import OffloadStore
from mebp_compiler.passes import fuse_update
from mebp_compiler.passes.fuse_update import STATE_TENSORS, STEP_SOURCE, OptimizerSettings
from mebp_compiler.passes.partition import partition
from mebp_compiler.plan import optimizer_state_bytes
from mebp_compiler.targets import driver, load_target
from mebp_compiler.targets.artifacts import step_weights, write_artifacts
from mebp_compiler.plan import make_optimizer
from tests.conftest import autograd_reference, lora_model, random_batch
from tests.test_partition import step_arrays

#: A fused stage holds a parameter and its update at once, and the update's few temporaries.
FUSED_STAGED_PEAK_TOLERANCE = 0.10
TARGETS = ["onnx", "mlx"]


def target_module(name: str):
    if name == "mlx":
        pytest.importorskip("mlx.core", reason="the MLX target needs the 'mlx' extra")
    return load_target(name)


@pytest.mark.parametrize("target_name", TARGETS)
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_update_ops_equal_torch_optim_on_the_same_gradients(target_name, optimizer, tmp_path):
    target = target_module(target_name)
    settings = OptimizerSettings(optimizer, lr=1e-2, weight_decay=0.1)
    generator = torch.Generator().manual_seed(0)
    param = torch.randn(8, 64, generator=generator)
    grads = [torch.randn(8, 64, generator=generator) * scale for scale in (1.0, 1e-4, 30.0)]
    grads[1][0, :8] = 0  # where AdamW's moments are tiny, its update is most sensitive
    state = [torch.zeros_like(param) for _ in STATE_TENSORS[optimizer]]
    state += [torch.zeros(())] if optimizer == "adamw" else []
    loss = torch.tensor(1.0)
    stage = make_fx(fuse_update.update_function(settings))(param, grads[0], *state, loss)
    run = target.load_stage(target.export_stage(stage, [param, grads[0], *state, loss], tmp_path / "update"))
    reference = torch.nn.Parameter(param.clone())
    torch_optimizer = make_optimizer([reference], optimizer, settings.lr, settings.weight_decay)
    values = [param.numpy(), *(s.numpy() for s in state)]
    for grad in grads:
        values = run([values[0], grad.numpy(), *values[1:], loss.numpy()])
        reference.grad = grad.clone()
        torch_optimizer.step()
        expected = [reference.detach(), *(torch_optimizer.state[reference][s] for s in STATE_TENSORS[optimizer])]
        for got, want in zip(values, expected):
            np.testing.assert_allclose(got, want.numpy(), rtol=2e-6, atol=1e-6 * settings.lr)
        if optimizer == "adamw":
            assert float(values[-1]) == float(torch_optimizer.state[reference]["step"])
    nan_loss = run([values[0], grads[0].numpy(), *values[1:], np.array(np.nan, dtype=np.float32)])
    for got, kept in zip(nan_loss, values):  # a non-finite loss updates nothing (the count aside)
        if got.ndim:
            assert np.array_equal(got, kept)


def fused_plan(policy: str = "mebp"):
    """(model, batch, plan) of tiny-llama with fused updates: mebp with disk checkpoints, or
    optimal at mebp's budget plus AdamW's state (it offloads)."""
    model = lora_model("tiny-llama")
    batch = random_batch(model.config.vocab_size, seq=16)
    plan = mebp_compiler.compile(model, batch, "mebp", fuse_update=True, checkpoints="disk")
    if policy == "optimal":
        budget = plan.predicted_peak_bytes + optimizer_state_bytes(model, "adamw")
        plan = mebp_compiler.compile(model, batch, "optimal", budget=budget, fuse_update=True, work_limit=5)
    return model, batch, plan


def assert_fused_step_matches_autograd(settings, arrays_before, updates, model, batch, step):
    """The stages' new parameters and state are the optimizer's update of autograd's gradients."""
    loss, grads = autograd_reference(model, batch)
    scale = max(g.abs().max().item() for g in grads.values())
    for name, grad in grads.items():
        param = torch.from_numpy(arrays_before[name])
        new = torch.from_numpy(updates[name])
        if settings.name == "sgd":
            expected = param - settings.lr * (grad + settings.weight_decay * param)
            assert (new - expected).abs().max().item() <= settings.lr * 1e-5 * scale + 1e-7
            continue
        beta1, beta2 = settings.betas
        m_old = torch.from_numpy(arrays_before[f"{name}.exp_avg"])
        m = torch.from_numpy(updates[f"{name}.exp_avg"])
        v = torch.from_numpy(updates[f"{name}.exp_avg_sq"])
        assert (m - (beta1 * m_old + (1 - beta1) * grad)).abs().max().item() <= (1 - beta1) * 1e-5 * scale + 1e-9
        # The parameter is AdamW's step on the stage's own moments (torch's arithmetic, in float64).
        denom = v.double().sqrt() / (1 - beta2**step) ** 0.5 + settings.eps
        expected = param.double() * (1 - settings.lr * settings.weight_decay) - settings.lr / (1 - beta1**step) * m / denom
        assert (new.double() - expected).abs().max().item() <= 1e-5 * settings.lr
    assert float(updates[STEP_SOURCE]) == step if settings.name == "adamw" else STEP_SOURCE not in updates


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_fused_stages_run_in_torch_match_autograd_and_hold_what_the_manifest_says(optimizer):
    model, batch, plan = fused_plan()
    settings = OptimizerSettings(optimizer, lr=1e-2)
    part = partition(plan.graph, optimizer=settings)
    manifest = part.manifest
    assert manifest.grads == {} and manifest.optimizer["applied_by"] == "stages"
    lora = {n for n, p in model.named_parameters() if p.requires_grad}
    state = {f"{n}.{s}" for n in lora for s in STATE_TENSORS[optimizer]} | ({STEP_SOURCE} if optimizer == "adamw" else set())
    assert set(manifest.updates) == lora | state
    assert {v.source for v in manifest.values.values() if v.kind == "optimizer"} == state
    arrays = {**driver.initial_optimizer_state(manifest), **step_arrays(model, part, batch)}
    result = driver.run_stages(manifest, driver.torch_stage_fns(part), arrays, OffloadStore())
    assert abs(result.loss - autograd_reference(model, batch)[0].item()) <= 1e-5
    assert_fused_step_matches_autograd(settings, arrays, result.updates, model, batch, step=1)
    assert result.held_before_bytes == [s.held_before_bytes for s in manifest.stages]
    assert result.staged_peak_bytes == manifest.predicted_peak_bytes
    state_bytes = optimizer_state_bytes(model, optimizer) + (4 if optimizer == "adamw" else 0)
    ratio = manifest.predicted_peak_bytes / (plan.predicted_peak_bytes + state_bytes)
    assert 1 <= ratio <= 1 + FUSED_STAGED_PEAK_TOLERANCE, ratio
    # Each parameter's update lives in the stage that finishes its gradient, never after the step.
    for stage in part.stages:
        updated = [v for v in stage.spec.outputs if manifest.values[v].kind == "update"]
        if updated:
            assert stage.spec.kind in ("block_backward", "head_backward", "embed_backward")


@pytest.mark.parametrize("target_name", TARGETS)
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("policy", ["mebp", "optimal"])
def test_fused_artifacts_train_two_steps_like_autograd(target_name, optimizer, policy, tmp_path):
    target = target_module(target_name)
    model, batch, plan = fused_plan(policy)
    settings = OptimizerSettings(optimizer, lr=1e-2)
    part = partition(plan.graph, model="test", optimizer=settings)
    write_artifacts(part, target, tmp_path / "artifacts", weights=step_weights(model, part), progress=False)
    run = driver.Driver.open(tmp_path / "artifacts", target, offload_dir=str(tmp_path / "flash"))
    run.use_optimizer(optimizer, 1e-2)  # the stages' own settings: accepted, nothing else changes
    with pytest.raises(ValueError, match="the stages apply .* with lr 0.01 .*needs another compile"):
        run.use_optimizer(optimizer, 5e-3)
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for step in (1, 2):
        before = dict(run.arrays)
        result = run.train_step({k: v.numpy() for k, v in batch.items()})
        assert result.held_before_bytes == [s.held_before_bytes for s in part.manifest.stages]
        assert result.staged_peak_bytes == part.manifest.predicted_peak_bytes
        assert_fused_step_matches_autograd(settings, before, result.updates, model, batch, step)
        with torch.no_grad():  # the next step's reference runs on the parameters the stages made
            for name, param in lora.items():
                param.copy_(torch.from_numpy(run.arrays[name]))


def test_cli_compiles_and_runs_fused_updates(tmp_path, capsys):
    from mebp_compiler.app.cli import main

    target_module("mlx")
    out = tmp_path / "out"
    assert main(["compile", "--model", "tiny-qwen2", "--seq-len", "16", "--fuse-update", "--target", "mlx",
                 "-o", str(out)]) == 0
    manifest = driver.load_manifest(out)
    assert manifest.updates and manifest.optimizer["applied_by"] == "stages"
    assert main(["run", str(out), "--steps", "2", "--no-progress", "--out", str(tmp_path / "lora.safetensors")]) == 0
    assert "manifest predicts" in capsys.readouterr().err
    assert (tmp_path / "lora.safetensors").is_file()
