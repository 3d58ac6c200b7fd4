"""The native driver (targets/native, `mebp-native`): built here, run on MLX artifacts with no
Python in its process, it gives autograd's loss and LoRA gradients, torch's AdamW update, the
manifest's held bytes, an adapter peft loads, and a one-line error before any compute for
every bad artifact or token file."""

from __future__ import annotations

import copy
import json
import re
import resource
import shutil
import signal
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

import mebp_compiler
from mebp_compiler.app import models
from mebp_compiler.checksums import seal_json, sha256_path
from mebp_compiler.passes.fuse_update import OptimizerSettings
from mebp_compiler.passes.partition import MANIFEST_FILE, partition
from mebp_compiler.targets import driver, load_target, native_driver
from mebp_compiler.targets.artifacts import step_weights, write_artifacts
from mebp_compiler.plan import make_optimizer
from tests.conftest import (
    SMOLLM2_FLOAT64_TOLERANCE,
    TINY_MODELS,
    assert_matches_autograd,
    autograd_reference,
    lora_model,
    random_batch,
    safetensors_data_start,
)
from tests.test_partition import assert_held_as_predicted, compiled_tiny

pytest.importorskip("mlx.core", reason="the native driver builds against the 'mlx' extra")
MLX = load_target("mlx")
LR = 1e-2


@pytest.fixture(scope="module")
def native():
    """The driver, built with CMake if this checkout has not built it yet (`make setup` does)."""
    return native_driver.ensure_built()


def lora_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def numpy_batch(batch):
    return {k: v.numpy() for k, v in batch.items()}


def export(name, policy, directory):
    model, batch, plan = compiled_tiny(name, policy)
    part = partition(plan.graph, model="test")
    write_artifacts(part, MLX, directory, weights=step_weights(model, part), progress=False)
    return model, batch, part


def assert_updated_like_torch(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Within 1e-5 of the learning rate plus 4 float32 ulps of the parameter: torch takes AdamW's
    square root with MKL's vector math, 1 ulp off the rounded root for some elements, so the
    same update is not bit for bit (targets/native/driver.cpp, Optimizer)."""
    torch.testing.assert_close(actual, expected, rtol=4 * torch.finfo(torch.float32).eps, atol=1e-5 * LR)


@pytest.mark.parametrize("name", TINY_MODELS)
@pytest.mark.parametrize("policy", ["mebp", "optimal"])
def test_native_steps_match_autograd_and_adamw(native, name, policy, tmp_path):
    """Two steps: each step's loss and gradients are autograd's at the parameters it ran on, the
    adapter is torch's AdamW stepped on those gradients, and the held bytes are the manifest's."""
    model, batch, part = export(name, policy, tmp_path / "artifacts")
    batches = [batch, random_batch(model.config.vocab_size, seed=1)]
    tokens = native_driver.write_tokens(tmp_path / "tokens.bin", [numpy_batch(b) for b in batches])
    out = tmp_path / "lora.safetensors"
    result = native_driver.run(tmp_path / "artifacts", tokens, out, optimizer="adamw", lr=LR,
                               offload_dir=str(tmp_path / "flash"), grads_dir=str(tmp_path), driver=native)

    reference = copy.deepcopy(model)
    params = lora_parameters(reference)
    optimizer = make_optimizer(params.values(), "adamw", LR)
    for step, step_batch in enumerate(batches, start=1):
        grads = load_file(tmp_path / f"step{step}.safetensors")
        native_step = SimpleNamespace(loss=torch.tensor(result.losses[step - 1]), grads=grads)
        assert_matches_autograd(native_step, autograd_reference(reference, step_batch))
        for n, p in params.items():
            p.grad = grads[n]
        optimizer.step()

    trained = copy.deepcopy(model)
    loaded = set_peft_model_state_dict(trained, load_file(out))
    assert not loaded.unexpected_keys
    for n, p in lora_parameters(trained).items():
        assert not torch.equal(p, lora_parameters(model)[n])
        assert_updated_like_torch(p.detach(), params[n].detach())

    manifest = part.manifest
    assert result.held_before_bytes == [s.held_before_bytes for s in manifest.stages]
    assert result.staged_peak_bytes == manifest.predicted_peak_bytes
    assert result.flash_bytes_written > 0 and result.flash_bytes_read == result.flash_bytes_written
    assert 0 < result.rss_anon_peak_bytes <= result.vm_hwm_bytes


def test_native_step_over_gguf_blocks_matches_autograd_on_the_decoded_model(native, tmp_path):
    """A GGUF file's Q4_1 / Q8_0 blocks (a sliced, tied head over the Q8_0 embedding): the driver
    only maps the uint8 blocks, the .mlxfn stages decode them; loss and gradients are autograd's
    on the decoded model, the adapter torch's AdamW step, the held bytes the manifest's."""
    from tests.test_gguf_blocks import compiled_gguf, write_llama_cpp_file
    from tests.test_quantize import dequantized_copy

    write_llama_cpp_file(tmp_path / "tiny.gguf", models.load("tiny-llama"))
    model, batch, plan = compiled_gguf(tmp_path / "tiny.gguf", "mebp")
    part = partition(plan.graph, model="test")
    write_artifacts(part, MLX, tmp_path / "artifacts", weights=step_weights(model, part, plan.weights),
                    progress=False)
    assert {v.dtype for v in part.manifest.values.values() if v.kind == "mapped"} == {"uint8"}
    tokens = native_driver.write_tokens(tmp_path / "tokens.bin", [numpy_batch(batch)])
    out = tmp_path / "lora.safetensors"
    result = native_driver.run(tmp_path / "artifacts", tokens, out, optimizer="adamw", lr=LR,
                               offload_dir=str(tmp_path / "flash"), grads_dir=str(tmp_path), driver=native)
    grads = load_file(tmp_path / "step1.safetensors")
    assert_matches_autograd(SimpleNamespace(loss=torch.tensor(result.losses[0]), grads=grads),
                            autograd_reference(dequantized_copy(model, plan), batch))
    params = {n: p.detach().clone().requires_grad_() for n, p in lora_parameters(model).items()}
    for n, p in params.items():
        p.grad = grads[n]
    make_optimizer(params.values(), "adamw", LR).step()
    adapter, keys = load_file(out), part.manifest.adapter_keys
    for n, p in params.items():
        assert_updated_like_torch(adapter[keys[n]], p.detach())
    assert result.held_before_bytes == [s.held_before_bytes for s in part.manifest.stages]
    assert result.staged_peak_bytes == part.manifest.predicted_peak_bytes


def test_sgd_step_is_torchs(native, tmp_path):
    model, batch, _ = export("tiny-qwen2", "mebp", tmp_path / "artifacts")
    tokens = native_driver.write_tokens(tmp_path / "tokens.bin", [numpy_batch(batch)])
    out = tmp_path / "lora.safetensors"
    native_driver.run(tmp_path / "artifacts", tokens, out, optimizer="sgd", lr=LR, grads_dir=str(tmp_path),
                      driver=native)
    params = lora_parameters(copy.deepcopy(model))
    grads = load_file(tmp_path / "step1.safetensors")
    for n, p in params.items():
        p.grad = grads[n]
    make_optimizer(params.values(), "sgd", LR).step()
    trained = copy.deepcopy(model)
    set_peft_model_state_dict(trained, load_file(out))
    for n, p in lora_parameters(trained).items():
        assert torch.equal(p, params[n])


def test_ten_native_steps_give_mebp_trains_loss_curve(native, tmp_path):
    """`mebp train`'s loop (train.train over the CPU runtime, torch's AdamW) and the native
    driver, from the same seeded model on the same ten batches of text: the same ten losses."""
    import mebp_compiler
    from mebp_compiler.app import data, models
    from mebp_compiler.app.train import train

    steps, lr = 10, 2e-3  # the CLI's default learning rate
    model = models.add_lora(models.load("tiny-qwen2", seed=0), models.LoraSettings())
    blocks = data.token_blocks(data.ByteTokenizer(), data.load_text(None), 24)
    batches = list(data.batches(blocks, 2, seed=0, steps=steps))
    plan = mebp_compiler.compile(model, batches[0], "mebp", checkpoints="disk", offload_dir=str(tmp_path / "plan"))
    part = partition(plan.graph, model="test")
    write_artifacts(part, MLX, tmp_path / "artifacts", weights=step_weights(model, part), progress=False)
    tokens = native_driver.write_tokens(tmp_path / "tokens.bin", [numpy_batch(b) for b in batches])
    result = native_driver.run(tmp_path / "artifacts", tokens, tmp_path / "lora.safetensors", optimizer="adamw",
                               lr=lr, offload_dir=str(tmp_path / "flash"), driver=native)

    history = train(plan, iter(batches), steps, make_optimizer(plan.lora_parameters().values(), "adamw", lr),
                    progress=False)
    assert len(result.losses) == len(result.step_seconds) == steps
    # Losses, not parameters: AdamW can move a parameter by up to lr where a gradient entry is
    # at rounding level, but the loss's sensitivity to that parameter is then that same
    # rounding-level entry, so the losses stay within the project's tolerance of each other.
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(history.loss), rtol=1e-5, atol=0)
    assert history.loss[-1] < history.loss[0]


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["mebp", "optimal"])
def test_smollm2_native_step_matches_autograd_and_adamw(native, smollm2, smollm2_mebp, smollm2_plan,
                                                         smollm2_float64_reference, policy, tmp_path):
    """The real SmolLM2-135M (GGUF weights, seq 16) with offload: the native step's loss and
    gradients are autograd's (float64, as tests/test_target_mlx.py holds MLX to), the adapter is
    torch's AdamW on those gradients, and the held bytes are the manifest's."""
    batch, _ = smollm2_mebp
    plan = smollm2_plan(policy)
    part = partition(plan.graph, model="smollm2-135m")
    write_artifacts(part, MLX, tmp_path / "artifacts", weights=step_weights(smollm2, part), progress=False)
    tokens = native_driver.write_tokens(tmp_path / "tokens.bin", [numpy_batch(batch)])
    out = tmp_path / "lora.safetensors"
    result = native_driver.run(tmp_path / "artifacts", tokens, out, optimizer="adamw", lr=LR,
                               offload_dir=str(tmp_path / "flash"), grads_dir=str(tmp_path), driver=native)

    grads = load_file(tmp_path / "step1.safetensors")
    native_step = SimpleNamespace(loss=torch.tensor(result.losses[0]), grads=grads)
    assert_matches_autograd(native_step, smollm2_float64_reference, tol=SMOLLM2_FLOAT64_TOLERANCE)
    params = {n: p.detach().clone().requires_grad_() for n, p in lora_parameters(smollm2).items()}
    for n, p in params.items():
        p.grad = grads[n]
    make_optimizer(params.values(), "adamw", LR).step()
    adapter = load_file(out)
    keys = part.manifest.adapter_keys
    assert set(adapter) == {keys[n] for n in params}
    for n, p in params.items():
        assert_updated_like_torch(adapter[keys[n]], p.detach())

    assert_held_as_predicted(part, plan, result)
    manifest = part.manifest
    offloaded = sum(manifest.values[n].nbytes for s in manifest.stages for n in s.offload_after)
    reloaded = sum(v.nbytes for v in manifest.values.values() if v.reload_of)
    assert result.flash_bytes_written == offloaded > 0 and result.flash_bytes_read == reloaded > 0


# ---------------------------------------------------------------- bad artifacts and inputs


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    directory = tmp_path_factory.mktemp("native")
    model, batch, part = export("tiny-llama", "mebp", directory / "artifacts")
    native_driver.write_tokens(directory / "tokens.bin", [numpy_batch(batch)])
    return directory, model.config.vocab_size, part.manifest


def run_native(native, directory, tokens, tmp_path):
    """(exit status, stderr) of the driver; it must have written no adapter and started no step."""
    out = tmp_path / "lora.safetensors"
    flash = tmp_path / "flash"
    done = subprocess.run([str(native), str(directory), "--tokens", str(tokens), "--out", str(out),
                           "--offload-dir", str(flash)], capture_output=True, text=True)
    assert not out.exists() and not (tmp_path / ".lora.tmp.safetensors").exists()
    assert not flash.exists()  # the offload store opens only once every check has passed
    return done.returncode, done.stderr


def broken_copy(artifacts, tmp_path, edit):
    """A copy of the artifacts changed by `edit(copy, manifest_data)`; the manifest is sealed again
    (consistent in itself) only if `edit` returns True."""
    directory, _, _ = artifacts
    copy_dir = tmp_path / "copy"
    shutil.copytree(directory / "artifacts", copy_dir)
    data = json.loads((copy_dir / MANIFEST_FILE).read_text())
    if edit(copy_dir, data):
        (copy_dir / MANIFEST_FILE).write_text(json.dumps(seal_json(data)))
    return copy_dir


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def truncated_stage(resealed: bool):
    def edit(copy_dir, data):
        artifact = data["stages"][1]["artifact"]
        truncate(copy_dir / artifact)
        data["files"][artifact] = sha256_path(copy_dir / artifact)
        return resealed
    return edit


def remove_weights(copy_dir, data):
    (copy_dir / data["weights_file"]).unlink()


def corrupt_weights(copy_dir, data):
    path = copy_dir / data["weights_file"]
    raw = bytearray(path.read_bytes())
    raw[safetensors_data_start(path) + 100] ^= 0x01
    path.write_bytes(bytes(raw))


def weights_header_resealed(copy_dir, data):
    path = copy_dir / data["weights_file"]
    raw = bytearray(path.read_bytes())
    raw[8:12] = b"{{{{"
    path.write_bytes(bytes(raw))
    data["files"][data["weights_file"]] = sha256_path(path)
    return True


def other_version(copy_dir, data):
    data["format_version"] = 2
    return True


def edited_unsealed(copy_dir, data):
    data["predicted_peak_bytes"] += 1
    (copy_dir / MANIFEST_FILE).write_text(json.dumps(data))


def other_stage_file(copy_dir, data):
    forward, backward = data["stages"][1]["artifact"], data["stages"][-1]["artifact"]
    shutil.copy(copy_dir / forward, copy_dir / backward)
    data["files"][backward] = sha256_path(copy_dir / backward)
    return True


@pytest.mark.parametrize("edit, message", [
    (truncated_stage(resealed=False), r"block_forward-\w+\.mlxfn does not match its SHA-256 in the manifest"),
    (truncated_stage(resealed=True), r"stage block0\.forward: MLX cannot load .*block_forward-\w+\.mlxfn"),
    (other_stage_file, r"block0\.backward: block_backward-\w+\.mlxfn has \d+ inputs, the manifest lists \d+"),
    (remove_weights, r"weights\.safetensors is missing"),
    (corrupt_weights, r"weights\.safetensors does not match its SHA-256 in the manifest"),
    (weights_header_resealed, r"weights\.safetensors cannot be read \(header: .*\); compile the artifacts again"),
    (other_version, r"manifest format version 2 is not 3, the version this driver reads"),
    (edited_unsealed, r"manifest\.json does not match its SHA-256 checksum"),
], ids=["truncated-stage", "truncated-stage-resealed", "other-stage-file", "missing-weights", "corrupt-weights",
        "corrupt-weights-header", "manifest-version", "manifest-edited"])
def test_bad_artifacts_fail_in_one_line_before_any_compute(native, artifacts, tmp_path, edit, message):
    directory, _, _ = artifacts
    status, stderr = run_native(native, broken_copy(artifacts, tmp_path, edit), directory / "tokens.bin", tmp_path)
    assert status == 1 and len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("mebp-native: error: ")
    assert re.search(message, stderr), stderr


def test_a_full_disk_fails_the_offload_in_one_line_and_writes_no_adapter(native, artifacts, tmp_path):
    """The offload file cannot grow (RLIMIT_FSIZE stands in for a full disk): the driver stops at
    its first offload with a one-line error naming the fix, and no adapter is written."""
    directory, _, manifest = artifacts
    assert any(stage.offload_after for stage in manifest.stages)

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    out = tmp_path / "lora.safetensors"
    done = subprocess.run([str(native), str(directory / "artifacts"), "--tokens", str(directory / "tokens.bin"),
                           "--out", str(out), "--offload-dir", str(tmp_path / "flash")],
                          capture_output=True, text=True, preexec_fn=small_files)
    assert done.returncode != 0
    assert len(done.stderr.strip().splitlines()) == 1
    assert re.search(r"cannot offload .*free disk space or choose another offload directory", done.stderr)
    assert not out.exists() and not (tmp_path / ".lora.tmp.safetensors").exists()


def token_file(path, ids, labels=None):
    return native_driver.write_tokens(path, [{"input_ids": ids, "labels": ids if labels is None else labels}])


@pytest.mark.parametrize("case, message", [
    ("shape", r"holds 1 batches of \[2, 23\] tokens; the artifacts were compiled for batches of \[2, 24\]"),
    ("id", r"token 5 \(input id 256, label 256\) is outside the vocabulary \[0, 256\)"),
    ("negative label", r"token 7 \(input id 1, label -1\) is outside the vocabulary"),
    ("truncated", r"is 200 bytes, its header says 800"),
    ("not tokens", r"is not a token file"),
])
def test_bad_token_files_fail_before_any_compute(native, artifacts, tmp_path, case, message):
    directory, vocab, manifest = artifacts
    ids = np.ones(manifest.batch_shape, dtype=np.int64)
    path = tmp_path / "tokens.bin"
    if case == "shape":
        token_file(path, ids[:, :-1])
    elif case == "id":
        ids.flat[5] = vocab
        token_file(path, ids)
    elif case == "negative label":
        labels = ids.copy()
        labels.flat[7] = -1
        token_file(path, ids, labels)
    elif case == "truncated":
        token_file(path, ids)
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.write_bytes(b"\0" * 64)
    status, stderr = run_native(native, directory / "artifacts", path, tmp_path)
    assert status == 1 and len(stderr.strip().splitlines()) == 1, stderr
    assert re.search(message, stderr), stderr


def test_ignored_labels_are_accepted(native, artifacts, tmp_path):
    directory, _, manifest = artifacts
    ids = np.ones(manifest.batch_shape, dtype=np.int64)
    labels = ids.copy()
    labels[:, :3] = -100
    result = native_driver.run(directory / "artifacts", token_file(tmp_path / "t.bin", ids, labels),
                               tmp_path / "lora.safetensors", driver=native)
    assert len(result.losses) == 1 and np.isfinite(result.losses[0])


def test_command_line_errors_exit_2(native, artifacts, tmp_path):
    directory, _, _ = artifacts
    done = subprocess.run([str(native), str(directory / "artifacts"), "--out", str(tmp_path / "a.safetensors")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "usage: mebp-native DIR --tokens FILE" in done.stderr
    done = subprocess.run([str(native), str(directory / "artifacts"), "--tokens", str(directory / "tokens.bin"),
                           "--out", str(tmp_path / "a.safetensors"), "--lr", "-1"], capture_output=True, text=True)
    assert done.returncode == 2 and "--lr -1: give a positive number" in done.stderr


# ---------------------------------------------------------------- through the command line


def test_cli_runs_an_mlx_directory_natively(native, tmp_path, capsys):
    """`mebp run --native` trains on the same batches as `mebp run`: the same losses, an adapter of the same keys."""
    from mebp_compiler.app.cli import main

    out = tmp_path / "out"
    assert main(["compile", "--model", "tiny-qwen2", "--seq-len", "16", "--checkpoints", "disk",
                 "--target", "mlx", "-o", str(out)]) == 0
    capsys.readouterr()
    run = ["run", str(out), "--steps", "2", "--no-progress"]
    assert main([*run, "--native", "--out", str(tmp_path / "native.safetensors")]) == 0
    native_log = capsys.readouterr().err
    assert "process peak RSS" in native_log
    assert main([*run, "--out", str(tmp_path / "python.safetensors")]) == 0
    python_log = capsys.readouterr().err
    loss = [line.split("loss ")[1].split(";")[0] for line in (native_log, python_log) if "loss " in line]
    assert loss[0] == loss[1]  # "first -> last", each to 3 decimals
    # The adapters' values are the first test's business: AdamW on gradients that differ in
    # float32 rounding moves near-zero-gradient entries by up to the learning rate.
    assert load_file(tmp_path / "native.safetensors").keys() == load_file(tmp_path / "python.safetensors").keys()


def test_cli_refuses_native_for_another_target(artifacts, tmp_path, capsys):
    from mebp_compiler.app.cli import main

    def edit(copy_dir, data):
        data["target"] = "onnx"
        return True
    out = broken_copy(artifacts, tmp_path, edit)
    assert main(["run", str(out), "--steps", "1", "--native", "--no-progress"]) == 1
    assert "--native runs MLX artifact directories" in capsys.readouterr().err


def test_a_step_with_a_padding_mask_is_refused_not_run_without_it(native, tmp_path):
    """The token file holds input_ids and labels only: a manifest whose step takes attention_mask
    fails before any compute, and a batch with a mask is not written to a token file."""
    model = lora_model("tiny-llama")
    batch = random_batch(model.config.vocab_size)
    mask = torch.ones_like(batch["input_ids"])
    mask[0, :4] = 0
    batch = {**batch, "attention_mask": mask}
    part = partition(mebp_compiler.compile(model, batch, "mebp").graph, model="test")
    write_artifacts(part, MLX, tmp_path / "artifacts", weights=step_weights(model, part), progress=False)
    with pytest.raises(ValueError, match=r"input_ids and labels only.*\['attention_mask'\]"):
        native_driver.write_tokens(tmp_path / "masked.bin", [numpy_batch(batch)])
    tokens = native_driver.write_tokens(tmp_path / "tokens.bin", [numpy_batch(
        {k: v for k, v in batch.items() if k != "attention_mask"})])
    status, stderr = run_native(native, tmp_path / "artifacts", tokens, tmp_path)
    assert status == 1 and len(stderr.strip().splitlines()) == 1, stderr
    assert "batch input 'attention_mask'" in stderr and "Python driver" in stderr


# ---------------------------------------------------------------- fused optimizer updates


def export_fused(optimizer, directory):
    """tiny-llama under mebp with disk checkpoints (it offloads), its stages applying `optimizer`
    at lr LR (tests/test_fused_export.py)."""
    from tests.test_fused_export import fused_plan

    model, batch, plan = fused_plan()
    part = partition(plan.graph, model="test", optimizer=OptimizerSettings(optimizer, lr=LR))
    write_artifacts(part, MLX, directory, weights=step_weights(model, part), progress=False)
    return model, batch, part


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_native_fused_updates_match_python_driver_and_torch_optim(native, optimizer, tmp_path):
    """Two steps of stages that apply the update themselves: the native driver's losses and adapter
    are the Python driver's on the same directory; each step's new parameters and state (written to
    --grads-dir) are the optimizer's update of autograd's gradients at the parameters the previous
    step made; the held bytes (optimizer state included) are the manifest's."""
    from tests.test_fused_export import assert_fused_step_matches_autograd

    model, batch, part = export_fused(optimizer, tmp_path / "artifacts")
    batches = [batch, random_batch(model.config.vocab_size, seq=16, seed=1)]
    tokens = native_driver.write_tokens(tmp_path / "tokens.bin", map(numpy_batch, batches))
    out = tmp_path / "lora.safetensors"
    result = native_driver.run(tmp_path / "artifacts", tokens, out, offload_dir=str(tmp_path / "flash"),
                               grads_dir=str(tmp_path), driver=native)
    assert result.optimizer == optimizer and result.lr == LR

    python = driver.Driver.open(tmp_path / "artifacts", MLX)
    python_losses = [python.train_step(numpy_batch(b)).loss for b in batches]
    # Both drivers run the same .mlxfn files through the same libmlx, but the native driver's
    # matmuls run on OpenBLAS (targets/native/blas.cpp) and this process's on the wheel's reference
    # BLAS: float32 rounding apart. SGD keeps that at rounding's size; AdamW's m / sqrt(v) does
    # not where a gradient is near zero (its sign can tip: 1.2e-2 * LR measured on one element),
    # so there the drivers agree only within what AdamW steps can move a parameter (~LR each).
    # Exactness is each native update against autograd's gradients, below.
    np.testing.assert_allclose(result.losses, python_losses, rtol=1e-6)
    keys = part.manifest.adapter_keys
    adapter = load_file(out)
    assert adapter.keys() == {keys[source] for source in python.lora_arrays()}
    for source, array in python.lora_arrays().items():
        np.testing.assert_allclose(adapter[keys[source]].numpy(), array, rtol=1e-6,
                                   atol=(2 * len(batches) if optimizer == "adamw" else 1e-7) * LR)

    settings = OptimizerSettings(optimizer, lr=LR)
    reference = copy.deepcopy(model)
    before = {n: p.detach().numpy().copy() for n, p in lora_parameters(reference).items()}
    before.update(driver.initial_optimizer_state(part.manifest))
    for step, step_batch in enumerate(batches, start=1):
        updates = {k: t.numpy() for k, t in load_file(tmp_path / f"step{step}.safetensors").items()}
        assert set(updates) == set(part.manifest.updates)
        assert abs(result.losses[step - 1] - autograd_reference(reference, step_batch)[0].item()) <= 1e-5
        assert_fused_step_matches_autograd(settings, before, updates, reference, step_batch, step)
        with torch.no_grad():  # the next step's reference runs on the parameters the stages made
            for n, p in lora_parameters(reference).items():
                p.copy_(torch.from_numpy(updates[n]))
        before = updates
    for n, p in lora_parameters(reference).items():
        assert torch.equal(adapter[keys[n]], p.detach())

    manifest = part.manifest
    assert result.held_before_bytes == [s.held_before_bytes for s in manifest.stages]
    assert result.staged_peak_bytes == manifest.predicted_peak_bytes
    assert result.flash_bytes_written > 0 and result.flash_bytes_read == result.flash_bytes_written
    # MLX's own bytes of arrays after each stage are the held bytes plus what does not change over
    # the step (the imported stages' constants): a replaced parameter or moment is freed after its
    # update, not kept by the driver to the step's end.
    extra = [active - held for active, held in zip(result.stage_mlx_active_bytes, result.held_after_bytes)]
    assert len(extra) == len(manifest.stages) and max(extra) - min(extra) <= 4096, extra


def test_native_fused_updates_refuse_other_optimizer_settings(native, tmp_path):
    """The stages' optimizer is compiled in: another one on the command line is an error, before any compute."""
    model, batch, _ = export_fused("sgd", tmp_path / "artifacts")
    tokens = native_driver.write_tokens(tmp_path / "tokens.bin", [numpy_batch(batch)])
    with pytest.raises(native_driver.NativeDriverError,
                       match=r"the stages apply sgd with lr 0\.01 .*\(compiled with fused updates\)"):
        native_driver.run(tmp_path / "artifacts", tokens, tmp_path / "lora.safetensors", optimizer="adamw",
                          driver=native)
    assert not (tmp_path / "lora.safetensors").exists()
    native_driver.run(tmp_path / "artifacts", tokens, tmp_path / "lora.safetensors", optimizer="sgd", lr=LR,
                      driver=native)  # the stages' own settings are accepted
