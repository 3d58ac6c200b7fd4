"""The MLX target: exported and re-imported `.mlxfn` stages compute what the torch stage computes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from mebp_compiler.capture import capture
from mebp_compiler.ir import Phase
from mebp_compiler.passes import quantize
from tests.conftest import TINY_MODELS, assert_matches_autograd, autograd_reference, lora_model, random_batch
from tests.stages import block_nodes, captured_step, extract_stage, step_inputs

pytest.importorskip("mlx.core", reason="the MLX target needs the 'mlx' extra")
from mebp_compiler.targets import mlx as mlx_target  # noqa: E402
from mebp_compiler.targets.fx_stage import UnsupportedStageOpError  # noqa: E402


def run_exported(stage, inputs, path):
    file = mlx_target.export_stage(stage, inputs, path)
    assert file.suffix == ".mlxfn" and file.stat().st_size > 0
    return [torch.from_numpy(y) for y in mlx_target.load_stage(file)([x.numpy() for x in inputs])]


def assert_outputs_close(outputs, expected, tol=1e-5):
    """Each output equals torch's: same shape and dtype, max abs diff <= tol x its largest entry."""
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
def test_smollm2_block_stage_matches_torch(smollm2, phase, tmp_path):
    graph, values = captured_step(smollm2, seq=16, seed=3)
    stage, inputs, expected = extract_stage(graph, block_nodes(graph, 7, phase), values)
    assert_outputs_close(run_exported(stage, inputs, tmp_path / "block"), expected)
