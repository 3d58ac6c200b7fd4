"""The MLX target: exported and re-imported `.mlxfn` stages compute what the torch stage computes."""

from __future__ import annotations

import json
import math
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import mebp_compiler
from mebp_compiler.capture import capture
from mebp_compiler.checksums import seal_json, sha256_path
from mebp_compiler.ir import Phase
from mebp_compiler.passes import quantize
from mebp_compiler.passes.partition import MANIFEST_FILE, ManifestError, partition
from mebp_compiler.targets import driver, load_target
from mebp_compiler.targets.artifacts import step_weights, write_artifacts
from tests.conftest import TINY_MODELS, assert_matches_autograd, autograd_reference, lora_model, random_batch
from tests.conftest import SMOLLM2_FLOAT64_TOLERANCE, float64_rounding_bound, probabilistic_rounding_bound
from tests.stages import block_nodes, captured_step, extract_stage, step_inputs
from tests.test_partition import (
    CountingTarget,
    as_step_result,
    assert_held_as_predicted,
    compiled_tiny,
)

pytest.importorskip("mlx.core", reason="the MLX target needs the 'mlx' extra")
from mebp_compiler.targets import mlx as mlx_target  # noqa: E402
from mebp_compiler.targets.fx_stage import UnsupportedStageOpError  # noqa: E402


def run_exported(stage, inputs, path):
    file = mlx_target.export_stage(stage, inputs, path)
    assert file.suffix == ".mlxfn" and file.stat().st_size > 0
    return [torch.from_numpy(y) for y in mlx_target.load_stage(file)([x.numpy() for x in inputs])]


def assert_outputs_close(outputs, expected, tol=1e-5):
    """Each output equals torch's: same shape and dtype, max abs diff <= tol x its largest entry.

    Both sides are float32, so they differ by at most the sum of their errors from float64.
    Over seeds and every kernel setting of this machine kind, each float32 implementation
    (torch, ONNX, MLX) stays within a fraction of 1e-5 of float64 on SmolLM2's whole step,
    whose reductions are the longest in the suite, within 1.5e-5 of float64 (bench/fp32_error.py,
    docs/tolerances.md). One stage on identical inputs carries only its own part of that error
    (a block, not 30 blocks and the loss), and the tiny stages reduce over 64-256 terms, not
    576-49,152, so the two stages' difference stays inside 1e-5.
    """
    assert len(outputs) == len(expected)
    for i, (y, ref) in enumerate(zip(outputs, expected)):
        assert y.shape == ref.shape and y.dtype == ref.dtype, f"output {i}: {y.dtype}{tuple(y.shape)}"
        if ref.dtype.is_floating_point:
            scale = max(1.0, ref.abs().max().item())
            assert (y - ref).abs().max().item() <= tol * scale, f"output {i} differs"
        else:
            assert torch.equal(y, ref), f"output {i} differs"


@pytest.mark.parametrize("name", TINY_MODELS)
def test_whole_step_matches_autograd(name, tmp_path):
    model = lora_model(name)
    batch = random_batch(model.config.vocab_size)
    graph = capture(model, batch)
    loss, *grads = run_exported(graph.module, step_inputs(model, graph, batch), tmp_path / "step")
    result = SimpleNamespace(loss=loss, grads=dict(zip(graph.outputs[1:], grads)))
    assert_matches_autograd(result, autograd_reference(model, batch))


@pytest.mark.parametrize("name", TINY_MODELS)
@pytest.mark.parametrize("phase", [Phase.FORWARD, Phase.BACKWARD])
def test_block_stage_matches_torch(name, phase, tmp_path):
    graph, values = captured_step(name, batch=2)
    stage, inputs, expected = extract_stage(graph, block_nodes(graph, 1, phase), values)
    assert_outputs_close(run_exported(stage, inputs, tmp_path / "block"), expected)


def test_chunked_head_with_int4_weights_matches_torch(tmp_path):
    model = lora_model("tiny-gemma3")
    batch = random_batch(model.config.vocab_size, seq=30)
    graph = capture(model, batch, head_chunks=3)
    weights = quantize.quantize_model_weights(model, graph, group_size=32)
    graph = quantize.rewrite_int4(graph, weights)
    state = {**dict(model.named_parameters()), **dict(model.named_buffers()), **batch, **weights.tensors}
    inputs = [state[spec.source].detach() for spec in graph.inputs]
    expected = list(graph.module(*inputs))
    assert_outputs_close(run_exported(graph.module, inputs, tmp_path / "int4"), expected)


def test_long_contraction_meets_the_rounding_bound_of_its_blocks(tmp_path):
    """An mm shaped like SmolLM2's lm_head backward (K = 49152, rows summing to ~0) errs from
    float64 by no more than the probabilistic rounding bound of blocked summation: a term
    passes through its product, at most MATMUL_BLOCK - 1 additions inside its block (in any
    order MLX's kernel takes) and at most K / MATMUL_BLOCK - 1 additions of the running sum.
    The bound follows from those lengths alone, so it holds on any CPU; the float64
    reference's own worst-case error is added to it.

    MLX's CPU matmul over the whole K erred ~10x torch's mm here and drifted SmolLM2's LoRA
    gradients to 1.1e-4 of the largest; test_smollm2_mlx_driver_matches_autograd, held to
    SMOLLM2_FLOAT64_TOLERANCE (3e-5) against float64, is the check that catches a return to it."""
    generator = torch.Generator().manual_seed(0)
    grad_logits = torch.softmax(torch.randn(16, 49152, generator=generator) * 3, dim=-1)
    grad_logits[torch.arange(16), torch.randint(0, 49152, (16,), generator=generator)] -= 1
    weight = torch.randn(49152, 64, generator=generator) * 0.05
    stage = make_fx(lambda a, b: (torch.mm(a, b),))(grad_logits, weight)
    (product,) = run_exported(stage, [grad_logits, weight], tmp_path / "mm")
    k = weight.shape[0]
    length = mlx_target.MATMUL_BLOCK + math.ceil(k / mlx_target.MATMUL_BLOCK) - 1
    bound = (probabilistic_rounding_bound(length, terms=product.numel() * k) + float64_rounding_bound(k)) \
        * (grad_logits.double().abs() @ weight.double().abs())
    error = (product.double() - grad_logits.double() @ weight.double()).abs()
    assert (error <= bound).all(), f"worst error {(error / bound).max().item():.3g} x the bound"


def test_unsupported_op_is_named(tmp_path):
    stage = make_fx(lambda x: (torch.cumprod(x, 0),))(torch.ones(3))
    with pytest.raises(UnsupportedStageOpError, match=r"aten\.cumprod\.default"):
        mlx_target.export_stage(stage, [torch.ones(3)], tmp_path / "bad")
    assert not list(tmp_path.iterdir())


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="export_stage"):
        mlx_target.load_stage(tmp_path / "absent.mlxfn")


@pytest.mark.slow
@pytest.mark.parametrize("phase", [Phase.FORWARD, Phase.BACKWARD])
def test_smollm2_block_stage_matches_torch(smollm2_step_values, phase, tmp_path):
    graph, values = smollm2_step_values
    stage, inputs, expected = extract_stage(graph, block_nodes(graph, 7, phase), values)
    assert_outputs_close(run_exported(stage, inputs, tmp_path / "block"), expected)


# ---------------------------------------------------------------- over the partition, by the manifest driver

MLX = load_target("mlx")


def numpy_batch(batch):
    return {k: v.numpy() for k, v in batch.items()}


def write_mlx(part, directory, model=None, weights=True):
    return write_artifacts(part, MLX, directory, weights=step_weights(model, part) if weights else None,
                           progress=False)


@pytest.mark.parametrize("name", TINY_MODELS)
@pytest.mark.parametrize("policy", ["mebp", "optimal"])
def test_mlx_driver_matches_autograd(name, policy, tmp_path):
    model, batch, plan = compiled_tiny(name, policy)
    part = partition(plan.graph, model="test")
    facts = write_mlx(part, tmp_path / "artifacts", model)
    run = driver.Driver.open(tmp_path / "artifacts", MLX, offload_dir=str(tmp_path / "flash"))
    result = run.step(numpy_batch(batch))
    assert_matches_autograd(as_step_result(result), autograd_reference(model, batch))
    assert_held_as_predicted(part, plan, result)
    assert result.flash_bytes_written > 0 and result.flash_bytes_read == result.flash_bytes_written
    files = sorted(p.name for p in (tmp_path / "artifacts").glob("*.mlxfn"))
    assert files == sorted(facts) == sorted(part.manifest.unique_artifacts())
    assert sum(f["stages"] for f in facts.values()) == len(part.manifest.stages)
    if policy == "mebp":  # the two blocks' forwards run one file (optimal may schedule blocks differently)
        forward = {s.artifact for s in part.manifest.stages if s.kind == "block_forward"}
        assert len(forward) == 1 and facts[forward.pop()]["stages"] == 2


@pytest.fixture(scope="module")
def mlx_artifacts(tmp_path_factory):
    model, batch, plan = compiled_tiny("tiny-llama", "mebp")
    directory = tmp_path_factory.mktemp("mlx")
    write_mlx(partition(plan.graph, model="test"), directory, model)
    return directory, batch


def edited_copy(mlx_artifacts, tmp_path, edit):
    directory, _ = mlx_artifacts
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    data = json.loads((copy / MANIFEST_FILE).read_text())
    edit(copy, data)
    (copy / MANIFEST_FILE).write_text(json.dumps(seal_json(data)))  # consistent in itself, not with its files
    return copy


def test_mlx_stage_signature_is_read_from_the_file(mlx_artifacts):
    directory, _ = mlx_artifacts
    manifest = driver.load_manifest(directory)
    stage = manifest.stages[1]
    inputs, outputs = MLX.describe_stage(directory / stage.artifact)
    assert inputs == [(manifest.values[n].shape, manifest.values[n].dtype) for n in stage.inputs]
    assert outputs == [(manifest.values[n].shape, manifest.values[n].dtype) for n in stage.outputs]


def test_mlx_manifest_of_another_shape_fails_before_compute(mlx_artifacts, tmp_path):
    def edit(copy, data):
        hidden = data["stages"][1]["inputs"][0]
        value = next(v for v in data["values"] if v["name"] == hidden)
        value["shape"] = [value["shape"][0], value["shape"][1] + 1, *value["shape"][2:]]
    target = CountingTarget(MLX)
    with pytest.raises(ManifestError, match=r"embed.forward: output 0 \(embedding\) of embed_forward-.*mlxfn is "
                                            r"float32\[2, 24, 64\], the manifest says float32\[2, 25, 64\]"):
        driver.Driver.open(edited_copy(mlx_artifacts, tmp_path, edit), target)
    assert target.calls == 0


def test_mlx_artifact_of_another_stage_fails_before_compute(mlx_artifacts, tmp_path):
    def edit(copy, data):  # block0's backward file replaced by the block forward's, its checksum too
        forward, backward = data["stages"][1]["artifact"], data["stages"][-1]["artifact"]
        shutil.copy(copy / forward, copy / backward)
        data["files"][backward] = sha256_path(copy / backward)
    target = CountingTarget(MLX)
    with pytest.raises(ManifestError, match=r"block0.backward: block_backward-.*mlxfn has \d+ inputs, the "
                                            r"manifest lists \d+; .*different compiles"):
        driver.Driver.open(edited_copy(mlx_artifacts, tmp_path, edit), target)
    assert target.calls == 0


def test_mlx_missing_artifact_fails_before_compute(mlx_artifacts, tmp_path):
    def edit(copy, data):
        (copy / data["stages"][1]["artifact"]).unlink()
    with pytest.raises(ManifestError, match="block0.forward: artifact .*block_forward-.*mlxfn is missing"):
        driver.Driver.open(edited_copy(mlx_artifacts, tmp_path, edit), CountingTarget(MLX))


def test_cli_compiles_and_runs_an_mlx_directory(tmp_path, capsys):
    from mebp_compiler.app.cli import main

    out = tmp_path / "out"
    assert main(["compile", "--model", "tiny-qwen2", "--seq-len", "16", "--checkpoints", "disk",
                 "--target", "mlx", "-o", str(out)]) == 0
    manifest = driver.load_manifest(out)
    assert manifest.target == "mlx" and all(s.artifact.endswith(".mlxfn") for s in manifest.stages)
    assert main(["run", str(out), "--steps", "2", "--no-progress", "--out", str(tmp_path / "lora.safetensors")]) == 0
    assert "manifest predicts" in capsys.readouterr().err
    assert (tmp_path / "lora.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["mebp", "optimal"])
def test_smollm2_mlx_driver_matches_autograd(smollm2, smollm2_mebp, smollm2_plan, smollm2_float64_reference, policy,
                                            tmp_path):
    batch, _ = smollm2_mebp
    plan = smollm2_plan(policy)
    part = partition(plan.graph, model="smollm2-135m")
    facts = write_mlx(part, tmp_path, weights=False)
    weights = {k: v.detach().numpy() for k, v in step_weights(smollm2, part).items()}
    result = driver.Driver.open(tmp_path, MLX, weights=weights).step(numpy_batch(batch))
    # MLX's unblocked matmul over the vocabulary erred 1.1e-4 of the largest gradient here
    # (targets/mlx.py MATMUL_BLOCK); blocked, what is left is float32 rounding.
    assert_matches_autograd(as_step_result(result), smollm2_float64_reference, tol=SMOLLM2_FLOAT64_TOLERANCE)
    assert_held_as_predicted(part, plan, result)
    assert result.flash_bytes_written > 0
    assert len(part.manifest.stages) == 63 and len(facts) <= 12  # the 30 blocks share their files
    assert max(f["stages"] for f in facts.values()) >= 15


def test_exported_head_backward_keeps_each_int4_decode_apart(tmp_path):
    """MLX's export merges equal subgraphs: the head backward decodes each vocabulary slice's
    INT4 rows twice (the recomputed forward and the backward), and merged they were one decode
    held across the whole stage. The exported graph keeps every decode of the fx stage."""
    import mlx.core as mx

    model = lora_model("tiny-llama", r=4)
    batch = random_batch(model.config.vocab_size, batch=1, seq=16)
    plan = mebp_compiler.compile(model, batch, "mebp", int4=True, group_size=32, vocab_slices=4)
    part = partition(plan.graph, model="tiny-llama", target="mlx")
    stage = next(s for s in part.stages if s.spec.kind == "head_backward")
    decodes = [n for n in stage.module.graph.nodes if n.target is quantize.dequantize_int4_rows]
    assert len(decodes) == 8  # 4 slices, each decoded for the recompute and for the backward
    values = part.manifest.values
    inputs = [torch.zeros(values[n].shape, dtype=getattr(torch, values[n].dtype)) for n in stage.spec.inputs]
    path = mlx_target.export_stage(stage.module, inputs, tmp_path / "head")
    args = [mx.array(x.numpy()) for x in inputs]
    mx.export_to_dot(str(tmp_path / "head.dot"), *mx.import_function(str(path))(*args))
    # one left shift per decode (its low nibbles' sign extension); merged decodes leave 4
    assert (tmp_path / "head.dot").read_text().count('label ="LeftShift"') >= len(decodes)


def test_exported_head_runs_in_the_plans_op_order(tmp_path):
    """An `.mlxfn` stage is one lazy graph MLX evaluates in its own order; the loss over
    vocabulary slices keeps two running chains, and MLX finished one over every slice before
    the other, so all slices' logits were live at once. Exported in the plan's op order
    (`mx.depends` edges), the head stages' MLX peak is lower and their outputs are bit for bit
    the unordered export's (the same ops on the same values). Measured on SmolLM2 (64 slices)
    by the native driver: head forward 83.3 -> 40.1 MiB, head backward 119.6 -> 49.1 MiB."""
    import mlx.core as mx

    model = lora_model("tiny-llama", r=4)
    batch = random_batch(model.config.vocab_size, batch=1, seq=32)
    plan = mebp_compiler.compile(model, batch, "mebp", int4=True, group_size=32, vocab_slices=8)
    part = partition(plan.graph, model="tiny-llama", target="mlx")
    values = part.manifest.values
    generator = torch.Generator().manual_seed(0)
    for kind in ("head_forward", "head_backward"):
        stage = next(s for s in part.stages if s.spec.kind == kind)
        inputs = [torch.rand(values[n].shape, generator=generator) + 0.5 if values[n].dtype == "float32"
                  else torch.zeros(values[n].shape, dtype=getattr(torch, values[n].dtype)) for n in stage.spec.inputs]
        args = [mx.array(x.numpy()) for x in inputs]
        mx.eval(args)
        peaks, outputs = {}, {}
        for in_order in (False, True):
            path = tmp_path / f"{kind}-{in_order}.mlxfn"
            mx.export_function(str(path), mlx_target.stage_function(stage.module, in_plan_order=in_order), *args)
            imported = mx.import_function(str(path))
            mx.synchronize()
            base = mx.get_active_memory()
            mx.reset_peak_memory()
            # Below its memory limit MLX's main thread allocates ahead of the kernels its worker
            # thread runs, so the peak would depend on the threads' timing; above it, it waits for
            # each kernel, and the peak follows the evaluation order alone.
            limit = mx.set_memory_limit(1)
            try:
                result = imported(*args)
                mx.eval(result)
            finally:
                mx.set_memory_limit(limit)
            peaks[in_order] = mx.get_peak_memory() - base
            outputs[in_order] = [np.array(y) for y in result]
            del result
        # random inputs make some of the head backward's values NaN, in torch's stage as well
        assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(outputs[False], outputs[True])), kind
        assert peaks[True] < peaks[False], f"{kind}: in plan order {peaks[True]} bytes, MLX's own {peaks[False]}"


def test_int4_linear_weight_is_decoded_in_the_layout_its_matmul_reads(tmp_path):
    """A decoded INT4 weight read only as `x @ W.t()` is decoded straight into the transposed
    layout (so the matmul's contraction blocks of `W.t()` are contiguous rows, not copies);
    the decode stays bit for bit torch's in both layouts: `eye @ W.t()` is `W.t()` exactly."""
    generator = torch.Generator().manual_seed(0)
    packed, scales = quantize.quantize_int4(torch.randn(96, 640, generator=generator), group_size=64)
    eye = torch.eye(640)

    graph = torch.fx.Graph()
    x, packed_in, scales_in = (graph.placeholder(name) for name in ("x", "packed", "scales"))
    decodes = [graph.call_function(quantize.dequantize_int4, (packed_in, scales_in)) for _ in range(2)]
    product = graph.call_function(torch.ops.aten.mm.default, (x, graph.call_function(torch.ops.aten.t.default,
                                                                                      (decodes[0],))))
    graph.output((product, decodes[1]))
    values = {"x": eye, "packed": packed, "scales": scales}
    for node in graph.nodes:  # the translation reads each value's shape and dtype from its meta
        if node.op == "placeholder":
            node.meta["val"] = values[node.name]
        elif node.op == "call_function":
            node.meta["val"] = node.target(*torch.fx.node.map_arg(node.args, lambda a: a.meta["val"]))
    stage = torch.fx.GraphModule(torch.nn.Module(), graph)
    decodes = [n for n in stage.graph.nodes if n.target is quantize.dequantize_int4]
    assert [mlx_target._read_transposed_by_matmuls(n) for n in decodes] == [True, False]
    product, decoded = run_exported(stage, [eye, packed, scales], tmp_path / "linear")
    reference = quantize.dequantize_int4(packed, scales)
    assert torch.equal(decoded, reference) and torch.equal(product, reference.t())


def test_blocked_matmul_computes_one_block_product_at_a_time():
    """`_matmul`'s blocks are chained: each block's product waits for the sum before it, so MLX
    holds one product (and one copy of its operands' blocks), not all of them, and the result
    is bit for bit the unchained running sum's (the same products and additions). Measured
    under a memory limit, as the native driver runs each stage: past it MLX waits for running
    kernels (which free their inputs) before it allocates the next op's output; without one
    it allocates ahead of the kernels either way."""
    import mlx.core as mx

    generator = torch.Generator().manual_seed(0)
    a = mx.array(torch.randn(256, 5 * mlx_target.MATMUL_BLOCK, generator=generator).numpy())
    b = mx.array(torch.randn(5 * mlx_target.MATMUL_BLOCK, 896, generator=generator).numpy())
    mx.eval(a, b)

    def unchained(a, b):
        block = mlx_target.MATMUL_BLOCK
        total = mx.matmul(a[:, :block], b[:block])
        for start in range(block, a.shape[1], block):
            total = total + mx.matmul(a[:, start:start + block], b[start:start + block])
        return total

    peaks, results = [], []
    limit = mx.set_memory_limit(1)
    try:
        for function in (unchained, mlx_target._matmul):
            mx.synchronize()
            base = mx.get_active_memory()
            mx.reset_peak_memory()
            results.append(function(a, b))
            mx.eval(results[-1])
            peaks.append(mx.get_peak_memory() - base)
    finally:
        mx.set_memory_limit(limit)
    assert mx.array_equal(results[0], results[1]).item()
    output, block_copy = results[0].nbytes, a.shape[0] * mlx_target.MATMUL_BLOCK * a.itemsize
    # chained: the sum, one block's product and the next sum, and two blocks' copies of `a`'s columns
    assert peaks[1] <= 2 * block_copy + 3 * output, f"chained {peaks[1]} bytes, output {output}"
    assert peaks[1] < peaks[0], f"chained {peaks[1]} bytes, unchained {peaks[0]}"
