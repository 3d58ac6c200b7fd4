"""The CoreML target: stage packages save, reload, match the stage's signature, and their MIL
translation, evaluated by value inference, equals the torch stage."""

from __future__ import annotations

import functools
import json
import platform
import shutil
import types
import warnings

import coremltools as ct
from coremltools.converters.mil.frontend.milproto.load import load as load_milproto
import numpy as np
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import mebp_compiler
from mebp_compiler.capture import capture
from mebp_compiler.ir import Phase, Role
from mebp_compiler.passes import quantize
from mebp_compiler.passes.partition import partition
from mebp_compiler.targets import TargetUnavailableError, driver, load_target
from mebp_compiler.targets import coreml as coreml_target
from mebp_compiler.targets.artifacts import recorded_stage_inputs, step_weights, write_artifacts
from mebp_compiler.targets.fx_stage import UnsupportedStageOpError
from tests.conftest import TINY_MODELS, assert_matches_autograd, autograd_reference, lora_model, random_batch
from tests.stages import block_nodes, captured_step, extract_stage, step_inputs
from tests.test_partition import (INT4_STAGED_PEAK_TOLERANCE, STAGED_PEAK_TOLERANCE, as_step_result,
                                  assert_held_as_predicted, compiled_tiny)
from tests.test_quantize import dequantized_copy


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
    # fp16's unit roundoff is 2^-11 (4.9e-4); the tolerance is 10 of it. Value inference runs
    # the fp16 program in numpy, which computes float16 in software without BLAS, so the
    # error is the same on any CPU: 9.6e-4 of the largest output here, 2.6e-3 at most over
    # the three tiny models' forward blocks (docs/tolerances.md). Inputs and outputs stay fp32.
    report = assert_checks(path, stage, inputs, tol=5e-3)
    assert report.package_ops["cast"] > 0
    assert not coreml_target.check_stage(path, stage, inputs).ok  # fp16 rounding shows at fp32's tolerance


def package_weights(path) -> list[torch.Tensor]:
    """The values of a saved package's compressed weights, decompressed by coremltools."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ct.models.MLModel(str(path), skip_model_load=True)
        spec = model.get_spec()
        program = load_milproto(spec, spec.specificationVersion, model.weights_dir)
    return [torch.from_numpy(op.materialized_val_inference().astype("float32"))
            for op in program.functions["main"].operations if op.op_type.startswith("constexpr_")]


def nearest_weight(weight: torch.Tensor, decoded: list[torch.Tensor]) -> torch.Tensor:
    """Of the package's decoded weights (some stored transposed), the one closest to `weight`."""
    candidates = [c for d in decoded for c in (d, d.T) if c.shape == weight.shape]
    return min(candidates, key=lambda d: (d - weight).abs().max().item())


def test_constant_weights_as_int4_blocks(tmp_path):
    graph, stage, inputs, _ = block_stage("tiny-llama", 0, Phase.FORWARD)
    weights = [p.name for p in stage.graph.nodes
               if p.op == "placeholder" and graph.info[p.name].role == Role.FROZEN and p.meta["val"].dim() == 2]
    assert weights
    with pytest.raises(ValueError, match="iOS18"):
        coreml_target.export_stage(stage, inputs, tmp_path / "int4", constants=weights, int4_block_size=32)
    path = coreml_target.export_stage(stage, inputs, tmp_path / "int4", constants=weights, int4_block_size=32,
                                      deployment_target=ct.target.iOS18)
    decoded = package_weights(path)
    assert len(decoded) == len(weights)
    names = [p.name for p in stage.graph.nodes if p.op == "placeholder"]
    on_int4 = [nearest_weight(x, decoded) if name in weights else x for name, x in zip(names, inputs)]
    assert all(not torch.equal(q, x) for name, q, x in zip(names, on_int4, inputs) if name in weights)
    # Against the torch stage on the package's own INT4 weights the package differs by float32
    # rounding alone, so the project's float32 tolerance applies (docs/tolerances.md); only
    # the stage's outputs that are transposes of a weight (kept for the backward) are the
    # stored full-precision constant, equal to the original weight.
    on_original = coreml_target.check_stage(path, stage, inputs, constants=weights, deployment_target=ct.target.iOS18)
    on_package = coreml_target.check_stage(path, stage, on_int4, constants=weights, deployment_target=ct.target.iOS18)
    outputs = next(n for n in stage.graph.nodes if n.op == "output").args[0]
    weight_views = [o.op == "call_function" and o.args[0].name in weights for o in outputs]
    assert any(weight_views) and not all(weight_views)
    for output, is_weight_view, original, package, scale in zip(
            outputs, weight_views, on_original.max_error, on_package.max_error, on_package.scale):
        if is_weight_view:
            assert original == 0, output.name
        else:
            assert package <= 1e-5 * max(1.0, scale), output.name
    assert on_package.package_ops["constexpr_blockwise_shift_scale"] == len(weights)


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


def test_min_max_clamp_and_gather_with_a_shorter_index(tmp_path):
    def stage(x, y, index):
        return (torch.maximum(x, y), torch.minimum(x, y), torch.clamp(x, -0.5, 0.5), torch.clamp_max(x, 0.1),
                torch.gather(x, 1, index))  # index shorter than x off dim 1: gather_along_axis needs a slice

    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(4, 5, generator=generator), torch.randn(4, 5, generator=generator),
              torch.randint(0, 5, (3, 2), generator=generator)]
    traced = make_fx(stage)(*inputs)
    report = assert_checks(coreml_target.export_stage(traced, inputs, tmp_path / "ops"), traced, inputs)
    assert report.max_error == [0.0] * 5


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


# ---------------------------------------------------------------- vocabulary slices

#: The CoreML target with each package evaluated by MIL value inference instead of by Core ML
#: (`coreml.value_inference_stage`): a target `driver.Driver.open` runs here.
VALUE_INFERENCE = types.SimpleNamespace(load_stage=COREML.value_inference_stage,
                                        describe_stage=COREML.describe_stage, io_form=COREML.io_form)


@functools.lru_cache(maxsize=2)
def sliced_plan(name: str, int4: bool):
    """(model, batch, plan, partition) of a tiny config under mebp (disk checkpoints) with its
    head and loss over 3 vocabulary slices; INT4 weights with group size 32 if `int4`. Do not mutate."""
    model = lora_model(name)
    batch = random_batch(model.config.vocab_size, seq=16)
    quantized = {"int4": True, "group_size": 32} if int4 else {}
    plan = mebp_compiler.compile(model, batch, "mebp", checkpoints="disk", vocab_slices=3, **quantized)
    return model, batch, plan, partition(plan.graph, model="test")


@pytest.mark.parametrize("name, int4", [("tiny-llama", False), ("tiny-gemma3", True)])
def test_vocab_sliced_step_from_the_packages_matches_autograd(name, int4, tmp_path):
    """The sliced head and loss (running max, clamp, gather; tiny Gemma-3: softcapped logits'
    tanh, and its INT4 head decoded one slice of rows at a time): the driver runs every saved
    package by MIL value inference as the manifest says, and the step's loss and LoRA
    gradients equal plain autograd's; `mebp compile`'s per-package check passes too."""
    model, batch, plan, part = sliced_plan(name, int4)
    weights = step_weights(model, part, plan.weights)
    facts = write_artifacts(part, COREML, tmp_path, weights=weights, progress=False)
    head = next(s for s in part.manifest.stages if s.kind == "head_forward")
    _, emitted = COREML.build_program(part.unique_stages()[head.signature].module)
    assert {"maximum", "minimum", "gather_along_axis", "reduce_max"} <= set(emitted)
    result = driver.Driver.open(tmp_path, VALUE_INFERENCE).step({k: v.numpy() for k, v in batch.items()})
    reference = dequantized_copy(model, plan) if int4 else model
    assert_matches_autograd(as_step_result(result), autograd_reference(reference, batch))
    assert_held_as_predicted(part, plan, result, INT4_STAGED_PEAK_TOLERANCE if int4 else STAGED_PEAK_TOLERANCE)
    arrays = {k: v.detach().numpy() for k, v in weights.items()} | {k: v.numpy() for k, v in batch.items()}
    report = COREML.verify_artifacts(part, tmp_path, arrays, progress=False)
    assert_every_stage_checked(part, facts, report, tmp_path)


def sliced_loss_stage(tokens: int = 32, width: int = 64, vocab: int = 256, slices: int = 3):
    """The vocabulary-sliced loss's forward and backward alone, traced to ATen ops as `capture`
    traces them: (hidden, head weight, labels) -> (summed loss, gradient of hidden), and example
    inputs (hidden ~ N(0, 1), weight ~ N(0, 0.05^2), a quarter of the labels ignored)."""
    from mebp_compiler.sliced_loss import IGNORE_INDEX, sliced_linear_cross_entropy

    def step(hidden, weight, labels):
        hidden = hidden.detach().requires_grad_()
        loss = sliced_linear_cross_entropy(hidden, weight, labels, slices)
        return loss, torch.autograd.grad(loss, hidden)[0]

    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, vocab, (tokens,), generator=generator)
    labels[::4] = IGNORE_INDEX
    inputs = [torch.randn(tokens, width, generator=generator),
              torch.randn(vocab, width, generator=generator) * 0.05, labels]
    return make_fx(step, tracing_mode="fake")(*inputs), inputs  # fake: as capture traces (no label check)


@pytest.mark.parametrize("precision, tol", [("fp32", 1e-5), ("fp16", 5e-3)])
def test_sliced_loss_forward_and_backward(precision, tol, tmp_path):
    """The sliced loss's ops (running max, clamp, gather, the labels' masks) at fp32 and, like the
    forward blocks above, at fp16 compute precision (tolerance 5e-3, ten fp16 unit roundoffs)."""
    stage, inputs = sliced_loss_stage()
    ops = {str(n.target) for n in stage.graph.nodes if n.op == "call_function"}
    assert {"aten.maximum.default", "aten.clamp.default", "aten.clamp_min.default", "aten.gather.default"} <= ops
    path = coreml_target.export_stage(stage, inputs, tmp_path / "loss", precision=precision)
    report = assert_checks(path, stage, inputs, tol=tol)
    assert all(e <= tol * s for e, s in zip(report.max_error, report.scale))  # of its own scale, not of max(1, it)
    assert (report.package_ops["cast"] > 0) == (precision == "fp16")


def test_fp16_vocab_sliced_head_forward(tmp_path):
    """The tiny Llama's sliced head forward at fp16 compute precision, on the values it gets in
    the step, within the forward blocks' fp16 tolerance. (Its head backward is not: at fp16 the
    final RMSNorm's backward overflows, an rsqrt of 41.6 cubed being 7.2e4 > 65504, sliced or not.)"""
    model, batch, plan, part = sliced_plan("tiny-llama", False)
    arrays = {k: v.detach().numpy() for k, v in step_weights(model, part).items()}
    recorded = recorded_stage_inputs(part, arrays | {k: v.numpy() for k, v in batch.items()})
    signature, stage = next((sig, s) for sig, s in part.unique_stages().items() if s.spec.kind == "head_forward")
    inputs = [torch.from_numpy(np.require(a, requirements="W")) for a in recorded[signature]]
    path = coreml_target.export_stage(stage.module, inputs, tmp_path / "head", precision="fp16")
    assert assert_checks(path, stage.module, inputs, tol=5e-3).package_ops["cast"] > 0
