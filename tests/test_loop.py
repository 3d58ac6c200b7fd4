"""The training loop's user features: gradient accumulation, LR schedules, checkpoints, evaluation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import mebp_compiler
from mebp_compiler.app import checkpoint, data
from mebp_compiler.app.evaluate import evaluate
from mebp_compiler.app.train import accumulated, make_scheduler, train
from mebp_compiler.plan import make_optimizer
from tests.conftest import assert_matches_autograd, autograd_reference, lora_model, random_batch, randomize_lora_b


@pytest.mark.parametrize("policy", ["none", "mebp"])
def test_accumulated_gradient_equals_autograd_on_the_combined_batch(policy):
    """Micro-batches with different numbers of ignored labels: the weights must be token shares, not 1/k."""
    model = lora_model("tiny-llama")
    combined = random_batch(model.config.vocab_size, batch=3, seq=24, seed=1)
    combined["labels"][0, :15] = data.IGNORE_INDEX
    combined["labels"][2, 5:9] = data.IGNORE_INDEX
    micro = [{k: v[i : i + 1] for k, v in combined.items()} for i in range(3)]
    plan = mebp_compiler.compile(model, micro[0], policy)
    assert_matches_autograd(accumulated(plan, micro), autograd_reference(model, combined))


def test_an_accumulated_training_step_is_the_combined_batchs_sgd_step():
    model = lora_model("tiny-qwen2")
    combined = random_batch(model.config.vocab_size, batch=2, seq=16, seed=2)
    micro = [{k: v[i : i + 1] for k, v in combined.items()} for i in range(2)]
    plan = mebp_compiler.compile(model, micro[0], "mebp")
    lora = plan.lora_parameters()
    _, reference = autograd_reference(model, combined)
    expected = {n: p.detach() - 0.5 * reference[n] for n, p in lora.items()}
    train(plan, iter(micro), 1, make_optimizer(lora.values(), "sgd", lr=0.5), progress=False, accumulate=2)
    scale = max(g.abs().max().item() for g in reference.values())
    assert all((p.detach() - expected[n]).abs().max().item() <= 1e-5 * 0.5 * scale for n, p in lora.items())


def lrs(schedule: str, steps: int, warmup: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(optimizer, schedule, steps, warmup)
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return out


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup", [0, 1, 4])
def test_lr_schedules_follow_their_formulas(schedule, warmup):
    steps = 12
    decay = steps - warmup
    expected = [s / warmup for s in range(1, warmup + 1)]
    for d in range(decay):
        expected.append({"constant": 1.0, "linear": 1 - d / decay,
                         "cosine": (1 + math.cos(math.pi * d / decay)) / 2}[schedule])
    assert lrs(schedule, steps, warmup) == pytest.approx(expected, abs=1e-12)


def test_evaluate_counts_only_labelled_tokens_as_cross_entropy_does():
    model = lora_model("tiny-gemma3")
    batch = random_batch(model.config.vocab_size, batch=3, seq=20, seed=3)
    result = evaluate(model, batch["input_ids"], batch["labels"], batch_size=2)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
    counted = targets != -100
    assert result.loss == pytest.approx(loss.item(), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(loss.item()), rel=1e-5)
    assert result.accuracy == ((logits.argmax(-1) == targets) & counted).sum().item() / counted.sum().item()
    assert result.tokens == counted.sum().item()


def run(model, blocks, steps, *, resume_from=None, save_at=None, tmp_path=None):
    """AdamW with cosine warmup, 2 batches accumulated; optionally save at a step or resume from a checkpoint."""
    example = next(data.batches(blocks, 1))
    plan = mebp_compiler.compile(model, example, "mebp")
    lora = plan.lora_parameters()
    optimizer = make_optimizer(lora.values(), "adamw", lr=1e-2)
    scheduler = make_scheduler(optimizer, "cosine", steps, warmup_steps=2)
    start = 0
    if resume_from is not None:
        state = checkpoint.load(resume_from)
        state.restore(lora, optimizer, scheduler)
        start = state.step

    def on_step(step, history):
        if step == save_at:
            checkpoint.save(tmp_path / "checkpoint", step=step, batches_consumed=2 * step, settings={"seed": 0},
                            lora=lora, optimizer=optimizer, scheduler=scheduler)
            raise KeyboardInterrupt  # the run is killed right after its checkpoint

    stream = data.batches(blocks, 1, seed=5, skip=2 * start)
    try:
        train(plan, stream, steps, optimizer, progress=False, accumulate=2, scheduler=scheduler, on_step=on_step,
              start_step=start)
    except KeyboardInterrupt:
        pass
    return {n: p.detach().clone() for n, p in lora.items()}


def test_a_resumed_run_continues_bitwise_as_the_uninterrupted_one(tmp_path):
    blocks = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0))
    uninterrupted = run(lora_model("tiny-llama"), blocks, 5)
    run(lora_model("tiny-llama"), blocks, 5, save_at=2, tmp_path=tmp_path)
    fresh = lora_model("tiny-llama")
    randomize_lora_b(fresh, seed=9)  # other LoRA values: they must all come from the checkpoint
    resumed = run(fresh, blocks, 5, resume_from=tmp_path)
    assert all(torch.equal(resumed[n], p) for n, p in uninterrupted.items())


def test_a_checkpoint_with_changed_bytes_or_other_settings_is_refused(tmp_path):
    model = lora_model("tiny-llama")
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = make_optimizer(lora.values())
    directory = checkpoint.save(tmp_path / "ck", step=1, batches_consumed=1, settings={"lr": 1e-3}, lora=lora,
                                optimizer=optimizer, scheduler=None)
    with pytest.raises(checkpoint.CheckpointError, match="lr 0.001 there, 0.002 here"):
        checkpoint.load(directory).check_settings({"lr": 2e-3})
    state = directory / checkpoint.STATE_FILE
    changed = bytearray(state.read_bytes())
    changed[len(changed) // 2] ^= 1
    state.write_bytes(changed)
    with pytest.raises(checkpoint.CheckpointError, match="state.pt does not match its SHA-256"):
        checkpoint.load(directory)
    with pytest.raises(checkpoint.CheckpointError, match="holds no checkpoint"):
        checkpoint.load(tmp_path)
