"""The trainer, the adapter file, and the `mebp` command line."""

from __future__ import annotations

import copy
import json
import warnings
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel
from tqdm.auto import tqdm

import mebp_compiler
import mebp_compiler.schedule
from mebp_compiler.app import models
from mebp_compiler.app.cli import main
from mebp_compiler.app.train import (
    NORM_DIVERGENCE_FACTOR,
    DivergenceWarning,
    NonFiniteStep,
    TrainHistory,
    make_optimizer,
    save_adapter,
    train,
)
from mebp_compiler.plan import optimizer_state_bytes
from tests.conftest import assert_matches_autograd, autograd_reference, lora_model, random_batch


def test_trainer_steps_follow_autograd_and_sgd():
    """Three trainer steps: before each update the parameters' .grad are autograd's gradients
    on the parameters the step ran on, and each update is exactly SGD's on those gradients.

    Checked per step rather than by comparing parameters with three eager SGD steps: each
    step's float32 rounding would feed the next step's gradients through the model, and no
    tolerance follows from that. With lr 0.5 (a power of two) SGD's update is one rounding.
    """
    model = lora_model("tiny-qwen2")
    batches = [random_batch(model.config.vocab_size, seed=s) for s in range(3)]
    plan = mebp_compiler.compile(model, batches[0], "mebp")
    lora = plan.lora_parameters()
    optimizer = make_optimizer(lora.values(), "sgd", lr=0.5)
    pending = iter(batches)
    references, seen_grads, expected = [], [], {}

    def before_update(opt, args, kwargs):
        references.append(autograd_reference(model, next(pending)))
        seen_grads.append({n: p.grad.clone() for n, p in lora.items()})
        expected.update({n: p.detach() - 0.5 * p.grad for n, p in lora.items()})

    def after_update(opt, args, kwargs):
        assert all(torch.equal(p, expected[n]) for n, p in lora.items())

    optimizer.register_step_pre_hook(before_update)
    optimizer.register_step_post_hook(after_update)
    history = train(plan, iter(batches), 3, optimizer, progress=False)
    assert len(references) == 3
    for loss, grads, reference in zip(history.loss, seen_grads, references, strict=True):
        assert_matches_autograd(SimpleNamespace(loss=torch.tensor(loss), grads=grads), reference)


def test_training_lowers_the_loss_on_a_repeated_batch():
    model = lora_model("tiny-llama")
    batch = random_batch(model.config.vocab_size)
    plan = mebp_compiler.compile(model, batch, "mebp")
    history = train(plan, iter([batch] * 15), 15, make_optimizer(plan.lora_parameters().values(), lr=1e-2),
                    progress=False)
    assert history.loss[-1] < history.loss[0] - 0.1
    assert all(h == plan.predicted_peak_bytes for h in history.held_peak_bytes)


def test_adapter_loads_back_into_peft(tmp_path):
    model = lora_model("tiny-gemma3")
    out = save_adapter(model, tmp_path / "adapter")
    save_adapter(model, tmp_path / "adapter")  # overwriting an adapter replaces it whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    reloaded = PeftModel.from_pretrained(models.load("tiny-gemma3"), out)
    expected = {n: p for n, p in model.named_parameters() if "lora_" in n}
    got = dict(reloaded.named_parameters())
    assert expected and all(torch.equal(got[n], p) for n, p in expected.items())


def test_cli_train_writes_adapter_plot_and_history(tmp_path, capsys):
    code = main(["train", "--model", "tiny-llama", "--steps", "6", "--seq-len", "32", "--lr", "1e-2",
                 "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "loss.png").stat().st_size > 10_000
    history = json.loads((tmp_path / "history.json").read_text())
    assert len(history["loss"]) == 6 and history["held_peak_bytes"][0] == history["predicted_peak_bytes"]
    assert "loss" in capsys.readouterr().err


def test_cli_reports_bad_input_without_a_traceback(capsys):
    assert main(["train", "--model", "qwen-tiny", "--steps", "1"]) == 2  # a usage error, checked before loading
    err = capsys.readouterr().err
    assert "unknown model" in err.lower() and "Traceback" not in err
    assert main(["train", "--model", "tiny-llama", "--data", "/no/such/file.txt", "--steps", "1"]) == 1
    assert "/no/such/file.txt" in capsys.readouterr().err


def test_cli_plan_predicts_memory_on_the_meta_device(capsys):
    assert main(["plan", "--model", "tiny-gemma3", "--seq-len", "16", "--head-chunks", "2"]) == 0
    out = capsys.readouterr().out
    assert "policy none: predicted peak" in out and "policy mebp: predicted peak" in out
    assert main(["plan", "--model", "tiny-gemma3", "--head-chunks", "many"]) == 2  # a usage error
    assert "--head-chunks: expected a whole number >= 0 or 'auto'" in capsys.readouterr().err


def test_cli_help_explains_the_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "train" in capsys.readouterr().out


def test_compile_optimal_under_a_budget_is_exact_and_fits():
    """The budget covers the graph's peak plus AdamW's two moments per LoRA parameter."""
    model = lora_model("tiny-qwen2")
    batch = random_batch(model.config.vocab_size)
    mebp = mebp_compiler.compile(model, batch, "mebp")
    adamw = optimizer_state_bytes(model, "adamw")
    assert adamw == 2 * sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    budget = mebp.predicted_peak_bytes + adamw
    plan = mebp_compiler.compile(model, batch, "optimal", budget=budget, work_limit=5)
    result = plan.step(batch)
    assert result.held_peak_bytes + adamw <= budget
    assert_matches_autograd(result, autograd_reference(model, batch))
    with pytest.raises(mebp_compiler.BudgetInfeasible, match="optimizer state"):
        mebp_compiler.compile(model, batch, "optimal", budget=mebp.predicted_peak_bytes, work_limit=5)
    with pytest.raises(ValueError, match="needs a budget"):
        mebp_compiler.compile(model, batch, "optimal")


def test_cli_compile_writes_the_schedule_and_refuses_an_infeasible_budget(tmp_path, capsys):
    assert main(["compile", "--model", "tiny-llama", "--seq-len", "16", "--budget", "2MB", "-o", str(tmp_path)]) == 0
    schedule = mebp_compiler.schedule.Schedule.load(tmp_path / "schedule.json")
    memory = json.loads((tmp_path / "memory.json").read_text())
    assert schedule.policy == "optimal" and memory["predicted_peak_bytes"] <= 2_000_000
    assert main(["compile", "--model", "tiny-llama", "--seq-len", "16", "--budget", "100KB", "-o", str(tmp_path)]) == 1
    assert "least feasible budget" in capsys.readouterr().err


def test_head_chunks_auto_takes_the_fewest_chunks_that_fit():
    """A tiny Llama with a large vocabulary, so the LM head dominates the peak."""
    from transformers import AutoModelForCausalLM

    from mebp_compiler.device import DeviceProfile
    from mebp_compiler.passes.policies import least_feasible_budget
    from tests.conftest import randomize_lora_b

    config = models.config("tiny-llama")
    config.vocab_size = 8192
    torch.manual_seed(0)
    model = models.add_lora(AutoModelForCausalLM.from_config(config))
    randomize_lora_b(model)
    batch = random_batch(config.vocab_size, seq=32)
    plain = mebp_compiler.compile(model, batch, "optimal", budget="1GB", optimizer="sgd", head_chunks="auto")
    assert plain.captured.meta["head_chunks"] == 0  # everything fits unchunked
    least_unchunked = least_feasible_budget(plain.captured, DeviceProfile.load("iphone15promax"))
    tight = mebp_compiler.compile(model, batch, "optimal", budget=least_unchunked - 1, optimizer="sgd",
                                  head_chunks="auto", work_limit=5)
    assert tight.captured.meta["head_chunks"] > 0 and tight.predicted_peak_bytes < least_unchunked
    assert_matches_autograd(tight.step(batch), autograd_reference(model, batch))
    with pytest.raises(ValueError, match="policy 'optimal'"):
        mebp_compiler.compile(model, batch, "mebp", head_chunks="auto")


def lora_values(plan) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in plan.lora_parameters().items()}


def assert_same_values(plan, values: dict[str, torch.Tensor]) -> None:
    for name, param in plan.lora_parameters().items():
        torch.testing.assert_close(param.detach(), values[name], rtol=0, atol=0, equal_nan=True, msg=name)


@pytest.mark.parametrize("fuse_update", [False, True], ids=["unfused", "fused"])
def test_a_nan_in_a_lora_parameter_stops_training_before_any_update(fuse_update):
    model = lora_model("tiny-llama")
    batch = random_batch(model.config.vocab_size)
    plan = mebp_compiler.compile(model, batch, "mebp", fuse_update=fuse_update)
    with torch.no_grad():
        next(iter(plan.lora_parameters().values()))[0, 0] = float("nan")
    start = lora_values(plan)
    optimizer = make_optimizer(plan.lora_parameters().values(), "adamw", 1e-2)
    with pytest.raises(NonFiniteStep, match=r"^step 1: the loss is nan;.*are the starting ones.*--lr") as stop:
        train(plan, iter([batch] * 3), 3, optimizer, progress=False)
    assert stop.value.step == 1 and stop.value.parameter is None
    assert_same_values(plan, start)
    assert not optimizer.state  # no parameter was stepped


@pytest.mark.filterwarnings("ignore::mebp_compiler.app.train.DivergenceWarning")
@pytest.mark.parametrize("fuse_update", [False, True], ids=["unfused", "fused"])
def test_a_run_that_turns_nan_keeps_the_parameters_of_its_last_good_step(fuse_update):
    """lr 1e30: step 1 is finite and sends the parameters to ~1e30, so step 2's loss is NaN."""
    model = lora_model("tiny-llama")
    batches = [random_batch(model.config.vocab_size, seed=s) for s in range(3)]
    plan = mebp_compiler.compile(model, batches[0], "mebp", fuse_update=fuse_update)
    twin = mebp_compiler.compile(copy.deepcopy(model), batches[0], "mebp", fuse_update=fuse_update)
    train(twin, iter(batches), 1, make_optimizer(twin.lora_parameters().values(), "adamw", 1e30), progress=False)
    with pytest.raises(NonFiniteStep, match=r"^step 2: the loss is nan;.*those of step 1"):
        train(plan, iter(batches), 3, make_optimizer(plan.lora_parameters().values(), "adamw", 1e30), progress=False)
    assert_same_values(plan, lora_values(twin))


def test_a_diverging_run_warns_once_records_the_step_and_goes_on():
    """lr 1e6: the loss stays finite (saturated at ln(vocab)) while the LoRA norm explodes."""
    model = lora_model("tiny-llama")
    batches = [random_batch(model.config.vocab_size, seed=s) for s in range(3)]
    plan = mebp_compiler.compile(model, batches[0], "mebp")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = train(plan, iter(batches), 3, make_optimizer(plan.lora_parameters().values(), "adamw", 1e6),
                        progress=False)
    diverging = [w for w in caught if issubclass(w.category, DivergenceWarning)]
    assert len(diverging) == 1 and "step 1: the LoRA parameters' norm" in str(diverging[0].message)
    assert history.diverged_at_step == 1 and len(history.loss) == 3
    assert history.lora_norm[0] > NORM_DIVERGENCE_FACTOR * history.start_lora_norm


def test_a_loss_far_above_the_first_steps_counts_as_divergence():
    history = TrainHistory(start_lora_norm=1.0)
    bar = tqdm(disable=True)
    for loss in (5.0, 5.4, 4.6, 9.9):
        history.record(loss, 0.1, 1000, 1.0, bar)
    assert history.diverged_at_step is None  # 9.9 is below 2 x 5.0
    with pytest.warns(DivergenceWarning, match=r"step 5: the loss 10.2 is above 2x the first steps' mean 5"):
        history.record(10.2, 0.1, 1000, 1.0, bar)
    assert history.diverged_at_step == 5
