"""The convergence study (`mebp compare`) on a tiny random config: outputs, split, metrics."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from mebp_compiler.app import data
from mebp_compiler.app.cli import main
from mebp_compiler.app.compare import StudySettings, eval_steps, evaluate, redraw, run_study, study_blocks, write_study
from tests.conftest import lora_model

SEQ = 16


@pytest.fixture(scope="module")
def text_blocks() -> torch.Tensor:
    """Real text (CPython's pydoc topics) as UTF-8 byte tokens, the tiny models' tokenizer."""
    return data.token_blocks(data.ByteTokenizer(), data.load_text()[:60_000], SEQ)


def test_study_runs_end_to_end_and_writes_png_json_and_table(tmp_path, text_blocks):
    model = lora_model("tiny-llama")
    start = copy.deepcopy(model)
    settings = StudySettings(seq_len=SEQ, batch_size=2, steps=4, eval_every=2, eval_blocks=6,
                             lr=1e-2, mezo_lr=1e-3, work_limit=5)
    study = run_study(model, text_blocks, settings, model_name="tiny-llama", progress=False)
    paths = write_study(study, tmp_path)

    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["png"].stat().st_size > 20_000
    record = json.loads(paths["json"].read_text())
    assert record["settings"]["seq_len"] == SEQ and record["settings"]["batch_size"] == 2
    assert record["train_blocks"] + record["heldout_blocks"] == len(text_blocks)
    methods = {m["method"]: m for m in record["methods"]}
    assert list(methods) == ["mebp", "optimal", "mezo"]
    _, _, evaluated = study_blocks(text_blocks, settings)
    initial = evaluate(start, evaluated)
    for m in methods.values():
        assert len(m["train_loss"]) == len(m["step_s"]) == m["steps"]
        assert m["train_s"] == pytest.approx(sum(m["step_s"]))
        # the held bytes are the runtime's, and equal the liveness prediction
        assert m["held_peak_bytes"] == m["predicted_peak_bytes"] > 0
        points = m["evals"]
        assert points[0]["step"] == 0 and points[0]["train_s"] == 0
        assert (points[0]["heldout_loss"], points[0]["heldout_accuracy"]) == pytest.approx(initial, rel=1e-6)
        assert points[-1]["step"] == m["steps"]
        assert [p["step"] for p in points] == sorted({p["step"] for p in points})
        for p in points:
            assert set(p) == {"step", "train_s", "heldout_loss", "heldout_accuracy", "train_loss"}
            assert 0 <= p["heldout_accuracy"] <= 1 and p["heldout_loss"] > 0
    assert [p["step"] for p in methods["mebp"]["evals"]] == [0, 2, 4]
    # backprop learns: the held-out loss falls
    assert methods["mebp"]["evals"][-1]["heldout_loss"] < methods["mebp"]["evals"][0]["heldout_loss"]
    # MeZO got the mebp run's training time: it stopped at the first step reaching it
    mebp_s, mezo_steps = methods["mebp"]["train_s"], methods["mezo"]["step_s"]
    assert sum(mezo_steps) >= mebp_s > sum(mezo_steps[:-1])
    assert methods["mezo"]["optimizer_state_bytes"] == 0 < methods["mebp"]["optimizer_state_bytes"]
    assert methods["mezo"]["held_peak_bytes"] < methods["mebp"]["held_peak_bytes"]
    # the optimal schedule's default budget is the mebp plan's peak plus AdamW's state, and it fits
    optimal = methods["optimal"]
    assert optimal["settings"]["budget_bytes"] == methods["mebp"]["predicted_peak_bytes"] + optimal["optimizer_state_bytes"]
    assert optimal["held_peak_bytes"] + optimal["optimizer_state_bytes"] <= optimal["settings"]["budget_bytes"]
    common, first, best = record["targets"]
    assert all(step is not None for step in common["steps"].values())
    assert first["heldout_loss"] == min(m["evals"][1]["heldout_loss"] for m in methods.values())
    assert best["heldout_loss"] == min(p["heldout_loss"] for m in methods.values() for p in m["evals"])

    table = paths["table"].read_text()
    assert f"sequence length {SEQ}, batch size 2 (all methods)" in table
    for label in ("backprop, mebp plan", "backprop, optimal schedule", "MeZO", "held peak", "common (reached by all)",
                  "held-out next-token accuracy"):
        assert label in table
    # the study reads back from its JSON and draws the same table
    paths["png"].unlink()
    assert redraw(tmp_path)["table"].read_text() == table and paths["png"].is_file()


def test_evaluation_points_resolve_early_progress():
    assert eval_steps(150, 25) == [5, 10, 25, 50, 75, 100, 125, 150]
    assert eval_steps(4, 2) == [2, 4] and eval_steps(7, 3) == [1, 3, 6, 7]


def test_heldout_blocks_are_disjoint_from_training_blocks():
    n = 200
    blocks = torch.arange(n * SEQ).view(n, SEQ)  # every row is distinct: its first token names it
    settings = StudySettings(seq_len=SEQ, heldout_fraction=0.1, eval_blocks=8, seed=3)
    train, heldout, evaluated = study_blocks(blocks, settings)
    train_rows = set((train[:, 0] // SEQ).tolist())
    heldout_rows = set((heldout[:, 0] // SEQ).tolist())
    assert not train_rows & heldout_rows and train_rows | heldout_rows == set(range(n))
    assert len(heldout_rows) == 20 and evaluated.shape == (8, SEQ)
    assert set((evaluated[:, 0] // SEQ).tolist()) <= heldout_rows
    # training batches are drawn from the training blocks only
    drawn = {int(b[0]) // SEQ for batch in data.batches(train, 4, steps=200) for b in batch["input_ids"]}
    assert drawn <= train_rows


def test_evaluate_equals_a_direct_computation_with_the_model(text_blocks):
    model = lora_model("tiny-qwen2", seed=2)
    blocks = text_blocks[:7]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss, accuracy = evaluate(model, blocks, batch_size=3)
    losses, correct, count = [], 0, 0
    with torch.no_grad():
        for row in blocks:
            ids = row.unsqueeze(0)
            out = model(input_ids=ids, labels=ids)  # transformers' own shifted cross-entropy
            losses.append(float(out.loss))
            for position in range(SEQ - 1):
                correct += int(out.logits[0, position].argmax()) == int(row[position + 1])
                count += 1
    assert loss == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert accuracy == correct / count and 0 < accuracy < 1
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_cli_compare_with_fixed_mezo_steps(tmp_path, capsys):
    code = main(["compare", "--model", "tiny-llama", "--seq-len", str(SEQ), "--steps", "4", "--mezo-steps", "8",
                 "--eval-every", "2", "--eval-blocks", "3", "--methods", "mebp,mezo", "--out", str(tmp_path),
                 "--no-progress"])
    assert code == 0
    record = json.loads((tmp_path / "study.json").read_text())
    methods = {m["method"]: m for m in record["methods"]}
    assert list(methods) == ["mebp", "mezo"] and record["mezo_budget"] == "8 steps"
    assert methods["mezo"]["steps"] == 8 and [p["step"] for p in methods["mezo"]["evals"]] == [0, 1, 4, 8]
    assert (tmp_path / "curves.png").is_file() and (tmp_path / "table.md").is_file()
    assert "| MeZO | 8 |" in capsys.readouterr().out
    assert main(["compare", "--redraw", "--out", str(tmp_path)]) == 0
    assert "| MeZO | 8 |" in capsys.readouterr().out
    assert main(["compare", "--redraw", "--out", str(tmp_path / "nothing")]) == 1
    assert "no study to redraw" in capsys.readouterr().err


def test_cli_compare_explains_itself_and_refuses_bad_settings(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    help_text = capsys.readouterr().out
    assert "MeZO" in help_text and "--mezo-steps" in help_text and "held-out" in help_text
    assert main(["compare", "--model", "tiny-llama", "--methods", "mezo"]) == 2
    assert "--mezo-steps" in capsys.readouterr().err
    assert main(["compare", "--model", "tiny-llama", "--methods", "mezo,mebp"]) == 2
    assert "list it after one" in capsys.readouterr().err
    assert main(["compare", "--model", "tiny-llama", "--methods", "mebp,sgd"]) == 2
    assert "mebp, optimal, mezo" in capsys.readouterr().err
