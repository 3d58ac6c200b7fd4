"""The torch.compile backend `mebp`: exact gradients, budgets that hold, offloading, graph breaks."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch._dynamo.exc import BackendCompilerFailed

from mebp_compiler import heap
from mebp_compiler.app import models
from mebp_compiler.backend import BackendError, MebpBackend, backend_for
from mebp_compiler.heap import release_freed_memory
from mebp_compiler.passes.scheduler.solver import BudgetInfeasible
from tests.conftest import (FLOAT32_UNIT_ROUNDOFF, TINY_MODELS, assert_matches_autograd, autograd_reference, lora_model,
                            random_batch)

_spec = importlib.util.spec_from_file_location(
    "bench_memory", Path(__file__).resolve().parents[1] / "bench" / "memory.py")
_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bench)
allocator_peak = _bench.allocator_peak  # the bench's profiler-based peak of the bytes a step allocates


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def lora_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def compiled_step(compiled: torch.nn.Module, model: torch.nn.Module, batch) -> SimpleNamespace:
    """One `loss.backward()` through the compiled model; the loss and the LoRA .grads (then cleared)."""
    lora = lora_params(model)
    for p in lora.values():
        p.grad = None
    loss = compiled(**batch).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in lora.items()}
    for p in lora.values():
        p.grad = None
    return SimpleNamespace(loss=loss.detach(), grads=grads)


def least_budget(model: torch.nn.Module, batch, **options) -> int:
    """The least feasible budget, read from the error a 1-byte budget raises."""
    with pytest.raises(BackendCompilerFailed) as info:
        torch.compile(model, backend=MebpBackend(activation_budget=1, **options))(**batch).loss.backward()
    inner = info.value.inner_exception
    assert isinstance(inner, BudgetInfeasible)
    torch._dynamo.reset()
    return inner.least_budget_bytes


@pytest.mark.parametrize("name", TINY_MODELS)
def test_gradients_equal_autograd_at_a_tight_budget(name):
    model = lora_model(name)
    batch = random_batch(model.config.vocab_size)
    reference = autograd_reference(model, batch)
    budget = int(least_budget(model, batch) * 1.05)
    backend = MebpBackend(activation_budget=budget)
    result = compiled_step(torch.compile(model, backend=backend), model, batch)
    assert_matches_autograd(result, reference)
    (plan,) = backend.graphs
    assert plan.counts()["recompute"] > 0, "a tight budget must make the scheduler recompute"
    assert plan.model_peak_bytes <= budget
    assert plan.last_saved_bytes == plan.kept_bytes <= budget


def test_budget_sweep_measured_peak_within_budget():
    """Keep/recompute plans: the step's allocator peak (torch profiler) and saved bytes stay in budget."""
    model = lora_model("tiny-llama")
    batch = random_batch(model.config.vocab_size, seq=32)
    lora = lora_params(model)
    least = least_budget(model, batch, offload=False)
    unconstrained = MebpBackend(activation_budget="1GB", offload=False)
    compiled_step(torch.compile(model, backend=unconstrained), model, batch)
    full = unconstrained.graphs[0].model_peak_bytes
    torch._dynamo.reset()
    saved = []
    for budget in (int(least * 1.01), (least + full) // 2, full):
        torch._dynamo.reset()
        backend = MebpBackend(activation_budget=budget, offload=False)
        compiled = torch.compile(model, backend=backend)
        compiled_step(compiled, model, batch)  # compiles forward and backward

        def step():
            compiled(**batch).loss.backward()

        peak, _ = allocator_peak(step)
        for p in lora.values():
            p.grad = None
        plan = backend.graphs[0]
        assert peak <= budget, f"measured allocator peak {peak} exceeds the budget {budget}"
        assert plan.last_saved_bytes <= budget
        saved.append(plan.last_saved_bytes)
    assert saved[0] < saved[-1], "a tighter budget must keep fewer bytes for the backward"


def test_offloaded_tensors_go_to_files_and_gradients_stay_exact(tmp_path):
    """A device where recomputing is slow and flash is fast makes the scheduler offload."""
    device = tmp_path / "slow-compute.json"
    device.write_text(json.dumps({
        "name": "slow-compute-fast-flash", "memory_cap_bytes": 10**9, "flops_per_s": 1e6,
        "memory_bytes_per_s": 1e6, "flash_read_bytes_per_s": 1e12, "flash_write_bytes_per_s": 1e12,
        "io_overlap": 1.0, "io_latency_s": 0.0,
    }))
    model = lora_model("tiny-qwen2")
    batch = random_batch(model.config.vocab_size)
    reference = autograd_reference(model, batch)
    offload_dir = tmp_path / "offload"
    budget = int(least_budget(model, batch, device=str(device)) * 1.1)
    backend = MebpBackend(activation_budget=budget, device=str(device), offload_dir=str(offload_dir))
    result = compiled_step(torch.compile(model, backend=backend), model, batch)
    assert_matches_autograd(result, reference)
    plan = backend.graphs[0]
    assert plan.counts()["offload"] > 0
    assert plan.last_offloaded_bytes == plan.offloaded_bytes > 0
    assert backend.store.bytes_written >= plan.offloaded_bytes
    assert plan.last_saved_bytes == plan.kept_bytes <= budget
    assert list(offload_dir.iterdir()) == [], "offload files are unlinked once mapped"


def test_adamw_steps_read_the_updated_parameters():
    """Three AdamW steps through the compiled model: each step's gradients equal eager
    autograd's on the parameters as the previous updates left them, so the compiled graphs
    read the parameters in place, not a stale copy.

    Parameters after several steps are not compared with a separate eager run's: AdamW
    divides by the root of the second moment, so rounding-level gradient differences move
    a parameter by up to the learning rate, and no tolerance follows from the arithmetic.
    """
    model = lora_model("tiny-gemma3")
    start = {n: p.detach().clone() for n, p in lora_params(model).items()}
    batches = [random_batch(model.config.vocab_size, seed=s) for s in range(3)]
    budget = int(least_budget(model, batches[0]) * 1.1)
    compiled = torch.compile(model, backend=MebpBackend(activation_budget=budget))
    optimizer = torch.optim.AdamW(lora_params(model).values(), lr=1e-2)
    for batch in batches:
        reference = autograd_reference(model, batch)  # eager, on the same parameters
        step = compiled_step(compiled, model, batch)
        assert_matches_autograd(step, reference)
        for name, p in lora_params(model).items():
            p.grad = step.grads[name]
        optimizer.step()
    assert all(not torch.equal(p, start[n]) for n, p in lora_params(model).items())
    with torch.no_grad():  # evaluation compiles an inference graph: nothing to plan, same loss
        torch.testing.assert_close(compiled(**batches[0]).loss, model(**batches[0]).loss)


def test_graph_breaks_share_the_budget():
    model = lora_model("tiny-llama")
    models.decoder_layers(model)[0].register_forward_hook(lambda *_: torch._dynamo.graph_break())
    batch = random_batch(model.config.vocab_size)
    reference = autograd_reference(model, batch)
    budget = 1
    for _ in range(8):  # raise the budget to what the error names until every graph fits
        options = {"activation_budget": budget, "offload": False}
        compiled = torch.compile(model, backend="mebp", options=options)  # through the entry point
        try:
            result = compiled_step(compiled, model, batch)
            break
        except BackendCompilerFailed as exc:
            assert isinstance(exc.inner_exception, BudgetInfeasible)
            budget = int(exc.inner_exception.least_budget_bytes * 1.02)
            torch._dynamo.reset()
    assert_matches_autograd(result, reference)
    backend = backend_for(options)
    budget = backend.options.activation_budget_bytes
    assert len(backend.graphs) >= 2
    held = 0
    for plan in backend.graphs:
        assert plan.budget_bytes == budget - held
        assert held + plan.model_peak_bytes <= budget
        held += plan.kept_bytes
    lora = lora_params(model)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in parameters:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def step():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = compiled(**batch).loss
        loss.backward()

    peak, _ = allocator_peak(step)
    for p in lora.values():
        p.grad = None
    # Everything autograd saved went through our plans (no part ran eagerly), within budget.
    assert sum(saved.values()) <= sum(plan.last_saved_bytes for plan in backend.graphs) <= budget
    assert peak <= budget, f"measured allocator peak {peak} exceeds the budget {budget}"
    second = compiled_step(compiled, model, batch)  # a second step reuses the compiled graphs
    assert_matches_autograd(second, reference)


def test_heap_is_trimmed_between_layers(monkeypatch):
    """Both graphs return freed heap pages at their start and per layer boundary; results stay exact."""
    model = lora_model("tiny-llama")
    layers = len(models.decoder_layers(model))
    batch = random_batch(model.config.vocab_size)
    reference = autograd_reference(model, batch)
    calls = []
    monkeypatch.setattr(heap, "_MALLOC_TRIM", lambda pad: calls.append(pad))
    backend = MebpBackend(activation_budget="1GB")
    result = compiled_step(torch.compile(model, backend=backend), model, batch)
    assert_matches_autograd(result, reference)
    (plan,) = backend.graphs
    assert plan.heap_trims == (layers + 1, layers + 1)  # at the start (embedding, loss) and per layer
    assert calls == [0] * (2 * (layers + 1)), "one malloc_trim(0) per heap_trims entry, forward and backward"
    torch._dynamo.reset()
    untrimmed = MebpBackend(activation_budget="1GB", trim_heap=False)
    compiled_step(torch.compile(model, backend=untrimmed), model, batch)
    assert untrimmed.graphs[0].heap_trims == (0, 0)
    assert len(calls) == 2 * (layers + 1)


@pytest.mark.skipif(heap._MALLOC_TRIM is None, reason="the C library has no malloc_trim (not glibc)")
def test_release_freed_memory_returns_free_heap_pages():
    """Freed small chunks stay resident until release_freed_memory hands their pages back."""
    import ctypes

    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]

    def rss_anon() -> int:
        return _bench.read_status()["RssAnon"]

    chunk, count = 16 * 1024, 4096  # 64 MiB in chunks below any mmap threshold glibc uses
    chunks = [libc.malloc(chunk) for _ in range(count)]
    pins = [libc.malloc(64) for _ in range(count)]  # keep the freed chunks apart from the heap top
    for address in chunks:
        ctypes.memset(address, 1, chunk)
    touched = rss_anon()
    for address in chunks:
        libc.free(address)
    freed = rss_anon()
    release_freed_memory()
    released = rss_anon()
    for address in pins:
        libc.free(address)
    assert freed > touched - 8 * 2**20, "glibc keeps freed chunks resident"
    assert released < freed - 32 * 2**20, f"release_freed_memory returned only {freed - released} bytes"


def test_infeasible_budget_names_the_least_feasible_one():
    model = lora_model("tiny-llama")
    batch = random_batch(model.config.vocab_size)
    least = least_budget(model, batch)
    with pytest.raises(BackendCompilerFailed, match="least feasible budget is"):
        torch.compile(model, backend=MebpBackend(activation_budget=least - 1))(**batch)
    torch._dynamo.reset()
    backend = MebpBackend(activation_budget=least)
    result = compiled_step(torch.compile(model, backend=backend), model, batch)
    assert_matches_autograd(result, autograd_reference(model, batch))


def test_bad_options_are_clear():
    with pytest.raises(BackendError, match="activation_budget"):
        MebpBackend()
    with pytest.raises(BackendError, match="unknown mebp backend option"):
        MebpBackend(activation_budget="1GB", budget="1GB")
    with pytest.raises(ValueError, match="cannot read"):
        MebpBackend(activation_budget="lots")
    with pytest.raises(ValueError, match="no device profile"):
        MebpBackend(activation_budget="1GB", device="toaster")
    with pytest.raises(BackendError, match="work_limit must be positive"):
        MebpBackend(activation_budget="1GB", work_limit=0)


def test_the_old_time_limit_option_still_works_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="work_limit"):
        backend = MebpBackend(activation_budget="1GB", time_limit_s=3)
    assert backend.options.work_limit == 3


@pytest.mark.slow
def test_smollm2_gradients_equal_autograd(smollm2):
    batch = random_batch(smollm2.config.vocab_size, batch=1, seq=32)
    reference = autograd_reference(smollm2, batch)
    backend = MebpBackend(activation_budget="64MB", offload=False)
    result = compiled_step(torch.compile(smollm2, backend=backend), smollm2, batch)
    assert_matches_autograd(result, reference)
    (plan,) = backend.graphs
    assert plan.counts()["recompute"] > 0
    assert plan.last_saved_bytes <= backend.options.activation_budget_bytes


def test_backend_for_matches_options_by_value_and_the_old_budget_name_warns():
    options = {"activation_budget": "123MB", "offload": False}
    assert backend_for(options) is backend_for(dict(options)) is backend_for(dict(reversed(options.items())))
    assert backend_for({**options, "activation_budget": "124MB"}) is not backend_for(options)
    with pytest.warns(DeprecationWarning, match="activation_budget"):
        backend = MebpBackend(memory_budget="1GB")
    assert backend.options.activation_budget_bytes == 10**9


def test_inside_hf_trainer_by_compiling_the_model_before_passing_it(tmp_path):
    """HF Trainer takes `model.compile(backend="mebp", ...)`d models: its graphs serve every
    step, and the first step's LoRA parameters are an eager Trainer run's."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 256, (8, 16), generator=generator)
    dataset = [{"input_ids": r, "labels": r.clone()} for r in rows]

    class FirstStep(TrainerCallback):
        """The LoRA gradients of the first step and the parameters it makes."""

        def __init__(self) -> None:
            self.grads: dict[str, torch.Tensor] = {}
            self.params: dict[str, torch.Tensor] = {}

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if state.global_step == 0:
                self.grads = {n: p.grad.detach().clone() for n, p in lora_params(model).items()}

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 1:
                self.params = {n: p.detach().clone() for n, p in lora_params(model).items()}

    def trained(compile_options, steps):
        model = lora_model("tiny-llama")
        if compile_options is not None:
            model.compile(backend="mebp", options=compile_options, dynamic=False)
        arguments = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=steps,
                                      learning_rate=0.5, optim="sgd", lr_scheduler_type="constant",
                                      report_to="none", use_cpu=True, save_strategy="no", logging_strategy="no",
                                      dataloader_num_workers=0, seed=0, data_seed=0, disable_tqdm=True)
        first = FirstStep()
        Trainer(model=model, args=arguments, train_dataset=dataset, callbacks=[first]).train()
        return first

    options = {"activation_budget": "40MB", "offload": False}
    compiled, eager = trained(options, 3), trained(None, 1)
    backend = backend_for(options)
    assert backend.graphs and all(g.forward_calls >= 3 for g in backend.graphs)
    # Compared after one step only: each later step's gradients are taken at parameters that
    # already differ by rounding, and no tolerance follows from that. After one SGD step with
    # lr 0.5 (a power of two, so lr x gradient is exact) a parameter differs from eager's by
    # lr x its gradient's difference (within the project's 1e-5 of the largest gradient)
    # plus each side's subtraction rounding (u of the largest parameter).
    assert_matches_autograd(SimpleNamespace(grads=compiled.grads, loss=torch.tensor(0.0)),
                            (torch.tensor(0.0), eager.grads))
    grad_scale = max(g.abs().max().item() for g in eager.grads.values())
    param_scale = max(p.abs().max().item() for p in eager.params.values())
    bound = 0.5 * 1e-5 * grad_scale + 2 * FLOAT32_UNIT_ROUNDOFF * param_scale
    worst = max((compiled.params[n] - p).abs().max().item() for n, p in eager.params.items())
    assert worst <= bound
    start = lora_params(lora_model("tiny-llama"))
    assert max((start[n].detach() - p).abs().max().item() for n, p in eager.params.items()) > 1e3 * worst


def test_the_budget_holds_under_no_grad():
    """An inference graph (torch.no_grad()) is checked against the budget too: a 1 KB budget is
    refused with the graph's peak, a budget at that peak runs and gives eager's loss."""
    model = lora_model("tiny-llama")
    batch = random_batch(model.config.vocab_size)
    with torch.no_grad(), pytest.raises(BackendCompilerFailed) as failed:
        torch.compile(model, backend=MebpBackend(activation_budget="1KB"))(**batch)
    assert isinstance(failed.value.inner_exception, BudgetInfeasible)
    peak = failed.value.inner_exception.least_budget_bytes
    assert peak > 1000
    torch._dynamo.reset()
    backend = MebpBackend(activation_budget=peak)
    with torch.no_grad():
        loss = torch.compile(model, backend=backend)(**batch).loss
        torch.testing.assert_close(loss, model(**batch).loss)
    assert backend.inference_peaks == [peak] and backend.graphs == []
