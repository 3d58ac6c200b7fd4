"""The commands a user expects around training: eval, generate, merge, resume, config files, fast help."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mebp_compiler.app import adapters, data
from mebp_compiler.app.cli import LR_SCHEDULES, main
from mebp_compiler.app.train import LR_SCHEDULES as TRAIN_LR_SCHEDULES
from tests.conftest import lora_model

TINY = ["--model", "tiny-llama", "--seq-len", "32", "--no-progress"]
MEBP = Path(sys.executable).with_name("mebp")


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "qa.jsonl"
    records = [{"prompt": f"Question {i}: what is {i} plus {i}? ", "completion": f"It is {2 * i}."}
               for i in range(60)]
    path.write_text("\n".join(json.dumps(r) for r in records))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, qa_file) -> Path:
    """A run on prompt/completion records: prompts masked, 2 batches accumulated, cosine warmup, evaluations."""
    out = tmp_path_factory.mktemp("trained")
    assert main(["train", *TINY, "--data", str(qa_file), "--mask-prompt", "--steps", "4", "--grad-accum", "2",
                 "--lr-schedule", "cosine", "--warmup-steps", "1", "--eval-every", "2", "--lr", "1e-2",
                 "--out", str(out)]) == 0
    return out


def test_train_records_evaluations_and_the_scheduled_learning_rates(trained):
    history = json.loads((trained / "history.json").read_text())
    assert [e["step"] for e in history["evals"]] == [0, 2, 4]
    assert all(e["tokens"] > 0 and e["perplexity"] > 1 for e in history["evals"])
    assert history["lr"][0] == pytest.approx(1e-2) and history["lr"][1] == pytest.approx(1e-2)
    assert history["lr"][2] < history["lr"][1] and len(history["loss"]) == 4


def test_mebp_eval_measures_the_blocks_train_held_out(trained, qa_file, capsys):
    """The adapter's final held-out loss in history.json, measured again by `mebp eval` with the same split."""
    capsys.readouterr()
    assert main(["eval", "--model", "tiny-llama", "--seq-len", "32", "--adapter", str(trained / "adapter"),
                 "--data", str(qa_file), "--mask-prompt", "--heldout-fraction", "0.1", "--max-blocks", "16",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    final = json.loads((trained / "history.json").read_text())["evals"][-1]
    assert result["tokens"] == final["tokens"]
    assert result["loss"] == pytest.approx(final["loss"], rel=1e-5)
    assert result["accuracy"] == pytest.approx(final["accuracy"])


def test_a_resumed_cli_run_writes_the_adapter_of_the_uninterrupted_one(tmp_path, qa_file):
    common = [*TINY, "--data", str(qa_file), "--grad-accum", "2", "--checkpoint-every", "2"]
    assert main(["train", *common, "--steps", "4", "--out", str(tmp_path / "whole")]) == 0
    assert main(["train", *common, "--steps", "2", "--out", str(tmp_path / "part")]) == 0
    assert main(["train", *common, "--steps", "4", "--out", str(tmp_path / "part"),
                 "--resume", str(tmp_path / "part")]) == 0
    whole = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "part" / "adapter" / "adapter_model.safetensors")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    history = json.loads((tmp_path / "part" / "history.json").read_text())
    assert len(history["loss"]) == 4


def test_resume_with_other_settings_is_one_error_line(tmp_path, qa_file, capsys):
    common = [*TINY, "--data", str(qa_file), "--checkpoint-every", "1"]
    assert main(["train", *common, "--steps", "1", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    assert main(["train", *common, "--steps", "2", "--lr", "1e-4", "--out", str(tmp_path),
                 "--resume", str(tmp_path)]) == 1
    *_, last = capsys.readouterr().err.splitlines()  # after the lines that say what it is doing
    assert last.startswith("mebp train: error: the checkpoint was written by a run with other settings")
    assert "lr 0.002 there, 0.0001 here" in last


def test_greedy_generation_is_the_argmax_of_each_next_token():
    model = lora_model("tiny-qwen2").eval()
    tokenizer = data.ByteTokenizer()
    text = adapters.generate(model, tokenizer, "Hello", max_new_tokens=6)
    ids = list(b"Hello")
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    assert text == tokenizer.decode(ids[5:])


def test_sampling_is_repeatable_by_seed():
    model = lora_model("tiny-llama").eval()
    tokenizer = data.ByteTokenizer()
    draw = [adapters.generate(model, tokenizer, "Hi", max_new_tokens=12, temperature=1.0, seed=s) for s in (1, 1, 2)]
    assert draw[0] == draw[1] != draw[2]


def test_mebp_generate_with_an_adapter_prints_the_prompt_and_its_continuation(trained, capsys):
    capsys.readouterr()
    assert main(["generate", "--model", "tiny-llama", "--adapter", str(trained / "adapter"),
                 "--prompt", "Question 3:", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("Question 3:")


def test_generate_with_base_prints_the_base_models_continuation_then_the_adapters(trained, capsys):
    common = ["generate", "--model", "tiny-llama", "--prompt", "Question 3:", "--max-new-tokens", "5"]
    adapter = ["--adapter", str(trained / "adapter")]
    capsys.readouterr()
    assert main(common) == 0
    base = capsys.readouterr().out
    assert main([*common, *adapter]) == 0
    tuned = capsys.readouterr().out
    assert main([*common, *adapter, "--with-base"]) == 0
    assert capsys.readouterr().out == (f"--- tiny-llama alone:\n{base}--- with the adapter {trained / 'adapter'}:\n"
                                       f"{tuned}")
    assert main([*common, "--with-base"]) == 2


def test_merge_saves_a_plain_model_that_computes_what_base_plus_adapter_computes(trained, tmp_path, capsys):
    adapter = trained / "adapter"
    assert main(["merge", "--model", "tiny-llama", "--adapter", str(adapter), "--out", str(tmp_path / "m")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    reference = adapters.load_model("tiny-llama", adapter)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = reference(input_ids=ids).logits, merged(input_ids=ids).logits
    assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_a_config_file_sets_flags_and_the_command_line_overrides_it(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model: tiny-llama\nseq_len: 32\nsteps: 3\nlr-schedule: linear\nno-progress: true\n")
    assert main(["train", "--config", str(config), "--steps", "2", "--out", str(tmp_path / "out")]) == 0
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    assert len(history["loss"]) == 2 and history["args"]["lr_schedule"] == "linear"
    assert history["args"]["model"] == "tiny-llama"


@pytest.mark.parametrize("text, says", [
    ("stepz: 3\n", "'stepz' is not a setting of mebp train"),
    ("lora-r: 0\n", "argument --lora-r: must be 1 or more"),
    ("- steps\n", "expected a mapping of flag names to values"),
    ("steps: [\n", "not valid YAML"),
])
def test_a_bad_config_file_is_one_error_line(tmp_path, capsys, text, says):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    assert main(["train", *TINY, "--steps", "1", "--config", str(config), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_the_cli_and_the_trainer_offer_the_same_lr_schedules():
    assert LR_SCHEDULES == TRAIN_LR_SCHEDULES


HEAVY = ("torch", "transformers", "peft", "ortools")


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["train", "--steps", "0"],
                                  ["train", "--policy", "optimal"], ["compile", "--budget", "12XB"],
                                  ["eval", "--heldout-fraction", "1"], ["generate", "--top-p", "2"],
                                  ["compare", "--help"], ["compare", "--steps", "0"], ["compare", "--methods", "foo"],
                                  ["compare", "--methods", "mezo"], ["compare", "--buckets", "2"],
                                  ["compare", "--lora-layers", "x"], ["federate", "--clients", "0"],
                                  ["federate", "--lora-layers", "3-1"]])
def test_help_and_argument_errors_load_no_heavy_library(argv):
    code = ("import sys\nfrom mebp_compiler.app.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "print('loaded:', *(m for m in %r if m in sys.modules))" % (argv, HEAVY))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.stdout.splitlines()[-1] == "loaded:", run.stdout[-300:]


def test_help_answers_within_a_few_interpreter_starts():
    """`mebp --help` against `python -c pass` and `python -c "import torch"`, timed side by side (best of 3)."""
    def best(*argv: str) -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            subprocess.run(argv, capture_output=True, check=True)
            times.append(time.perf_counter() - start)
        return min(times)

    bare, torch_import, help_ = best(sys.executable, "-c", "pass"), best(sys.executable, "-c", "import torch"), \
        best(str(MEBP), "--help")
    assert help_ < 10 * bare and help_ < 0.5 * torch_import, (help_, bare, torch_import)


def test_compile_says_what_it_is_doing_and_how_long_each_phase_took(tmp_path, capsys):
    assert main(["compile", "--model", "tiny-llama", "--seq-len", "16", "--budget", "5MB", "--int4",
                 "-o", str(tmp_path)]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[mebp] ")]
    for what in ("capturing the training step", "quantizing frozen weights to INT4", "applying the optimal schedule"):
        assert any(line.startswith(f"[mebp] {what}") and line.endswith(" ...") for line in lines), what
        assert any(line.startswith(f"[mebp] {what}") and " done in " in line for line in lines), what
    assert any("scheduling under a budget of 4.8 MiB" in line for line in lines)
    assert any(line.startswith("[mebp] scheduling: ") and "bound" in line for line in lines)
