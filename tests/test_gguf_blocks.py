"""A GGUF file's own Q4_1 / Q8_0 blocks as the step's frozen weights, kept byte for byte."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

import mebp_compiler
from mebp_compiler.app import models
from mebp_compiler.passes.gguf_blocks import (
    BLOCK_BYTES,
    dequantize_gguf,
    dequantize_gguf_rows,
    embedding_gguf,
    half_to_float,
)
from mebp_compiler.passes.partition import partition
from mebp_compiler.passes.quantize import WeightFileError, dequantize_int4
from mebp_compiler.plan import optimizer_state_bytes
from mebp_compiler.targets import driver, load_target
from mebp_compiler.targets.artifacts import step_weights, write_artifacts
from tests.conftest import (
    SMOLLM2_FLOAT64_TOLERANCE,
    assert_matches_autograd,
    autograd_reference,
    flipped_byte,
    lora_model,
    random_batch,
)
from tests.test_partition import INT4_STAGED_PEAK_TOLERANCE, as_step_result, assert_held_as_predicted
from tests.test_quantize import dequantized_copy, file_mapping_of

Q4_1, Q8_0 = gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0


def write_gguf(path, tensors: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]]) -> None:
    """A Llama GGUF file of float `tensors` quantized by gguf-py, by GGUF tensor name."""
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, (data, kind) in tensors.items():
        writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_llama_cpp_file(path, model) -> None:
    """`model`'s 2-D weights as llama.cpp's converter writes them: Q4_1 blocks, a Q8_0
    embedding, and the query and key rows in its rotary order (its `permute`)."""
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    tensors = {}
    for source, weight in model.named_parameters():
        if weight.dim() != 2:
            continue
        name = names.get_name(source, try_suffixes=(".weight",))
        data = weight.detach().numpy()
        role = name.split(".")[-2]
        if role in heads:
            data = data.reshape(heads[role], 2, data.shape[0] // heads[role] // 2, -1).swapaxes(1, 2)
            data = data.reshape(weight.shape)
        tensors[name] = (data, Q8_0 if name == "token_embd.weight" else Q4_1)
    write_gguf(path, tensors)


@pytest.mark.parametrize(("ggml_type", "kind"), [(Q4_1, "q4_1"), (Q8_0, "q8_0")])
def test_block_decoding_equals_gguf_py_bit_for_bit(ggml_type, kind):
    weight = np.random.default_rng(0).standard_normal((6, 96)).astype(np.float32) * np.linspace(0.1, 3, 96)
    blocks = gguf.quants.quantize(weight.astype(np.float32), ggml_type)
    reference = torch.from_numpy(gguf.quants.dequantize(blocks, ggml_type))
    decoded = dequantize_gguf(torch.from_numpy(blocks), kind)
    assert decoded.dtype == torch.float32 and torch.equal(decoded, reference)
    assert torch.equal(dequantize_gguf_rows(torch.from_numpy(blocks), kind, 2, 5), reference[2:5])
    indices = torch.tensor([[5, 0], [3, 3]])
    assert torch.equal(embedding_gguf(torch.from_numpy(blocks), kind, indices), reference[indices])


def test_half_to_float_equals_numpy_for_every_half():
    """All 65536 fp16 bit patterns (subnormals, both zeros, infinities, NaNs) from their two bytes."""
    halves = np.arange(2**16, dtype=np.uint16)
    expected = halves.view(np.float16).astype(np.float32)
    low, high = (torch.from_numpy(b.copy()) for b in halves.view(np.uint8).reshape(-1, 2).T)
    decoded = half_to_float(low, high).numpy()
    assert_same_floats(decoded, expected)


def assert_same_floats(actual: np.ndarray, expected: np.ndarray) -> None:
    """Bit for bit, except that any NaN matches any NaN (numpy and the graphs differ in payloads)."""
    nan = np.isnan(expected)
    assert actual.dtype == expected.dtype == np.float32 and np.array_equal(np.isnan(actual), nan)
    assert np.array_equal(actual[~nan].view(np.uint32), expected[~nan].view(np.uint32))


def decode_stage(kind: str) -> torch.fx.GraphModule:
    """A stage of the three GGUF ops on one weight: decoded whole, rows 2..5, rows looked up."""
    graph = torch.fx.Graph()
    blocks, indices = graph.placeholder("blocks"), graph.placeholder("indices")
    graph.output((graph.call_function(dequantize_gguf, (blocks, kind)),
                  graph.call_function(dequantize_gguf_rows, (blocks, kind, 2, 5)),
                  graph.call_function(embedding_gguf, (blocks, kind, indices))))
    return torch.fx.GraphModule(torch.nn.Module(), graph)


@pytest.mark.parametrize("target_name", ["onnx", "mlx", "coreml"])
@pytest.mark.parametrize(("ggml_type", "kind"), [(Q4_1, "q4_1"), (Q8_0, "q8_0")])
def test_target_decoding_equals_gguf_py_bit_for_bit(target_name, ggml_type, kind, tmp_path):
    """The decode as the exported graph computes it (integer ops, no byte reinterpretation), on
    blocks gguf-py quantized and on random bytes (scales of every fp16 kind, inf and NaN too).
    CoreML's saved program is evaluated by MIL value inference (`coreml.package_values`), with
    its inputs in Core ML's I/O form (int32)."""
    pytest.importorskip({"mlx": "mlx.core", "coreml": "coremltools"}.get(target_name, "onnx"))
    target = load_target(target_name)
    run = ((lambda path, inputs: target.package_values(path, [x.astype(np.int32) for x in inputs]))
           if target_name == "coreml" else (lambda path, inputs: target.load_stage(path)(inputs)))
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((6, 96)).astype(np.float32) * np.linspace(0.1, 3, 96, dtype=np.float32)
    quantized = gguf.quants.quantize(weight, ggml_type)
    random_bytes = rng.integers(0, 256, size=(64, 3 * BLOCK_BYTES[kind]), dtype=np.uint8)
    indices = np.array([[5, 0], [3, 3]])
    for name, blocks in (("quantized", quantized), ("random", random_bytes)):
        examples = [torch.zeros(blocks.shape, dtype=torch.uint8), torch.zeros(indices.shape, dtype=torch.int64)]
        path = target.export_stage(decode_stage(kind), examples, tmp_path / name)
        whole, rows, looked_up = (np.asarray(x) for x in run(path, [blocks, indices]))
        with np.errstate(invalid="ignore", over="ignore"):
            expected = gguf.quants.dequantize(blocks, ggml_type)
        assert_same_floats(whole, expected)
        assert_same_floats(rows, expected[2:5])
        assert_same_floats(looked_up, expected[indices])


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    write_llama_cpp_file(path, models.load("tiny-llama"))
    return path


@pytest.mark.parametrize("policy", ["mebp", "optimal"])
def test_step_over_gguf_blocks_equals_autograd_on_the_decoded_model(tiny_gguf, policy):
    model = lora_model("tiny-llama")
    batch = random_batch(model.config.vocab_size)
    budget = {"budget": "64MB", "work_limit": 10} if policy == "optimal" else {}
    plan = mebp_compiler.compile(model, batch, policy, int4=True, gguf_file=tiny_gguf, vocab_slices=4, **budget)
    kinds = {name.rsplit(".", 1)[-1] for name in plan.weights.tensors}
    assert kinds == {"q4_1", "q8_0"}  # every frozen weight kept as the file's blocks, none re-quantized
    assert all("mebp-int4-" in (file_mapping_of(t) or "") for t in plan.weights.tensors.values())

    decoded = dequantized_copy(model, plan)
    for (name, original), (_, restored) in zip(model.named_parameters(), decoded.named_parameters()):
        if original.dim() == 2 and not original.requires_grad:  # rows in Hugging Face order again
            assert (restored - original).norm() < 0.1 * original.norm(), name
    result = plan.step(batch)
    assert_matches_autograd(result, autograd_reference(decoded, batch))
    assert result.held_peak_bytes == plan.predicted_peak_bytes


#: Each target under each policy, not every pairing: MLX (~2 s of CPU a case) runs both
#: policies, ONNX (~20 s: an export per file) the optimal one (as test_partition's INT4 cases).
GGUF_DRIVER_CASES = [("onnx", "optimal"), ("mlx", "mebp"), ("mlx", "optimal")]


def compiled_gguf(tiny_gguf, policy: str):
    """(model, batch, plan) of tiny-llama over the blocks of `tiny_gguf`: mebp with disk checkpoints
    and a sliced head (the tied head decoded a slice of rows at a time), or optimal with offload
    at mebp's budget and the head decoded whole. Not optimal with slices: its stages hold 12.7%
    more than its op-by-op plan, with INT4 weights as with GGUF blocks (test_partition's tolerances)."""
    model = lora_model("tiny-llama")
    batch = random_batch(model.config.vocab_size)
    blocks = {"int4": True, "gguf_file": tiny_gguf}
    if policy == "mebp":
        return model, batch, mebp_compiler.compile(model, batch, "mebp", checkpoints="disk", vocab_slices=4, **blocks)
    mebp = mebp_compiler.compile(model, batch, "mebp", checkpoints="disk", **blocks)
    budget = mebp.predicted_peak_bytes + optimizer_state_bytes(model, "adamw")
    return model, batch, mebp_compiler.compile(model, batch, "optimal", budget=budget, work_limit=5, **blocks)


@pytest.mark.parametrize("target_name, policy", GGUF_DRIVER_CASES)
def test_target_driver_over_gguf_blocks_matches_autograd_on_the_decoded_model(tiny_gguf, target_name, policy,
                                                                              tmp_path):
    """The blocks travel as uint8 in the weights file and are decoded inside the stages."""
    if target_name == "mlx":
        pytest.importorskip("mlx.core", reason="the MLX target needs the 'mlx' extra")
    target = load_target(target_name)
    model, batch, plan = compiled_gguf(tiny_gguf, policy)
    part = partition(plan.graph, model="test")
    assert part.manifest.vocab_size == model.config.vocab_size
    write_artifacts(part, target, tmp_path / "artifacts", weights=step_weights(model, part, plan.weights),
                    progress=False)
    run = driver.Driver.open(tmp_path / "artifacts", target, offload_dir=str(tmp_path / "flash"))
    kinds = {name.rsplit(".", 1)[-1] for name, a in run.arrays.items() if a.dtype == np.uint8}
    assert kinds == {"q4_1", "q8_0"}
    result = run.step({k: v.numpy() for k, v in batch.items()})
    assert_matches_autograd(as_step_result(result), autograd_reference(dequantized_copy(model, plan), batch))
    assert_held_as_predicted(part, plan, result, INT4_STAGED_PEAK_TOLERANCE)  # mapped blocks: not held
    manifest = part.manifest
    offloaded = sum(manifest.values[n].nbytes for s in manifest.stages for n in s.offload_after)
    reloaded = sum(v.nbytes for v in manifest.values.values() if v.reload_of)
    assert result.flash_bytes_written == offloaded > 0 and result.flash_bytes_read == reloaded > 0


def test_a_gguf_file_of_another_model_or_not_gguf_at_all_fails_before_training(tiny_gguf, tmp_path):
    model = lora_model("tiny-llama")
    batch = random_batch(model.config.vocab_size)
    other = tmp_path / "other.gguf"
    write_gguf(other, {"blk.0.ffn_up.weight": (np.ones((32, 64), np.float32), Q4_1)})
    with pytest.raises(WeightFileError, match="the model has"):
        mebp_compiler.compile(model, batch, "mebp", int4=True, gguf_file=other)
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(tiny_gguf.read_bytes()[:100])
    with pytest.raises(WeightFileError, match="broken.gguf"):
        mebp_compiler.compile(model, batch, "mebp", int4=True, gguf_file=broken)
    with pytest.raises(ValueError, match="int4=True"):
        mebp_compiler.compile(model, batch, "mebp", gguf_file=tiny_gguf)


def test_a_flipped_byte_in_a_weight_file_of_gguf_blocks_is_refused(tiny_gguf, tmp_path):
    """The blocks go to the same sealed weight file as INT4 weights do."""
    model = lora_model("tiny-llama")
    batch = random_batch(model.config.vocab_size)
    path = tmp_path / "blocks.safetensors"
    mebp_compiler.compile(model, batch, "mebp", int4=True, gguf_file=tiny_gguf, weights_file=str(path))
    with flipped_byte(path, path.stat().st_size - 100):
        with pytest.raises(WeightFileError, match=f"{path}: it does not match its SHA-256"):
            mebp_compiler.compile(model, batch, "mebp", int4=True, gguf_file=tiny_gguf, weights_file=str(path))


def test_weights_missing_from_the_gguf_file_are_quantized_to_int4(tmp_path):
    model = lora_model("tiny-llama")
    batch = random_batch(model.config.vocab_size)
    partial = tmp_path / "partial.gguf"
    up = dict(model.named_parameters())["base_model.model.model.layers.0.mlp.up_proj.base_layer.weight"]
    write_gguf(partial, {"blk.0.ffn_up.weight": (up.detach().numpy(), Q4_1)})
    plan = mebp_compiler.compile(model, batch, "mebp", int4=True, group_size=32, gguf_file=partial)
    assert list(name for name in plan.weights.tensors if name.endswith(".q4_1")) == [
        "base_model.model.model.layers.0.mlp.up_proj.base_layer.weight.q4_1"]
    assert any(n.target is dequantize_int4 for n in plan.graph.nodes())
    assert_matches_autograd(plan.step(batch), autograd_reference(dequantized_copy(model, plan), batch))


def test_cli_refuses_gguf_blocks_for_a_model_without_a_gguf_file(tmp_path, capsys):
    from mebp_compiler.app.cli import main

    assert main(["train", "--model", "tiny-llama", "--steps", "1", "--seq-len", "16", "--gguf-blocks",
                 "--out", str(tmp_path), "--no-progress"]) != 0
    assert "tiny-llama is not loaded from one (give smollm2-135m or a .gguf file)" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_step_over_its_own_q4_1_blocks_equals_autograd_on_the_model_as_loaded(smollm2):
    """No re-quantization: the blocks decode to exactly the weights transformers loaded."""
    batch = random_batch(smollm2.config.vocab_size, batch=1, seq=32, seed=7)
    plan = mebp_compiler.compile(smollm2, batch, "mebp", int4=True, gguf_file=models.smollm2_gguf_path(),
                                 vocab_slices=8)
    kinds = [name.rsplit(".", 1)[-1] for name in plan.weights.tensors]
    assert kinds.count("q4_1") == 210 and kinds.count("q8_0") == 1 and len(kinds) == 211
    params = dict(smollm2.named_parameters())
    for source in plan.weights.sources:
        encoding = plan.weights.encoding(source)
        decoded = encoding.dequantize(*(plan.weights.tensors[n] for n in encoding.tensor_names), *encoding.constants)
        assert torch.equal(decoded, params[source]), source
    result = plan.step(batch)
    assert_matches_autograd(result, autograd_reference(smollm2, batch))
    assert result.held_peak_bytes == plan.predicted_peak_bytes



@pytest.fixture(scope="module")
def smollm2_gguf_plan(smollm2, smollm2_mebp):
    """SmolLM2-135M over its own Q4_1 / Q8_0 blocks, mebp with disk checkpoints and a sliced head,
    on the `smollm2_mebp` batch (seq 16), whose float64 autograd is `smollm2_float64_reference`."""
    batch, _ = smollm2_mebp
    return mebp_compiler.compile(smollm2, batch, "mebp", checkpoints="disk", int4=True,
                                 gguf_file=models.smollm2_gguf_path(), vocab_slices=8)


@pytest.mark.slow
@pytest.mark.parametrize("target_name", ["onnx", "mlx"])
def test_smollm2_artifacts_over_its_own_blocks_match_autograd(smollm2, smollm2_mebp, smollm2_gguf_plan,
                                                              smollm2_float64_reference, target_name, tmp_path):
    """The real model's blocks decoded in ONNX and MLX stages: the step is float64 autograd's on the
    model as transformers loaded it (the blocks decode to its weights bit for bit)."""
    if target_name == "mlx":
        pytest.importorskip("mlx.core", reason="the MLX target needs the 'mlx' extra")
    target = load_target(target_name)
    batch, _ = smollm2_mebp
    plan = smollm2_gguf_plan
    part = partition(plan.graph, model="smollm2-135m")
    write_artifacts(part, target, tmp_path / "artifacts", weights=step_weights(smollm2, part, plan.weights),
                    progress=False)
    run = driver.Driver.open(tmp_path / "artifacts", target, offload_dir=str(tmp_path / "flash"))
    assert sum(a.dtype == np.uint8 for a in run.arrays.values()) == 211  # 210 Q4_1 weights, the Q8_0 embedding
    result = run.step({k: v.numpy() for k, v in batch.items()})
    assert_matches_autograd(as_step_result(result), smollm2_float64_reference, tol=SMOLLM2_FLOAT64_TOLERANCE)
    assert_held_as_predicted(part, plan, result, INT4_STAGED_PEAK_TOLERANCE)


def test_coreml_packages_over_gguf_blocks_check(tiny_gguf, tmp_path):
    """Every package of a plan over GGUF blocks (the tied head over vocabulary slices, each
    slice's rows decoded on their own) equals its torch stage by MIL value inference, as
    tests/test_target_coreml.py checks the float and INT4 ones."""
    pytest.importorskip("coremltools", reason="the CoreML target needs coremltools")
    coreml = load_target("coreml")
    model = lora_model("tiny-llama")
    batch = random_batch(model.config.vocab_size)
    plan = mebp_compiler.compile(model, batch, "mebp", checkpoints="disk", int4=True, gguf_file=tiny_gguf,
                                 vocab_slices=3)
    part = partition(plan.graph, model="test")
    assert any(n.target is dequantize_gguf_rows for s in part.stages for n in s.module.graph.nodes)
    weights = step_weights(model, part, plan.weights)
    write_artifacts(part, coreml, tmp_path, weights=weights, progress=False)
    arrays = {k: v.detach().numpy() for k, v in weights.items()} | {k: v.numpy() for k, v in batch.items()}
    report = coreml.verify_artifacts(part, tmp_path, arrays, progress=False)
    assert report["ok"] and set(report["artifacts"]) == set(part.manifest.unique_artifacts())
    assert all(a["worst_relative_error"] <= 1e-5 for a in report["artifacts"].values())
