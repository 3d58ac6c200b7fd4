"""`mebp calibrate` and the op-class cost model: structure only, never how fast this machine is."""

from __future__ import annotations

import json
import os

import pytest
import torch

from mebp_compiler.app import calibrate
from mebp_compiler.app.cli import main
from mebp_compiler.device import OP_CLASSES, DeviceProfile, OpClassRates
from mebp_compiler.offload import OffloadStore
from mebp_compiler.passes.cost import op_class, op_seconds, seconds_by_class, step_cost
from mebp_compiler.passes.policies import none_schedule


@pytest.fixture(scope="module")
def tiny_step():
    _, graph, inputs = calibrate.model_step("tiny-llama", seq_len=16)
    return graph, inputs


@pytest.fixture(scope="module")
def calibration(tiny_step, tmp_path_factory):
    graph, inputs = tiny_step
    return calibrate.calibrate(graph, inputs, name="tiny", rounds=1, offload_bytes=2**20,
                               offload_dir=tmp_path_factory.mktemp("flash"))


def test_every_op_of_a_traced_step_has_a_class_and_every_class_is_timed(tiny_step, calibration):
    graph, _ = tiny_step
    calls = [n for n in graph.module.graph.nodes if n.op == "call_function"]
    classes = {op_class(n, graph.info[n.name]) for n in calls}
    assert classes <= set(OP_CLASSES)
    assert {"matmul", "view", "elementwise"} <= classes
    assert sum(t.ops for t in calibration.by_class.values()) == len(calls)
    assert set(calibration.profile.op_classes) == classes - {"view"}  # a view costs the overhead only


def test_the_calibrated_profile_is_written_atomically_and_loads_with_positive_rates(calibration, tmp_path):
    path = tmp_path / "here.json"
    path.write_text("{}")  # an older file is replaced whole
    calibrate.write_profile(calibration, path)
    assert sorted(os.listdir(tmp_path)) == ["here.json"]  # no temporary sibling left
    assert json.loads(path.read_text())["measured"]["rounds"] == 1
    profile = DeviceProfile.load(path)
    assert profile == calibration.profile
    for value in (profile.flops_per_s, profile.memory_bytes_per_s, profile.flash_read_bytes_per_s,
                  profile.flash_write_bytes_per_s, profile.op_overhead_s, profile.io_latency_s,
                  profile.decompress_bytes_per_s, profile.memory_cap_bytes):
        assert value > 0
    assert profile.io_overlap == 0.0  # the CPU runtime offloads synchronously
    assert all(r.flops_per_s > 0 and r.bytes_per_s > 0 for r in profile.op_classes.values())


def test_the_cost_model_charges_each_op_its_class_roofline_and_views_the_overhead(tiny_step, calibration):
    graph, _ = tiny_step
    profile = calibration.profile
    by_class = seconds_by_class(graph, profile)
    views = sum(1 for n in graph.module.graph.nodes if n.op == "call_function"
                and op_class(n, graph.info[n.name]) == "view")
    assert by_class["view"] == pytest.approx(views * profile.op_overhead_s)
    assert sum(by_class.values()) == pytest.approx(step_cost(graph, none_schedule(graph), profile).compute_s)
    slow = DeviceProfile(**{**vars(profile), "op_classes": {
        **profile.op_classes, "matmul": OpClassRates(profile.op_classes["matmul"].flops_per_s / 10, 1e30)}})
    matmuls = [n for n in graph.module.graph.nodes if n.op == "call_function"
               and op_class(n, graph.info[n.name]) == "matmul"]
    n = matmuls[0]
    assert op_seconds(n, graph.info[n.name], slow) == pytest.approx(
        graph.info[n.name].flops / slow.op_classes["matmul"].flops_per_s)


def test_shipped_profiles_without_op_classes_still_load_and_cost_as_before():
    phone = DeviceProfile.load("iphone15promax")
    assert phone.op_classes == {}
    assert phone.compute_s(2e12, 0, "matmul") == pytest.approx(2.0)
    assert phone.compute_s(0, 1e11, "movement") == pytest.approx(2.0)


def test_an_unknown_op_class_is_refused_with_the_known_ones(tmp_path):
    data = DeviceProfile.load("iphone15promax").to_json()
    data["op_classes"] = {"convolutions": {"flops_per_s": 1.0, "bytes_per_s": 1.0}}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"unknown op classes \['convolutions'\]; use \['matmul'"):
        DeviceProfile.load(path)


def test_an_offload_file_is_reused_while_its_size_stays_the_same(tmp_path):
    store = OffloadStore(tmp_path)
    first = store.write(torch.arange(256, dtype=torch.float32), "x")
    inode = os.stat(first.path).st_ino
    second = store.write(torch.arange(256, dtype=torch.float32) * 2, "x")
    assert os.stat(second.path).st_ino == inode
    assert torch.equal(store.read(second), torch.arange(256, dtype=torch.float32) * 2)
    third = store.write(torch.ones(8, dtype=torch.bfloat16), "x")  # another size: the file is rebuilt
    assert os.path.getsize(third.path) == 16
    assert torch.equal(store.read(third), torch.ones(8, dtype=torch.bfloat16))


def test_calibrate_help_says_what_it_measures(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["calibrate", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for words in ("op class", "per-op overhead", "INT4 decode", "process CPU seconds", "--device"):
        assert words in text


def test_calibrate_refuses_an_out_path_in_a_missing_directory(tmp_path, capsys):
    assert main(["calibrate", "--out", str(tmp_path / "missing" / "p.json")]) == 2
    assert "must be a file in an existing directory" in capsys.readouterr().err
