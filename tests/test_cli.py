"""The `mebp` command line: arguments checked before anything is loaded or written, one error style."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import mebp_compiler
from mebp_compiler.app import cli
from mebp_compiler.app.cli import main

TINY = ["--model", "tiny-llama", "--seq-len", "32", "--steps", "2", "--no-progress"]
MEBP = Path(sys.executable).with_name("mebp")


@pytest.fixture(scope="module")
def previous_run(tmp_path_factory) -> Path:
    """The directory of a finished `mebp train` run: adapter, loss plot, history."""
    out = tmp_path_factory.mktemp("previous-run")
    assert main(["train", *TINY, "--out", str(out)]) == 0
    return out


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def one_error_line(err: str, command: str) -> str:
    """The text of stderr, asserted to be exactly one `mebp COMMAND: error: ...` line."""
    assert err.startswith(f"mebp {command}: error: ") and err.count("\n") == 1, err
    return err


BAD_TRAIN_ARGUMENTS = [
    (["--steps", "0"], "--steps: must be 1 or more, got 0"),
    (["--steps", "-3"], "--steps: must be 1 or more"),
    (["--seq-len", "0"], "--seq-len: must be 1 or more"),
    (["--batch-size", "0"], "--batch-size: must be 1 or more"),
    (["--lr", "0"], "--lr: must be a finite number greater than 0"),
    (["--lr", "nan"], "--lr: must be a finite number"),
    (["--lora-r", "0"], "--lora-r: must be 1 or more"),
    (["--lora-alpha", "-1"], "--lora-alpha: must be 1 or more"),
    (["--threads", "0"], "--threads: must be 1 or more"),
    (["--head-chunks", "-1"], "--head-chunks: expected a whole number >= 0 or 'auto'"),
    (["--vocab-slices", "-2"], "--vocab-slices: must be 0 or more"),
    (["--mlp-chunks", "-1"], "--mlp-chunks: must be 0 or more"),
    (["--int4", "--group-size", "0"], "--group-size: must be 1 or more"),
    (["--int4", "--group-size", "7"], "group size 7 does not divide the 64 input features of model.embed_tokens"),
    (["--budget", "12XB"], "cannot read '12XB' as a size"),
    (["--budget", "0"], "--budget: must be more than 0 bytes"),
    (["--device", "no-such-phone"], "no device profile 'no-such-phone'"),
    (["--policy", "mebp", "--budget", "300MB"], "--budget caps the schedule of --policy optimal"),
    (["--policy", "none", "--budget", "300MB"], "--budget caps the schedule of --policy optimal"),
    (["--policy", "optimal"], "give --budget SIZE"),
    (["--head-chunks", "auto"], "--head-chunks auto takes the fewest chunks whose step fits --budget"),
    (["--mlp-chunks", "64"], "--mlp-chunks 64 is more than the 32 tokens of --seq-len"),
    (["--vocab-slices", "1000"], "more than the 256 tokens of tiny-llama's vocabulary"),
    (["--gguf-blocks"], "tiny-llama is not loaded from one"),
    (["--model", "qwen-tiny"], "unknown model 'qwen-tiny'"),
    (["--model", "/no/such/model"], "/no/such/model is neither a model directory nor a .gguf file"),
    (["--model", "no-such-org/no-such-model"], "not in the local Hugging Face cache"),
    (["--method", "mezo", "--fuse-update", "--budget", "1GB"],
     "--budget, --fuse-update apply to --method backprop only"),
    (["--eps", "1e-3"], "--eps is MeZO's perturbation scale"),
]


@pytest.mark.parametrize("bad, says", BAD_TRAIN_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_TRAIN_ARGUMENTS])
def test_train_refuses_bad_arguments_before_loading_or_touching_out(previous_run, tmp_path, capsys, bad, says):
    before = snapshot(previous_run)
    assert main(["train", *TINY, "--out", str(previous_run), *bad]) == 2
    assert says in one_error_line(capsys.readouterr().err, "train")
    assert snapshot(previous_run) == before
    assert main(["train", *TINY, "--out", str(tmp_path / "new"), *bad]) == 2
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("command, says", [
    (["plan", "--model", "tiny-llama", "--seq-len", "0"], "--seq-len: must be 1 or more"),
    (["plan", "--model", "tiny-llama", "--budget", "1MB", "--head-chunks", "auto"], "give a number of chunks"),
    (["run", "DIR", "--steps", "0"], "--steps: must be 1 or more"),
    (["run", "DIR", "--out", "DIR"], "is a directory"),
    (["compile", "--model", "tiny-llama", "--budget", "0"], "--budget: must be more than 0 bytes"),
    (["compile", "--model", "tiny-llama", "--out", "DIR/file"], "is a file, not a directory"),
    (["compare", "--model", "tiny-llama", "--threads", "0"], "--threads: must be 1 or more"),
    (["compare", "--model", "tiny-llama", "--methods", "mezo"], "give mezo_steps (--mezo-steps)"),
])
def test_other_commands_refuse_bad_arguments(tmp_path, capsys, command, says):
    (tmp_path / "file").write_text("not a directory")
    command = [a.replace("DIR", str(tmp_path)) for a in command]
    assert main(command) == 2
    assert says in one_error_line(capsys.readouterr().err, command[0])


def test_a_failing_train_or_compile_leaves_no_out_directory(tmp_path, capsys):
    binary = tmp_path / "notes.txt"
    binary.write_bytes(bytes(range(128, 256)) * 8)
    assert main(["train", *TINY, "--data", str(binary), "--out", str(tmp_path / "train")]) == 1
    assert f"{binary} is not UTF-8 text" in one_error_line(capsys.readouterr().err, "train")
    assert main(["compile", "--model", "tiny-llama", "--seq-len", "16", "--budget", "100KB",
                 "--out", str(tmp_path / "compile")]) == 1
    assert "least feasible budget" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_step_larger_than_this_machine_is_refused_before_it_runs(tmp_path, capsys):
    """seq 100000 on tiny-llama: the attention scores alone are hundreds of GB."""
    out = tmp_path / "run"
    assert main(["train", "--model", "tiny-llama", "--seq-len", "100000", "--steps", "1", "--no-progress",
                 "--out", str(out)]) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert "GiB more memory at its peak" in err and "available" in err and "--seq-len" in err
    assert not out.exists()


def test_a_diverging_run_stops_with_one_line_and_keeps_the_previous_adapter(previous_run, capsys):
    before = snapshot(previous_run)
    assert main(["train", *TINY, "--steps", "3", "--lr", "1e30", "--out", str(previous_run)]) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("mebp train: error: step 2: the loss is nan") and "--lr" in err
    assert snapshot(previous_run) == before


def project_exceptions() -> list[type[BaseException]]:
    """Every public exception class the project defines (in its modules that import here)."""
    found = {}
    packages = [mebp_compiler, importlib.import_module("mebp_compiler.passes"),
                importlib.import_module("mebp_compiler.targets")]  # passes/ and targets/ live beside the package
    for package in packages:
        submodules = [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
        for module in [package.__name__, *submodules]:
            try:
                loaded = importlib.import_module(module)
            except ImportError:  # an optional target's runtime that is not installed
                continue
            for value in vars(loaded).values():
                if (isinstance(value, type) and issubclass(value, Exception) and not issubclass(value, Warning)
                        and value.__module__ == module and not value.__name__.startswith("_")):
                    found[value.__qualname__] = value
    return [found[name] for name in sorted(found)]


#: Errors the command line never causes by its input: reaching the user, they are bugs.
BUG_EXCEPTIONS = {"UpdaterMissing"}


@pytest.mark.parametrize("error", project_exceptions(), ids=lambda e: e.__name__)
def test_every_project_error_reaches_the_user_as_one_line(monkeypatch, capsys, error):
    exc = error.__new__(error)
    BaseException.__init__(exc, "what is wrong\nand what to do")

    def run(args):
        raise exc

    monkeypatch.setattr(cli, "_run_plan", run)
    assert main(["plan", "--model", "tiny-llama"]) == (2 if error is cli.UsageError else 1)
    err = capsys.readouterr().err
    if error.__name__ in BUG_EXCEPTIONS:
        assert "Traceback" in err and "this is a bug in mebp-compiler" in err.splitlines()[-1]
    else:
        assert err == "mebp plan: error: what is wrong and what to do\n"


def test_a_bug_shows_its_traceback_and_how_to_report_it_and_debug_shows_every_traceback(monkeypatch, capsys):
    def run(args):
        raise KeyError("stage_3")

    monkeypatch.setattr(cli, "_run_plan", run)
    assert main(["plan", "--model", "tiny-llama"]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert "this is a bug in mebp-compiler (KeyError: 'stage_3')" in lines[-1] and "report" in lines[-1]
    for argv in (["--debug", "plan", "--model", "tiny-llama"], ["plan", "--model", "tiny-llama", "--debug"]):
        with pytest.raises(KeyError):
            main(argv)


def test_the_installed_command_checks_its_arguments_first_and_exits_2_with_one_line(tmp_path):
    """The console script's exit code and whole stderr (the in-process tests cover exit code 1 and --debug)."""
    (tmp_path / "manifest.json").write_text('{"format_version": 1}')  # corrupt, but never read
    run = subprocess.run([MEBP, "run", str(tmp_path), "--steps", "0"], capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr == "mebp run: error: argument --steps: must be 1 or more, got 0 (see mebp run --help)\n"


def test_train_a_saved_model_by_path_and_load_its_adapter_with_peft(tmp_path, capsys):
    """`--model DIR` trains a model saved with save_pretrained, with the tokenizer saved beside it; the
    adapter names DIR, so peft's AutoPeftModelForCausalLM rebuilds the trained model from it alone."""
    import torch
    from peft import AutoPeftModelForCausalLM
    from safetensors.torch import load_file

    from tests.test_models import save_tiny_model_with_tokenizer

    model_dir = save_tiny_model_with_tokenizer(tmp_path / "my-model")
    assert main(["train", *TINY, "--model", str(model_dir), "--out", str(tmp_path / "run")]) == 0
    assert "no tokenizer files" not in capsys.readouterr().err
    adapter = tmp_path / "run" / "adapter"
    assert (tmp_path / "run" / "history.json").is_file()
    trained = AutoPeftModelForCausalLM.from_pretrained(adapter)
    assert trained.peft_config["default"].base_model_name_or_path == str(model_dir.resolve())
    saved = load_file(adapter / "adapter_model.safetensors")
    state = trained.state_dict()
    for key, value in saved.items():
        assert torch.equal(state[key.replace(".weight", ".default.weight")], value)
    assert any(value.abs().sum() > 0 for key, value in saved.items() if "lora_B" in key)  # it did train


@pytest.mark.slow
def test_the_same_seed_gives_smollm2_the_same_lora_init_whatever_the_process_rng_was():
    import argparse

    import torch

    args = argparse.Namespace(model="smollm2-135m", seed=0, dtype="float32", lora_r=16, lora_alpha=32)
    inits = []
    for process_seed in (1, 2):  # torch seeds its global RNG at random in each process
        torch.manual_seed(process_seed)
        model = cli._load_lora_model(args)
        inits.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    assert inits[0].keys() == inits[1].keys() and all(torch.equal(inits[0][n], inits[1][n]) for n in inits[0])
