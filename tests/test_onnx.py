"""The ONNX target: per-stage .onnx files run by the manifest driver equal autograd, and a
directory that does not match its manifest fails before any compute."""

from __future__ import annotations

import functools
import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from mebp_compiler.checksums import seal_json
from mebp_compiler.passes.partition import MANIFEST_FILE, ManifestError, partition
from mebp_compiler.targets import driver, load_target
from mebp_compiler.targets.artifacts import step_weights, write_artifacts
from mebp_compiler.plan import make_optimizer
from tests.conftest import (
    SMOLLM2_FLOAT64_TOLERANCE,
    TINY_MODELS,
    assert_matches_autograd,
    autograd_reference,
    flipped_byte,
    lora_model,
)
from tests.test_partition import (
    CountingTarget,
    as_step_result,
    assert_held_as_predicted,
    compiled_tiny,
)

ONNX = load_target("onnx")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """`exported(name, policy)`: (model, batch, plan, part, facts, directory) of `compiled_tiny(name,
    policy)` written as ONNX with its weights, once per module (an ONNX export costs ~3 s of
    CPU per file). Tests read the directory or copy it, never change it."""

    @functools.cache
    def export(name: str, policy: str):
        model, batch, plan = compiled_tiny(name, policy)
        part = partition(plan.graph, model="test")
        directory = tmp_path_factory.mktemp(f"onnx-{name}-{policy}")
        facts = write_artifacts(part, ONNX, directory, weights=step_weights(model, part), progress=False)
        return model, batch, plan, part, facts, directory

    return export


def numpy_batch(batch):
    return {k: v.numpy() for k, v in batch.items()}


#: Every architecture under mebp, and the optimal schedule on the one with the most ops
#: (Gemma-3). Each optimal partition is run in torch (test_partition) and by the MLX driver
#: (test_target_mlx); the ONNX target translates the same ops, at ~25 s of CPU per model.
ONNX_DRIVER_CASES = [(name, "mebp") for name in TINY_MODELS] + [("tiny-gemma3", "optimal")]


@pytest.mark.parametrize("name, policy", ONNX_DRIVER_CASES)
def test_onnx_driver_matches_autograd(exported, name, policy, tmp_path):
    model, batch, plan, part, facts, directory = exported(name, policy)
    run = driver.Driver.open(directory, ONNX, offload_dir=str(tmp_path / "flash"))
    result = run.step(numpy_batch(batch))
    assert_matches_autograd(as_step_result(result), autograd_reference(model, batch))
    assert_held_as_predicted(part, plan, result)
    assert result.flash_bytes_written > 0 and result.flash_bytes_read == result.flash_bytes_written
    files = sorted(p.name for p in directory.glob("*.onnx"))
    assert files == sorted(facts) == sorted(part.manifest.unique_artifacts())
    for path in directory.glob("*.onnx"):
        model_proto = onnx.load(str(path))
        onnx.checker.check_model(model_proto)
        assert {o.domain: o.version for o in model_proto.opset_import}[""] == ONNX.OPSET


def test_train_step_applies_adamw_like_torch(artifacts):
    """Each step's gradients equal autograd's on the parameters the step ran on, and the
    driver's update equals torch's AdamW stepped on those same gradients, bit for bit.

    The two are checked apart: AdamW divides by the root of the second moment, so where a
    gradient is near zero a float32-rounding difference in it moves a parameter by up to
    the learning rate. Parameters after steps on autograd's (slightly different) gradients
    have no tolerance that follows from the arithmetic; fed the same gradients, the update
    is the same computation and must agree exactly.
    """
    directory, batch = artifacts
    model = lora_model("tiny-llama")  # the model the artifacts were compiled from
    run = driver.Driver.open(directory, ONNX)
    run.use_optimizer("adamw", lr=1e-2)
    before = {n: a.copy() for n, a in run.lora_arrays().items()}
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = make_optimizer(lora.values(), "adamw", 1e-2)
    for _ in range(2):
        result = run.train_step(numpy_batch(batch))
        assert_matches_autograd(as_step_result(result), autograd_reference(model, batch))
        for n, p in lora.items():
            p.grad = torch.from_numpy(result.grads[n])
        optimizer.step()
        after = run.lora_arrays()
        assert all(np.array_equal(after[n], p.detach().numpy()) for n, p in lora.items())
    assert all(not np.array_equal(after[n], before[n]) for n in lora)


@pytest.fixture(scope="module")
def artifacts(exported):
    """(directory, batch) of tiny-llama's mebp artifacts, the driver test's own."""
    _, batch, _, _, _, directory = exported("tiny-llama", "mebp")
    return directory, batch


def broken_copy(artifacts, tmp_path, edit):
    """A copy whose manifest `edit` changed, sealed again: consistent in itself, but not with its files."""
    directory, batch = artifacts
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    data = json.loads((copy / MANIFEST_FILE).read_text())
    edit(copy, data)
    (copy / MANIFEST_FILE).write_text(json.dumps(seal_json(data)))
    return copy


def test_a_missing_artifact(artifacts, tmp_path):
    def edit(copy, data):
        (copy / data["stages"][1]["artifact"]).unlink()
    target = CountingTarget(ONNX)
    with pytest.raises(ManifestError, match="block0.forward: artifact .*block_forward-.*onnx is missing"):
        driver.Driver.open(broken_copy(artifacts, tmp_path, edit), target)
    assert target.calls == 0


def test_a_manifest_of_another_version(artifacts, tmp_path):
    def edit(copy, data):
        data["format_version"] = 1
    with pytest.raises(ManifestError, match="format version 1 is not 3"):
        driver.Driver.open(broken_copy(artifacts, tmp_path, edit), ONNX)


def test_a_value_of_another_shape_than_the_artifact(artifacts, tmp_path):
    def edit(copy, data):
        hidden = data["stages"][1]["inputs"][0]
        value = next(v for v in data["values"] if v["name"] == hidden)
        value["shape"] = [value["shape"][0], value["shape"][1] + 1, *value["shape"][2:]]
    with pytest.raises(ManifestError, match=r"embed.forward: output 0 \(embedding\) of embed_forward-.*onnx is "
                                            r"float32\[2, 24, 64\], the manifest says float32\[2, 25, 64\]"):
        driver.Driver.open(broken_copy(artifacts, tmp_path, edit), ONNX)


def test_an_artifact_with_other_outputs(artifacts, tmp_path):
    def edit(copy, data):
        data["stages"][1]["outputs"] = data["stages"][1]["outputs"] * 2
        data["stages"][2]["outputs"] = data["stages"][2]["outputs"] * 2
    with pytest.raises(ManifestError, match="block0.forward: .* has 1 outputs, the manifest lists 2"):
        driver.Driver.open(broken_copy(artifacts, tmp_path, edit), ONNX)


def test_weights_of_another_shape(artifacts, tmp_path):
    directory, batch = artifacts
    target = CountingTarget(ONNX)
    weights = dict(driver.load_weights(directory, driver.load_manifest(directory)))
    name = next(k for k in weights if "q_proj.base_layer" in k)
    weights[name] = np.zeros((3, 3), dtype=np.float32)
    with pytest.raises(ManifestError, match=f"frozen input '{name}' is float32\\[3, 3\\], the manifest says"):
        driver.Driver.open(directory, target, weights=weights)
    assert target.calls == 0


def test_a_batch_of_another_shape(artifacts):
    directory, batch = artifacts
    target = CountingTarget(ONNX)
    run = driver.Driver.open(directory, target)
    short = {k: v[:, :10].numpy() for k, v in batch.items()}
    with pytest.raises(ManifestError, match=r"batch input 'input_ids' is int64\[2, 10\].*compile again"):
        run.step(short)
    assert target.calls == 0
    run.step(numpy_batch(batch))
    assert target.calls == len(run.manifest.stages)


@pytest.mark.parametrize("file", ["artifact", "weights.safetensors", "manifest.json"])
def test_a_flipped_byte_in_any_file_is_refused_before_any_compute(artifacts, tmp_path, file):
    """A flipped byte in an artifact or the weights was run (losses of 4.7e23); every one is refused."""
    directory, batch = artifacts
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    manifest = driver.load_manifest(copy)
    path = copy / (manifest.stages[1].artifact if file == "artifact" else file)
    size = path.stat().st_size
    for offset in (0, 100, size // 2, size - 1):
        target = CountingTarget(ONNX)
        with flipped_byte(path, offset):
            with pytest.raises(ManifestError, match=f"{path}.*compile the artifacts again"):
                driver.Driver.open(copy, target)
        assert target.calls == 0
    driver.Driver.open(copy, ONNX).step(numpy_batch(batch))


def test_a_directory_without_manifest(tmp_path):
    with pytest.raises(ManifestError, match="has no manifest.json"):
        driver.Driver.open(tmp_path, ONNX)


def test_cli_compiles_and_runs_an_onnx_directory(tmp_path, capsys):
    from mebp_compiler.app.cli import main

    out = tmp_path / "out"
    assert main(["compile", "--model", "tiny-qwen2", "--seq-len", "16", "--checkpoints", "disk",
                 "--target", "onnx", "-o", str(out)]) == 0
    manifest = driver.load_manifest(out)
    assert manifest.target == "onnx" and manifest.model == "tiny-qwen2"
    assert (out / "weights.safetensors").is_file() and (out / "schedule.json").is_file()
    assert main(["run", str(out), "--steps", "2", "--no-progress", "--out", str(tmp_path / "lora.safetensors")]) == 0
    assert "manifest predicts" in capsys.readouterr().err
    assert (tmp_path / "lora.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["mebp", "optimal"])
def test_smollm2_onnx_driver_matches_autograd(smollm2, smollm2_mebp, smollm2_plan, smollm2_float64_reference, policy,
                                             tmp_path):
    batch, _ = smollm2_mebp
    plan = smollm2_plan(policy)
    part = partition(plan.graph, model="test")
    facts = write_artifacts(part, ONNX, tmp_path, weights=None, progress=False)
    weights = {k: v.detach().numpy() for k, v in step_weights(smollm2, part).items()}
    run = driver.Driver.open(tmp_path, ONNX, weights=weights)
    result = run.step(numpy_batch(batch))
    assert_matches_autograd(as_step_result(result), smollm2_float64_reference, tol=SMOLLM2_FLOAT64_TOLERANCE)
    assert_held_as_predicted(part, plan, result)
    assert result.flash_bytes_written > 0
    # 63 stages, a handful of files: the 30 blocks share their artifacts.
    assert len(part.manifest.stages) == 63
    assert len(list(tmp_path.glob("*.onnx"))) == len(facts) <= 12
    assert max(f["stages"] for f in facts.values()) >= 15
