"""peft's placement options (issue 14.5): `target_modules="all-linear"`, `layers_to_transform` and
`modules_to_save` compile exactly under every policy, or are refused before tracing."""

from __future__ import annotations

import functools
import json

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

import mebp_compiler
from mebp_compiler.app import models
from mebp_compiler.app.cli import main
from mebp_compiler.app.train import make_optimizer, save_adapter
from mebp_compiler.capture import CaptureError
from mebp_compiler.device import DeviceProfile
from mebp_compiler.offload import OffloadStore
from mebp_compiler.passes.partition import partition, peft_key
from mebp_compiler.passes.policies import least_feasible_budget, scheduling_problem
from mebp_compiler.plan import optimizer_state_bytes
from mebp_compiler.targets import driver, load_target
from mebp_compiler.targets.artifacts import step_weights, write_artifacts
from tests.conftest import assert_matches_autograd, autograd_reference, random_batch, randomize_lora_b
from tests.test_exactness import assert_held_matches_prediction
from tests.test_partition import as_step_result, step_arrays

POLICIES = ("none", "mebp", "optimal")
PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def placed_model(name: str, blocks: int = 2, tie: bool = True, **placement) -> torch.nn.Module:
    """The tiny config `name` with `blocks` blocks (tied head or not), LoRA r=4 placed by
    `placement` (`models.LoraSettings` fields), lora_B random and modules to save perturbed,
    so every gradient is non-zero and a copy that is not the trained one would show."""
    config = models.config(name)
    config.num_hidden_layers, config.tie_word_embeddings = blocks, tie
    torch.manual_seed(0)
    model = models.add_lora(AutoModelForCausalLM.from_config(config).train(),
                            models.LoraSettings(r=4, alpha=8, **placement))
    randomize_lora_b(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".modules_to_save." in name:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.01)
    return model


def compiled(model, batch, policy: str):
    """`mebp_compiler.compile` under `policy`; "optimal" at a budget below mebp's plan (so it
    must decide other than MeBP) and above the least one."""
    if policy != "optimal":
        return mebp_compiler.compile(model, batch, policy)
    mebp = mebp_compiler.compile(model, batch, "mebp")
    device = DeviceProfile.load("iphone15promax")
    least = least_feasible_budget(mebp.captured, device, work_limit=5)
    assert least < mebp.predicted_peak_bytes
    budget = (least + mebp.predicted_peak_bytes) // 2 + optimizer_state_bytes(model, "adamw")
    return mebp_compiler.compile(model, batch, "optimal", budget=budget, work_limit=5)


def assert_exact(model, policy: str, seq: int = 16):
    batch = random_batch(model.config.vocab_size, seq=seq)
    plan = compiled(model, batch, policy)
    result = plan.step(batch)
    assert_matches_autograd(result, autograd_reference(model, batch))
    assert_held_matches_prediction(plan, result)
    return plan, result


def trained_modules(model) -> set[str]:
    return {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in model.named_parameters()
            if p.requires_grad and ".lora_" in n}


def test_all_linear_targets_every_linear_layer_but_the_head():
    model = placed_model("tiny-qwen2", target_modules=models.ALL_LINEAR)
    assert trained_modules(model) == PROJECTIONS
    assert models.linear_layer_names(models.load("tiny-qwen2")) == sorted(PROJECTIONS)


@pytest.mark.parametrize("policy", POLICIES)
def test_all_linear_matches_autograd(policy):
    assert_exact(placed_model("tiny-qwen2", target_modules=models.ALL_LINEAR), policy)


@functools.cache
def lora_on_blocks(blocks: tuple[int, ...]):
    """4 blocks, LoRA on every linear layer of `blocks` only (do not mutate)."""
    return placed_model("tiny-llama", blocks=4, target_modules=models.ALL_LINEAR, layers_to_transform=blocks)


def test_layers_to_transform_puts_lora_in_those_blocks_only():
    model = lora_on_blocks((1, 3))
    blocks = {int(n.split(".layers.")[1].split(".")[0]) for n, p in model.named_parameters() if p.requires_grad}
    assert blocks == {1, 3} and trained_modules(model) == PROJECTIONS


@pytest.mark.parametrize("policy", POLICIES)
def test_lora_on_some_blocks_matches_autograd_and_unequal_blocks_are_told_apart(policy):
    """LoRA on blocks 0 and 2 of 4: the scheduler ties the decisions of equal blocks only, and
    here only blocks 1 and 3 (no LoRA, an input gradient to pass on) are equal. Block 0 needs
    no input gradient, block 2 does, so neither LoRA block is equal to the other."""
    model = lora_on_blocks((0, 2))
    plan, _ = assert_exact(model, policy)
    problem = scheduling_problem(plan.captured, DeviceProfile.load("iphone15promax"))
    block_of = {v: plan.captured.info[v].block for v in problem.decidable}
    assert [sorted(block_of[block[0]] for block in blocks) for blocks in problem.equal_blocks] == [[1, 3]]


@pytest.mark.parametrize("policy", ["mebp", "optimal"])
def test_lora_on_some_blocks_partitions_exactly(policy):
    """LoRA on blocks 1 and 3 of 4: stages run by the manifest equal autograd. Block 0 has no
    LoRA and nothing before it trains, so it has no backward stage. Under MeBP (whose forward
    stages keep nothing but the block boundary) the blocks without LoRA share their forward
    artifact, one the LoRA blocks do not use; an optimal plan may keep other tensors in each."""
    model = lora_on_blocks((1, 3))
    batch = random_batch(model.config.vocab_size, seq=16)
    plan = compiled(model, batch, policy)
    part = partition(plan.graph)
    result = driver.run_stages(part.manifest, driver.torch_stage_fns(part), step_arrays(model, part, batch),
                               OffloadStore())
    assert_matches_autograd(as_step_result(result), autograd_reference(model, batch))
    stages = {s.name: s for s in part.manifest.stages}
    assert "block0.backward" not in stages and "block1.backward" in stages
    if policy == "mebp":
        assert stages["block0.forward"].artifact == stages["block2.forward"].artifact
    assert stages["block1.forward"].artifact != stages["block2.forward"].artifact


#: (config, tied head, modules_to_save, weights trained in full): a tied head (one copy shared
#: with the embedding), an untied head and embedding, and a norm inside each of the 2 blocks.
TRAINED_IN_FULL = [("tiny-llama", True, ("lm_head",), 1), ("tiny-qwen2", False, ("lm_head", "embed_tokens"), 2),
                   ("tiny-gemma3", True, ("post_attention_layernorm",), 2)]


@pytest.mark.parametrize("name,tie,modules,count", TRAINED_IN_FULL)
@pytest.mark.parametrize("policy", POLICIES)
def test_modules_to_save_train_in_full_and_match_autograd(name, tie, modules, count, policy):
    model = placed_model(name, tie=tie, target_modules=("q_proj", "v_proj"), modules_to_save=modules)
    _, result = assert_exact(model, policy)
    assert len([n for n in result.grads if ".modules_to_save." in n]) == count


def test_a_tied_head_to_save_stays_tied_to_the_embedding():
    model = placed_model("tiny-llama", target_modules=("q_proj",), modules_to_save=("lm_head",))
    base = model.get_base_model()
    head, embed = base.get_output_embeddings(), base.get_input_embeddings()
    assert head.weight is embed.weight and head.weight.requires_grad


def test_a_trainable_head_with_vocab_slices_is_refused_naming_modules_to_save():
    model = placed_model("tiny-llama", target_modules=("q_proj",), modules_to_save=("lm_head",))
    batch = random_batch(model.config.vocab_size)
    with pytest.raises(CaptureError, match="trainable LM head.*modules_to_save"):
        mebp_compiler.compile(model, batch, "mebp", vocab_slices=4)


def test_placement_options_that_name_nothing_are_refused():
    with pytest.raises(ValueError, match="layers_to_transform.*2"):
        models.add_lora(models.load("tiny-llama"), models.LoraSettings(layers_to_transform=(0, 2)))
    with pytest.raises(ValueError, match="modules_to_save 'lm_haed' matches no module"):
        models.add_lora(models.load("tiny-llama"), models.LoraSettings(modules_to_save=("lm_haed",)))


def test_the_adapter_holds_the_modules_trained_in_full(tmp_path):
    """One optimizer step of a compiled plan, saved: peft loads the trained embedding copy (and
    the LoRA weights) back onto a fresh base, under the keys the manifest names them by."""
    model = placed_model("tiny-qwen2", tie=False, target_modules=("q_proj",), modules_to_save=("embed_tokens",))
    batch = random_batch(model.config.vocab_size)
    plan = mebp_compiler.compile(model, batch, "mebp")
    lora = plan.lora_parameters()
    optimizer = make_optimizer(lora.values(), "sgd", lr=0.5)
    for name, grad in plan.step(batch).grads.items():
        lora[name].grad = grad
    optimizer.step()
    save_adapter(model, tmp_path / "adapter")
    config = models.config("tiny-qwen2")
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    reloaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_config(config), str(tmp_path / "adapter"))
    got = dict(reloaded.named_parameters())
    assert any(".modules_to_save." in n for n in lora)
    assert all(torch.equal(got[n], p) for n, p in lora.items())
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert {peft_key(n) for n in lora} <= set(saved)


def test_cli_train_places_lora_and_saves_modules(tmp_path):
    code = main(["train", "--model", "tiny-llama", "--seq-len", "16", "--steps", "2", "--no-progress",
                 "--lora-targets", "all-linear", "--lora-layers", "1", "--modules-to-save", "lm_head",
                 "--out", str(tmp_path)])
    assert code == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [1]
    assert set(config["target_modules"]) == PROJECTIONS
    assert config["modules_to_save"] and config["ensure_weight_tying"]


def test_cli_refuses_blocks_the_model_lacks(capsys):
    assert main(["train", "--model", "tiny-llama", "--steps", "1", "--lora-layers", "0-3"]) == 2
    err = capsys.readouterr().err
    assert "layers_to_transform" in err and "Traceback" not in err


#: Each target's export of a step whose embedding or head trains in full: (target, module, tied
#: head). A head tied to the embedding trains the embedding's copy (MLX translates its
#: embedding backward); ONNX exports cost ~3 s of CPU per stage file, so one ONNX case.
EXPORTED_MODULES = [("mlx", "embed_tokens", False), ("mlx", "lm_head", True), ("onnx", "lm_head", False)]


@pytest.mark.parametrize("target_name, module, tie", EXPORTED_MODULES)
def test_a_module_trained_in_full_exports_and_its_gradient_equals_autograd(target_name, module, tie, tmp_path):
    """The exported stages return the full copy's gradient (as the CPU runtime does) under the
    key peft's adapter file gives it, so `mebp run --out` writes what peft loads."""
    model = placed_model("tiny-llama", tie=tie, target_modules=("q_proj", "v_proj"), modules_to_save=(module,))
    batch = random_batch(model.config.vocab_size, seq=16)
    plan = mebp_compiler.compile(model, batch, "mebp")
    part = partition(plan.graph, model="test", target=target_name)
    target = load_target(target_name)
    write_artifacts(part, target, tmp_path / "artifacts", weights=step_weights(model, part), progress=False)
    result = driver.Driver.open(tmp_path / "artifacts", target).step({k: v.numpy() for k, v in batch.items()})
    step = as_step_result(result)
    trained = [n for n in step.grads if ".modules_to_save." in n]
    copy = "model.embed_tokens" if module == "embed_tokens" or tie else module
    assert trained == [f"base_model.model.{copy}.modules_to_save.default.weight"]
    assert_matches_autograd(step, autograd_reference(model, batch))
    save_adapter(model, tmp_path / "adapter")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert part.manifest.adapter_keys[trained[0]] in saved


def test_cli_compare_places_lora_and_its_step_matches_autograd(tmp_path, monkeypatch):
    """`mebp compare` builds the model with train's placement options, records them in study.json,
    and the plan compare compiles for it returns autograd's gradients, the full copy's included."""
    from mebp_compiler.app import compare

    built = []
    run_study = compare.run_study

    def recording(model, *args, **kwargs):  # the real study, keeping the model the CLI built
        built.append(model)
        return run_study(model, *args, **kwargs)

    monkeypatch.setattr(compare, "run_study", recording)
    assert main(["compare", "--model", "tiny-llama", "--seq-len", "16", "--steps", "2", "--mezo-steps", "2",
                 "--eval-every", "2", "--eval-blocks", "2", "--methods", "mebp,mezo", "--lora-r", "4",
                 "--lora-targets", "q_proj,v_proj", "--lora-layers", "1", "--modules-to-save", "lm_head",
                 "--out", str(tmp_path), "--no-progress"]) == 0
    (model,) = built
    record = json.loads((tmp_path / "study.json").read_text())["lora"]
    # tiny-llama's head is tied to its embedding: the one shared copy trains (`models.add_lora`)
    assert (record["target_modules"], record["layers_to_transform"], record["modules_to_save"]) == \
        (["q_proj", "v_proj"], [1], ["model.embed_tokens"])
    assert trained_modules(model) == {"q_proj", "v_proj"}
    trainable = record["trainable_parameters"]
    assert trainable == [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(".layers.1." in n for n in trainable if ".lora_" in n)
    assert any(".modules_to_save." in n for n in trainable)
    batch = random_batch(model.config.vocab_size, seq=16)
    result = mebp_compiler.compile(model, batch, "mebp").step(batch)  # as compare's mebp method compiles it
    assert_matches_autograd(result, autograd_reference(model, batch))


def test_cli_compare_refuses_buckets_with_the_reason(capsys):
    assert main(["compare", "--model", "tiny-llama", "--buckets", "2"]) == 2
    err = capsys.readouterr().err
    assert "--buckets: mebp compare packs --data into blocks of --seq-len" in err and err.count("\n") == 1


def test_federated_clients_place_lora_and_step_exactly():
    """The clients' model has the placement of `ModelSettings`, and a client's compiled step under
    its budget returns autograd's gradients, the full copy's included."""
    from mebp_compiler.app import federated

    settings = federated.ModelSettings(model="tiny-llama", lora_r=4, lora_alpha=8, target_modules=("q_proj",),
                                       layers_to_transform=(1,), modules_to_save=("lm_head",), seq_len=16)
    plan = federated._plan(settings, 10**9, "adamw")
    model = plan.model
    assert trained_modules(model) == {"q_proj"}
    assert set(federated.initial_lora(settings)) == set(plan.lora_parameters()) == \
        {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".layers.1." in n for n in plan.lora_parameters() if ".lora_" in n)
    randomize_lora_b(model)
    batch = random_batch(model.config.vocab_size, batch=settings.batch_size, seq=settings.seq_len)
    result = plan.step(batch)
    assert any(".modules_to_save." in n for n in result.grads)
    assert_matches_autograd(result, autograd_reference(model, batch))


def test_cli_federate_hands_the_placement_to_the_clients(monkeypatch, capsys):
    """The options reach `ModelSettings`, which every client builds its model from (the Flower run
    itself is replaced by one that records them: `test_federated` runs a real one)."""
    from mebp_compiler.app import federated

    seen = []

    def record(settings, clients, rounds, config, **kwargs):
        seen.append(settings)
        return federated.FederationResult(rounds=[], final={})

    monkeypatch.setattr(federated, "run_federation", record)
    assert main(["federate", "--model", "tiny-llama", "--clients", "1", "--budgets", "1GB", "--seq-len", "16",
                 "--lora-targets", "q_proj,v_proj", "--lora-layers", "0", "--modules-to-save", "lm_head"]) == 1
    assert "no client trained" in capsys.readouterr().err
    (settings,) = seen
    assert (settings.target_modules, settings.layers_to_transform, settings.modules_to_save) == \
        (("q_proj", "v_proj"), (0,), ("lm_head",))
    assert main(["federate", "--model", "tiny-llama", "--clients", "1", "--budgets", "1GB",
                 "--lora-layers", "0-3"]) == 2
    err = capsys.readouterr().err
    assert "layers_to_transform" in err and err.count("\n") == 1 and len(seen) == 1
