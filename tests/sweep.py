"""Randomized exactness sweep: seeded tiny configurations, each step exact vs autograd and held = predicted.

`make_case(seed)` draws one configuration - architecture (a tiny config's class), layers,
widths, sequence, batch with left or right padding through `attention_mask`, LoRA rank and
targets, policy (none, mebp with RAM or disk checkpoints, optimal under a budget between
the least feasible one and MeBP's peak), LM-head chunks, vocabulary slices, MLP chunks,
INT4 weights and fused updates - from `random.Random(seed)`, so a failing seed reproduces
with `run_case(make_case(seed))`. `run_case` compiles and runs one step and compares it with
eager autograd on the same weights (on the dequantized weights under INT4): loss and every
LoRA gradient within the project's tolerance (`tests.conftest.assert_matches_autograd`), and
the bytes the runtime held after every op equal to liveness' prediction, exactly.

Used by tests/test_sweep.py (a fast subset in CI) and bench/exactness_sweep.py (100 seeds).
"""

from __future__ import annotations

import random
import tempfile
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import torch
import transformers

import mebp_compiler
from mebp_compiler.app import models
from mebp_compiler.passes.scheduler.solver import BudgetInfeasible
from tests.conftest import TINY_MODELS, assert_matches_autograd, autograd_reference, randomize_lora_b
from tests.test_quantize import dequantized_copy

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: Divides every width a case draws (multiples of 16), so no INT4 weight stays float.
INT4_GROUP_SIZE = 16
SOLVER_WORK_LIMIT = 5.0


@dataclass(frozen=True)
class Case:
    """One tiny training step to check; every field is drawn by `make_case`."""

    seed: int
    model: str  # a tiny config: its architecture class, resized below
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    batch: int
    seq: int
    padding: str  # "none" (no mask), "left" or "right"
    lora_r: int
    lora_targets: tuple[str, ...]
    policy: str  # none, mebp or optimal
    checkpoints: str  # ram or disk (mebp)
    budget_fraction: float  # optimal: where the budget lies from the least feasible (0) to MeBP's peak (1)
    head_chunks: int
    vocab_slices: int
    mlp_chunks: int
    int4: bool
    fuse_update: bool

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self).items())


def make_case(seed: int) -> Case:
    """The configuration of `seed` (the same on every machine)."""
    rng = random.Random(seed)
    heads = rng.choice((2, 4))
    seq = rng.randint(8, 24)
    vocab_slices = rng.choice((0, 0, 2, 3, 5))
    targets = tuple(t for t in LORA_TARGETS if rng.random() < 0.5) or (rng.choice(LORA_TARGETS),)
    if not vocab_slices and rng.random() < 0.2:  # the sliced loss needs a frozen head
        targets += ("lm_head",)
    policy = rng.choice(("none", "mebp", "mebp", "optimal", "optimal"))
    return Case(
        seed=seed,
        model=rng.choice(TINY_MODELS),
        layers=rng.randint(1, 3),
        heads=heads,
        kv_heads=rng.choice((1, heads)),
        head_dim=rng.choice((8, 16)),
        intermediate=rng.choice((32, 48, 64, 96, 128)),
        vocab=rng.choice((128, 256, 320)),
        batch=rng.randint(1, 3),
        seq=seq,
        padding=rng.choice(("none", "left", "right")),
        lora_r=rng.choice((1, 2, 4, 8)),
        lora_targets=targets,
        policy=policy,
        checkpoints=rng.choice(("ram", "disk")) if policy == "mebp" else "ram",
        budget_fraction=round(rng.random(), 3) if policy == "optimal" else 1.0,
        head_chunks=rng.choice((0, 0, 2, 3)),
        vocab_slices=vocab_slices,
        mlp_chunks=rng.choice((0, 0, 2, 3)),
        int4=rng.random() < 0.3,
        fuse_update=rng.random() < 0.25,
    )


def build_model(case: Case) -> torch.nn.Module:
    """The tiny config of `case.model` at the case's sizes, random weights, LoRA with random lora_B."""
    config = models.config(case.model)
    config.num_hidden_layers = case.layers
    config.num_attention_heads, config.num_key_value_heads = case.heads, case.kv_heads
    config.hidden_size = case.heads * case.head_dim
    config.head_dim = case.head_dim
    config.intermediate_size = case.intermediate
    config.vocab_size = case.vocab
    if case.model == "tiny-gemma3":  # sliding-window and global layers alternate
        config.layer_types = [("sliding_attention", "full_attention")[i % 2] for i in range(case.layers)]
        config.query_pre_attn_scalar = case.head_dim
    elif getattr(config, "layer_types", None) is not None:
        config.layer_types = config.layer_types[:1] * case.layers
    torch.manual_seed(case.seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.train()
    model = models.add_lora(model, models.LoraSettings(r=case.lora_r, alpha=2 * case.lora_r,
                                                       target_modules=case.lora_targets))
    randomize_lora_b(model, case.seed)
    return model


def make_batch(case: Case) -> dict[str, torch.Tensor]:
    """Random tokens; with padding, a mask with 0 to seq-2 padded tokens per row, labels -100 there."""
    generator = torch.Generator().manual_seed(case.seed)
    ids = torch.randint(0, case.vocab, (case.batch, case.seq), generator=generator)
    labels = ids.clone()
    labels[:, 0] = -100
    batch = {"input_ids": ids, "labels": labels}
    if case.padding != "none":
        mask = torch.ones_like(ids)
        pads = torch.randint(0, case.seq - 1, (case.batch,), generator=generator)
        for row, pad in enumerate(pads.tolist()):
            if case.padding == "left":
                mask[row, :pad] = 0
            else:
                mask[row, case.seq - pad:] = 0
        batch = {"input_ids": ids.masked_fill(mask == 0, 0), "labels": labels.masked_fill(mask == 0, -100),
                 "attention_mask": mask}
    return batch


@dataclass(frozen=True)
class CaseResult:
    case: Case
    budget_bytes: int | None  # optimal: the budget compiled under
    predicted_peak_bytes: int
    held_peak_bytes: int
    held_drift_bytes: int  # largest |held - predicted| over the step's ops
    grad_error: float  # worst |grad - autograd's| over the largest autograd gradient
    loss_error: float  # |loss - autograd's| over max(1, |autograd's loss|)


def run_case(case: Case) -> CaseResult:
    """Compile and run `case`'s step; raise AssertionError unless it is exact and held = predicted."""
    model = build_model(case)
    batch = make_batch(case)
    options = dict(head_chunks=case.head_chunks, vocab_slices=case.vocab_slices, mlp_chunks=case.mlp_chunks,
                   fuse_update=case.fuse_update, optimizer="sgd")
    if case.int4:
        options.update(int4=True, group_size=INT4_GROUP_SIZE)
    budget = None
    with tempfile.TemporaryDirectory() as offload_dir:
        if case.policy == "optimal":
            budget = optimal_budget(model, batch, case, options)
            plan = mebp_compiler.compile(model, batch, "optimal", budget=budget, work_limit=SOLVER_WORK_LIMIT,
                                         offload_dir=offload_dir, **options)
        else:
            plan = mebp_compiler.compile(model, batch, case.policy, checkpoints=case.checkpoints,
                                         offload_dir=offload_dir, **options)
        reference_model = dequantized_copy(model, plan) if case.int4 else model
        reference = autograd_reference(reference_model, batch)
        result = step(plan, batch)
    assert_matches_autograd(result, reference)
    predicted = plan.profile.total
    drift = max(abs(a - b) for a, b in zip(result.held_bytes, predicted, strict=True))
    assert result.held_bytes == predicted, f"held differs from predicted by up to {drift} bytes"
    if budget is not None:
        assert plan.predicted_peak_bytes + plan.optimizer_state_bytes <= budget
    ref_loss, ref_grads = reference
    scale = max(g.abs().max().item() for g in ref_grads.values())
    return CaseResult(
        case=case, budget_bytes=budget, predicted_peak_bytes=plan.predicted_peak_bytes,
        held_peak_bytes=result.held_peak_bytes, held_drift_bytes=drift,
        grad_error=max((result.grads[n] - g).abs().max().item() for n, g in ref_grads.items()) / scale,
        loss_error=abs(result.loss.item() - ref_loss.item()) / max(1.0, abs(ref_loss.item())),
    )


def optimal_budget(model: torch.nn.Module, batch, case: Case, options: dict) -> int:
    """A budget `case.budget_fraction` of the way from the least feasible one to MeBP's peak (whole step)."""
    mebp = mebp_compiler.compile(model, batch, "mebp", **options)
    most = mebp.predicted_peak_bytes + mebp.optimizer_state_bytes
    try:
        mebp_compiler.compile(model, batch, "optimal", budget=1, work_limit=SOLVER_WORK_LIMIT, **options)
    except BudgetInfeasible as exc:
        least = exc.least_budget_bytes
    else:
        raise AssertionError("a one-byte budget was accepted")
    return least + int(case.budget_fraction * max(0, most - least))


def step(plan, batch) -> SimpleNamespace:
    """One step; a fused plan's gradients are read as its optimizer (SGD, lr 0) receives each."""
    if not plan.fused_update:
        return plan.step(batch)
    params = plan.lora_parameters()
    name_of = {id(p): n for n, p in params.items()}
    grads = {}
    optimizer = torch.optim.SGD(params.values(), lr=0.0)
    optimizer.register_step_pre_hook(lambda *_: grads.update(
        {name_of[id(p)]: p.grad.clone() for p in params.values() if p.grad is not None}))
    result = plan.step(batch, optimizer)
    return SimpleNamespace(loss=result.loss, grads=grads, held_bytes=result.held_bytes,
                           held_peak_bytes=result.held_peak_bytes)


