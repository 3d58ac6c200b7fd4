"""The demo's comparison: eager autograd and transformers' checkpointing measured beside the plan, and the plot."""

from __future__ import annotations

import json

import pytest
import torch

from mebp_compiler.app.baselines import BASELINES, allocator_peak, measure_baselines
from mebp_compiler.app.cli import main
from tests.conftest import lora_model, random_batch

MIB = 2**20


def test_the_allocator_peak_is_the_most_a_function_held_at_once():
    def allocate():
        a = torch.ones(4 * MIB, dtype=torch.uint8)
        b = torch.ones(2 * MIB, dtype=torch.uint8)
        del a
        c = torch.ones(1 * MIB, dtype=torch.uint8)
        del b, c

    assert allocator_peak(allocate) == 6 * MIB


def test_baselines_run_the_step_as_autograd_and_checkpointing_reduces_what_it_allocates():
    model = lora_model("tiny-llama")
    batch = random_batch(model.config.vocab_size, batch=1, seq=32)
    reference = float(model(**batch).loss.detach())
    eager, checkpointed = measure_baselines(model, batch)
    assert [eager.name, checkpointed.name] == list(BASELINES)
    assert eager.loss == pytest.approx(reference, abs=1e-6) and checkpointed.loss == pytest.approx(reference, abs=1e-6)
    assert eager.parameter_bytes == sum(p.numel() * p.element_size() for p in model.parameters())
    assert 0 < checkpointed.step_peak_bytes < eager.step_peak_bytes
    # The model is left as it was: no gradients, no checkpointing, training mode.
    assert all(p.grad is None for p in model.parameters())
    assert not model.base_model.model.is_activation_checkpointing and model.training


def test_train_with_baselines_prints_them_beside_the_plan_and_plots_the_step(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", "tiny-llama", "--seq-len", "32", "--steps", "2", "--no-progress",
                 "--budget", "3MB", "--baselines", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    for label in ("eager autograd", "transformers gradient checkpointing", "mebp-compiler, policy optimal"):
        assert any(line.startswith(f"[mebp]   {label} ") for line in err.splitlines()), label
    assert err.rstrip().splitlines()[-1] == f"[mebp] memory over the step: {out / 'memory.png'}"
    history = json.loads((out / "history.json").read_text())
    assert [b["name"] for b in history["baselines"]] == list(BASELINES)
    assert (out / "memory.png").stat().st_size > 10_000


def test_baselines_are_refused_with_mezo(tmp_path, capsys):
    assert main(["train", "--model", "tiny-llama", "--method", "mezo", "--baselines", "--out", str(tmp_path)]) == 2
    assert "--baselines" in capsys.readouterr().err
