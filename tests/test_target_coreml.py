"""The CoreML target: stage packages save, reload, match the stage's signature, and their MIL
translation, evaluated by value inference, equals the torch stage."""

from __future__ import annotations

import json
import platform
import shutil

import coremltools as ct
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from mebp_compiler.capture import capture
from mebp_compiler.ir import Phase, Role
from mebp_compiler.passes import quantize
from mebp_compiler.passes.partition import partition
from mebp_compiler.targets import TargetUnavailableError, driver, load_target
from mebp_compiler.targets import coreml as coreml_target
from mebp_compiler.targets.artifacts import step_weights, write_artifacts
from mebp_compiler.targets.fx_stage import UnsupportedStageOpError
from tests.conftest import TINY_MODELS, lora_model, random_batch
from tests.stages import block_nodes, captured_step, extract_stage, step_inputs
from tests.test_partition import compiled_tiny


def captured(name, **kwargs):
    model = lora_model(name)
    batch = random_batch(model.config.vocab_size, **kwargs)
    graph = capture(model, batch)
    return model, graph, step_inputs(model, graph, batch)


def block_stage(name, block, phase):
    graph, values = captured_step(name, batch=2)
    return graph, *extract_stage(graph, block_nodes(graph, block, phase), values)


def assert_checks(path, stage, inputs, **kwargs):
    report = coreml_target.check_stage(path, stage, inputs, **kwargs)
    assert report.ok, report.summary()
    assert len(report.max_error) == len(report.scale) > 0
    return report


@pytest.mark.parametrize("name", TINY_MODELS)
def test_whole_step_package_checks(name, tmp_path):
    model, graph, inputs = captured(name)
    path = coreml_target.export_stage(graph.module, inputs, tmp_path / "step")
    assert path.name == "step.mlpackage" and path.is_dir()
    report = assert_checks(path, graph.module, inputs)
    assert report.deployment_target == "CoreML7"  # iOS 17
    assert len(report.max_error) == len(graph.outputs)  # the loss and every LoRA gradient
    assert {"matmul", "softmax", "gather_along_axis"} <= set(report.package_ops)


@pytest.mark.parametrize("name", TINY_MODELS)
@pytest.mark.parametrize("phase", [Phase.FORWARD, Phase.BACKWARD])
def test_block_stage_package_checks(name, phase, tmp_path):
    _, stage, inputs, _ = block_stage(name, 1, phase)
    assert_checks(coreml_target.export_stage(stage, inputs, tmp_path / "block"), stage, inputs)


def test_fp16_compute_precision_casts_inside(tmp_path):
    _, stage, inputs, _ = block_stage("tiny-llama", 0, Phase.FORWARD)
    path = coreml_target.export_stage(stage, inputs, tmp_path / "block", precision="fp16")
    report = assert_checks(path, stage, inputs, tol=5e-3)  # inputs and outputs stay fp32
    assert report.package_ops["cast"] > 0
    assert not coreml_target.check_stage(path, stage, inputs).ok  # fp16 rounding shows at fp32's tolerance


def test_constant_weights_as_int4_blocks(tmp_path):
    graph, stage, inputs, _ = block_stage("tiny-llama", 0, Phase.FORWARD)
    weights = [p.name for p in stage.graph.nodes
               if p.op == "placeholder" and graph.info[p.name].role == Role.FROZEN and p.meta["val"].dim() == 2]
    assert weights
    with pytest.raises(ValueError, match="iOS18"):
        coreml_target.export_stage(stage, inputs, tmp_path / "int4", constants=weights, int4_block_size=32)
    path = coreml_target.export_stage(stage, inputs, tmp_path / "int4", constants=weights, int4_block_size=32,
                                      deployment_target=ct.target.iOS18)
    # The package's values use the INT4 weights: close to torch's fp32 stage, not equal to it.
    report = assert_checks(path, stage, inputs, tol=0.25, constants=weights, deployment_target=ct.target.iOS18)
    assert report.package_ops["constexpr_blockwise_shift_scale"] == len(weights)
    assert max(e / max(1.0, s) for e, s in zip(report.max_error, report.scale)) > 1e-3


def test_chunked_head_with_int4_weight_inputs(tmp_path):
    model = lora_model("tiny-gemma3")
    batch = random_batch(model.config.vocab_size, seq=30)
    graph = capture(model, batch, head_chunks=3)
    weights = quantize.quantize_model_weights(model, graph, group_size=32)
    graph = quantize.rewrite_int4(graph, weights)
    state = {**dict(model.named_parameters()), **dict(model.named_buffers()), **batch, **weights.tensors}
    inputs = [state[spec.source].detach() for spec in graph.inputs]
    assert_checks(coreml_target.export_stage(graph.module, inputs, tmp_path / "step"), graph.module, inputs)


def test_check_reports_a_package_of_another_stage(tmp_path):
    _, forward, forward_inputs, _ = block_stage("tiny-llama", 1, Phase.FORWARD)
    _, backward, backward_inputs, _ = block_stage("tiny-llama", 1, Phase.BACKWARD)
    path = coreml_target.export_stage(forward, forward_inputs, tmp_path / "forward")
    report = coreml_target.check_stage(path, backward, backward_inputs)
    assert not report.ok and any("inputs" in p for p in report.problems)


def test_unsupported_op_is_named(tmp_path):
    stage = make_fx(lambda x: (torch.cumprod(x, 0),))(torch.ones(3))
    with pytest.raises(UnsupportedStageOpError, match=r"aten\.cumprod\.default"):
        coreml_target.export_stage(stage, [torch.ones(3)], tmp_path / "bad")
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(platform.system() == "Darwin", reason="Core ML runs on macOS")
def test_load_stage_says_predict_needs_macos(tmp_path):
    with pytest.raises(RuntimeError, match="macOS"):
        coreml_target.load_stage(tmp_path / "step.mlpackage")


@pytest.mark.slow
@pytest.mark.parametrize("phase", [Phase.FORWARD, Phase.BACKWARD])
def test_smollm2_block_stage_package_checks(smollm2_step_values, phase, tmp_path):
    graph, values = smollm2_step_values
    stage, inputs, _ = extract_stage(graph, block_nodes(graph, 7, phase), values)
    assert_checks(coreml_target.export_stage(stage, inputs, tmp_path / "block"), stage, inputs)


# ---------------------------------------------------------------- over the partition

COREML = load_target("coreml")


def check_partition(model, batch, plan, directory, weights=True):
    """Export every distinct stage of the plan's partition as a package and check each one."""
    part = partition(plan.graph, model="test")
    facts = write_artifacts(part, COREML, directory, weights=step_weights(model, part) if weights else None,
                            progress=False)
    arrays = {k: v.detach().numpy() for k, v in step_weights(model, part).items()}
    arrays.update({k: v.numpy() for k, v in batch.items()})
    return part, facts, COREML.verify_artifacts(part, directory, arrays, progress=False)


def assert_every_stage_checked(part, facts, report, directory):
    assert report["ok"] and json.loads((directory / COREML.CHECK_REPORT).read_text()) == report
    assert set(report["artifacts"]) == set(facts) == set(part.manifest.unique_artifacts())
    assert sorted(n for a in report["artifacts"].values() for n in a["stages"]) == \
        sorted(s.name for s in part.manifest.stages)
    for name, entry in report["artifacts"].items():
        assert entry["deployment_target"] == "CoreML7" and entry["worst_relative_error"] <= 1e-5, name
    # Each package's declared inputs and outputs are the manifest's, in Core ML I/O form.
    driver.check_artifacts(part.manifest, directory, COREML.describe_stage, COREML.io_form)


@pytest.fixture(scope="module")
def tiny_packages(tmp_path_factory):
    """The tiny Llama's mebp partition exported as packages and checked, once for this module."""
    model, batch, plan = compiled_tiny("tiny-llama", "mebp")
    directory = tmp_path_factory.mktemp("coreml")
    return (model, batch, directory, *check_partition(model, batch, plan, directory))


def test_partition_packages_check_and_run_refuses_off_macos(tiny_packages):
    model, batch, directory, part, facts, report = tiny_packages
    assert_every_stage_checked(part, facts, report, directory)
    block = next(s for s in part.manifest.stages if s.kind == "block_forward")
    assert report["artifacts"][block.artifact]["stages"] == ["block0.forward", "block1.forward"]
    if platform.system() != "Darwin":
        with pytest.raises(TargetUnavailableError, match="Core ML predictions need macOS"):
            driver.Driver.open(directory, COREML)


def test_a_failed_check_is_reported_and_raised(tiny_packages, tmp_path):
    model, batch, directory, part, _, _ = tiny_packages
    shutil.copytree(directory, tmp_path / "copy")
    arrays = {k: v.detach().numpy() for k, v in step_weights(model, part).items()}
    arrays.update({k: v.numpy() for k, v in batch.items()})
    with pytest.raises(COREML.StageCheckFailed, match=r"of 6 CoreML stage packages failed .*coreml-check.json"):
        COREML.verify_artifacts(part, tmp_path / "copy", arrays, tol=1e-12, progress=False)
    report = json.loads((tmp_path / "copy" / COREML.CHECK_REPORT).read_text())
    assert not report["ok"] and any(not a["ok"] for a in report["artifacts"].values())


def test_cli_compiles_checks_and_refuses_to_run_a_coreml_directory(tmp_path, capsys):
    from mebp_compiler.app.cli import main

    out = tmp_path / "out"
    assert main(["compile", "--model", "tiny-qwen2", "--seq-len", "16", "--checkpoints", "disk",
                 "--target", "coreml", "-o", str(out)]) == 0
    assert json.loads((out / COREML.CHECK_REPORT).read_text())["ok"]
    assert driver.load_manifest(out).target == "coreml"
    if platform.system() != "Darwin":
        capsys.readouterr()
        assert main(["run", str(out), "--steps", "1", "--no-progress"]) == 1
        assert "Core ML predictions need macOS or iOS" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_partition_packages_check(smollm2, smollm2_mebp, tmp_path):
    batch, plan = smollm2_mebp
    part, facts, report = check_partition(smollm2, batch, plan, tmp_path, weights=False)
    assert_every_stage_checked(part, facts, report, tmp_path)
    assert len(part.manifest.stages) == 63 and len(facts) <= 12  # the 30 blocks share their packages
