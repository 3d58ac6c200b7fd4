"""`mebp train --tensorboard DIR`: a one-line error naming the install when tensorboard is missing, else the scalars."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from mebp_compiler.app.cli import main

TINY = ["--model", "tiny-llama", "--seq-len", "32", "--no-progress"]


def test_tensorboard_without_the_package_is_one_line_naming_the_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` fails, as where it is not installed
    assert main(["train", *TINY, "--steps", "2", "--tensorboard", str(tmp_path / "tb"),
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install tensorboard" in err and err.startswith("mebp train: error: ")
    assert not (tmp_path / "out").exists() and not (tmp_path / "tb").exists()


def test_tensorboard_is_refused_with_mezo(tmp_path, capsys):
    assert main(["train", *TINY, "--method", "mezo", "--tensorboard", str(tmp_path / "tb")]) == 2
    assert "--tensorboard" in capsys.readouterr().err


def test_tensorboard_logs_each_steps_loss_lr_held_bytes_and_step_time(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = tmp_path / "tb"
    assert main(["train", *TINY, "--steps", "3", "--eval-every", "2", "--tensorboard", str(tb),
                 "--out", str(tmp_path / "out")]) == 0
    events = EventAccumulator(str(tb))
    events.Reload()
    tags = events.Tags()["scalars"]
    for tag in ("train/loss", "train/lr", "train/held_peak_bytes", "train/step_s"):
        assert [e.step for e in events.Scalars(tag)] == [1, 2, 3], tag
    assert [e.step for e in events.Scalars("eval/loss")] == [0, 2, 3] and "eval/accuracy" in tags
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    assert [e.value for e in events.Scalars("train/loss")] == _as_stored(history["loss"])
    assert [e.value for e in events.Scalars("train/held_peak_bytes")] == _as_stored(history["held_peak_bytes"])
    assert [e.value for e in events.Scalars("eval/loss")] == _as_stored(r["loss"] for r in history["evals"])


def _as_stored(values) -> list[float]:
    """`values` rounded as TensorBoard stores a scalar (float32)."""
    return [float(np.float32(v)) for v in values]
