"""The side-by-side memory benchmark (bench/memory.py) runs end to end on a tiny model."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "memory.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_memory", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_allocator_peak_counts_a_known_tensor():
    bench = _bench_module()
    import torch

    def step():
        a = torch.empty(100 * 2**20, dtype=torch.uint8)
        a.fill_(0)
        del a
        b = torch.empty(10 * 2**20, dtype=torch.uint8)
        return b

    peak, b = bench.allocator_peak(step)
    assert peak == 100 * 2**20
    assert b.numel() == 10 * 2**20
    assert bench.allocator_probe() == 150 * 2**20


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--model", "tiny-llama", "--seq-len", "32",
         "--steps", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    return proc, out


def test_bench_runs_all_methods(tiny_run):
    proc, out = tiny_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads((out / "memory-tiny-llama-seq32.json").read_text())
    bench = _bench_module()
    assert list(data["results"]) == list(bench.METHODS)
    for method, rec in data["results"].items():
        assert not rec.get("error"), method
        assert rec["failures"] == [], method
        assert rec["env"] == bench.CHILD_ENV
        assert rec["torch_threads"] == 1
        assert rec["allocator_peak_bytes"] > 0
        assert rec["step_median_s"] > 0
    assert data["failures"] == []
    assert data["environment"]["subprocess_env"] == bench.CHILD_ENV
    assert "--model tiny-llama" in data["command"]
    assert data["results"]["hf-checkpointing"]["layer0_mlp_calls_per_step"] == 2
    md = (out / "memory-tiny-llama-seq32.md").read_text()
    assert all(f"| {m} |" in md for m in bench.METHODS)
    assert "MALLOC_MMAP_THRESHOLD_=65536" in md
    assert md.strip() in proc.stdout


def test_bench_mebp_holds_less_than_none_and_matches_prediction(tiny_run):
    proc, out = tiny_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((out / "memory-tiny-llama-seq32.json").read_text())["results"]
    none, mebp = results["mebp-none"], results["mebp-mebp"]
    assert mebp["held_peak_activation_bytes"] < none["held_peak_activation_bytes"]
    for rec in (none, mebp):
        pred = rec["predicted_peak_activation_bytes"]
        assert abs(rec["held_peak_activation_bytes"] - pred) <= 0.02 * pred
        assert abs(rec["held_peak_bytes"] - rec["predicted_peak_bytes"]) <= 0.02 * rec["predicted_peak_bytes"]


def test_bench_rejects_unknown_method():
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--methods", "eager,bogus"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode != 0
    assert "bogus" in proc.stderr


def test_whole_step_bench_runs_and_holds_what_it_predicts(tmp_path):
    """bench/whole_step.py: INT4 + sliced head + fused updates, mebp and optimal@least, held = predicted."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "whole_step.py"), "--model", "tiny-llama", "--seq-len", "32",
         "--group-size", "32", "--vocab-slices", "4", "--steps", "1", "--work-limit", "5", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads((tmp_path / "whole-step-tiny-llama-seq32-r8.json").read_text())
    assert data["failures"] == []
    assert [r["plan"] for r in data["records"]] == ["mebp", "optimal@least"]
    for record in data["records"]:
        assert record["held_peak_bytes"] == record["predicted_peak_bytes"]
        assert record["mapped_int4_bytes"] > 0 and record["float_weights_released_bytes"] > 0
        assert record["held_at_peak_by_role"].get("mapped") is None  # mapped weights are not held
    optimal = data["records"][1]
    assert optimal["total_bytes"] <= optimal["budget_bytes"]


def test_native_bench_runs_and_holds_what_the_manifest_predicts(tmp_path):
    """bench/native.py on a tiny INT4 config, under mebp and under optimal at its least budget with
    fused AdamW (whose moments the budget reserves): the driver's held bytes are the manifest's,
    and the native process's anonymous RSS and step time are measured beside eager torch's."""
    pytest.importorskip("mlx.core", reason="the native driver builds against the 'mlx' extra")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "native.py"), "--configs", "tiny-llama:int4:mebp,tiny-llama:int4:optimal:fused",
         "--seq-len", "16",
         "--group-size", "32", "--vocab-slices", "4", "--steps", "2", "--rounds", "1", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads((tmp_path / "native-seq16-r8-slices4.json").read_text())
    assert data["failures"] == []
    assert [r["config"] for r in data["records"]] == ["tiny-llama:int4:mebp", "tiny-llama:int4:optimal:fused"]
    for record in data["records"]:
        assert record["held_as_predicted"] and record["mapped_bytes"] > 0
        assert 0 < record["rss_anon_peak_bytes"] <= record["vm_hwm_bytes"]
        assert record["native_step_s"] > 0 and record["native_over_eager"] > 0
        assert set(record["native_seconds_by_stage_kind"]) >= {"block_forward", "block_backward"}


def test_cost_model_bench_alternates_the_baselines_beside_the_plans(tmp_path):
    """bench/cost_model.py on a tiny step: eager, transformers' checkpointing and the four plans side by side,
    each step's loss checked against the plain step's, plans holding what liveness predicts."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "cost_model.py"), "--model", "tiny-llama", "--seq-len", "32",
         "--device", "cpu-local", "--rounds", "1", "--work-limit", "5", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads((tmp_path / "cost-model-tiny-llama-seq32.json").read_text())["plans"]
    plans = ["none", "mebp", "optimal @ mebp's peak", "optimal @ least"]
    assert list(rows) == ["eager", "hf-checkpointing", *plans]
    assert 0 < rows["hf-checkpointing"]["allocator_peak_bytes"] < rows["eager"]["allocator_peak_bytes"]
    for label in plans:
        assert rows[label]["held_peak_computed_bytes"] == rows[label]["predicted_peak_computed_bytes"], label
    assert rows["mebp"]["predicted_peak_computed_bytes"] < rows["none"]["predicted_peak_computed_bytes"]
    assert all(rows[label]["first_solve_cpu_s"] > 0 for label in plans[2:])
    assert "first_solve_cpu_s" not in rows["mebp"]
    assert [rows[label]["extra_over"] for label in rows] == ["eager", "eager", *["none"] * 4]
    md = (tmp_path / "cost-model-tiny-llama-seq32.md").read_text()
    for name in ("eager autograd", "transformers gradient checkpointing", *(f"`{p}`" for p in plans)):
        assert f"| {name} |" in md, name
