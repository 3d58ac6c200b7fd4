"""The `mebp` command line.

Only the chosen command's arguments are built, and nothing imports torch, transformers or
peft before the arguments are checked, so `mebp --help` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import math
import os
import sys
import textwrap
import time
import traceback
import warnings
from pathlib import Path
from typing import NoReturn

DEMO_STEPS = 60
DEMO_SEQ_LEN = 128
BACKPROP_LR = 2e-3
MEZO_LR = 1e-4
MEZO_EPS = 1e-3
LR_SCHEDULES = ("constant", "linear", "cosine")
#: Floating dtypes the model's weights can be loaded and trained in (`--dtype`; torch's names, without torch).
DTYPES = ("float32", "bfloat16", "float16")

EPILOG = """\
examples:
  mebp train                                  # demo: LoRA on SmolLM2-135M, pydoc text, mebp policy
  mebp train --data notes.txt --steps 200     # your own text (.txt, or .jsonl: text, prompt/completion, chat)
  mebp train --data chat.jsonl --mask-prompt --eval-every 20 --lr-schedule cosine --warmup-steps 10
  mebp eval --adapter runs/train-smollm2-135m/adapter   # held-out loss, perplexity, next-token accuracy
  mebp generate --adapter runs/train-smollm2-135m/adapter --prompt "The capital of France is"
  mebp merge --adapter runs/train-smollm2-135m/adapter --out merged/   # one safetensors model
  mebp compile --model smollm2-135m --budget 700MB   # optimal schedule under a hard cap
  mebp plan --model qwen2.5-0.5b --seq-len 256   # predicted memory of a real-size model (meta device)
  mebp compare                                # backprop (mebp, optimal) vs. MeZO on SmolLM2-135M (README)
  mebp compile --model smollm2-135m --target onnx -o out/   # per-stage training graphs + manifest
  mebp run out/ --steps 10                    # train with those artifacts here
  mebp compile --model smollm2-135m --target coreml -o pkg/ # .mlpackage stages, each checked here
  mebp federate --int4 --clients 4 --budgets 64MB,256MB,512MB,1GB   # Flower simulation, a budget per client
"""


class UsageError(ValueError):
    """A command line that cannot run as given (exit code 2, as argparse's own errors)."""


class _ArgumentError(UsageError):
    """An argument argparse cannot parse; `prog` is the (sub)command that reports it."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(f"{message} (see {prog} --help)")
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse that raises its errors (`main` reports them as one line) instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise _ArgumentError(self.prog, message)


def main(argv: list[str] | None = None) -> int:
    """Run one `mebp` command; return its exit code.

    Every error is one line on stderr, `mebp COMMAND: error: ...`: exit code 2 for a
    command line that cannot run as given (checked before anything is loaded or written),
    1 for an error while running. An exception that is not one of those is a bug: its
    traceback is shown with how to report it. `--debug` shows every error's traceback.
    """
    parser = _Parser(
        prog="mebp",
        description="Compile exact LoRA backpropagation under a memory plan and run it on CPU.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    debug = _Parser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback of an error")
    debug.add_argument("--config", default=None, metavar="FILE",
                       help="a YAML or JSON file of this command's settings, flag names as keys (e.g. "
                            "steps: 200, lr-schedule: cosine); flags given on the command line override it")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if a in COMMANDS), None)
    for name, (summary, add) in COMMANDS.items():
        if name == chosen:
            add(sub, debug)
        else:  # listed in `mebp --help`; its arguments are built only when it is the command
            sub.add_parser(name, help=summary)
    try:
        if chosen is not None:
            argv = with_config(argv, chosen, sub.choices[chosen])
        args = parser.parse_args(argv)
    except _ArgumentError as exc:
        print(f"{exc.prog}: error: {exc}", file=sys.stderr)
        return 2
    if args.command is None:
        parser.print_help()
        return 2
    try:
        with warnings.catch_warnings(), _phase_lines():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            if not args.debug:
                warnings.showwarning = _show_warning
            args.check(args)
            import torch

            torch.set_num_threads(args.threads)
            return args.run(args)
    except Exception as exc:
        if args.debug:
            raise
        return _report(args.command, exc)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"mebp {args.command}: interrupted", file=sys.stderr)
        return 130


@contextlib.contextmanager
def _phase_lines():
    """Show the library's phase lines (`mebp_compiler.progress`) on stderr as `[mebp] ...` while the command runs."""
    logger = logging.getLogger("mebp_compiler")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[mebp] %(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that say what is wrong with the input or the request: reported as one line."""
    from mebp_compiler.targets import TargetUnavailableError
    from mebp_compiler.targets.fx_stage import UnsupportedStageOpError
    from mebp_compiler.targets.native_driver import NativeDriverError
    from mebp_compiler.app.tensorboard_log import TensorBoardMissing

    # ValueError covers the project's own input errors (CaptureError, BudgetInfeasible, ManifestError,
    # ScheduleNotFound, ...), OSError the files (OffloadError), MemoryError InsufficientMemory,
    # FloatingPointError NonFiniteStep.
    return (ValueError, OSError, MemoryError, FloatingPointError, TargetUnavailableError, UnsupportedStageOpError,
            NativeDriverError, TensorBoardMissing)


def _report(command: str, exc: Exception) -> int:
    """Print `exc` as one line (or, for a bug, its traceback and how to report it); the exit code."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, UsageError) or isinstance(exc, _user_errors()):
        print(f"mebp {command}: error: {message}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    traceback.print_exception(exc)
    print(f"mebp {command}: error: this is a bug in mebp-compiler ({type(exc).__name__}: {message}), not a "
          "problem with your input; please report it on the project's issue tracker with the command line "
          "and the traceback above", file=sys.stderr)
    return 1


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line, without the source location (--debug keeps Python's format)."""
    print(f"[mebp] warning: {message}", file=sys.stderr, flush=True)


def _count(minimum: int):
    """argparse type: a whole number >= `minimum`."""

    def count(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more, got {value}")
        return value

    return count


_positive = _count(1)
_non_negative = _count(0)


def _positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number greater than 0, got {text}")
    return value


def _size(text: str) -> int:
    """argparse type: a memory size (300MB, 1.5GiB, bytes) of at least one byte, in bytes."""
    from mebp_compiler.device import parse_size

    try:
        value = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be more than 0 bytes, got {text!r}")
    return value


def _head_chunks(text: str) -> int | str:
    """argparse type: a number of chunks >= 0, or 'auto'."""
    if text == "auto":
        return text
    try:
        return _non_negative(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0 or 'auto', got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    """argparse type: comma-separated module names, at least one."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated module names, got {text!r}")
    return names


def _lora_targets(text: str) -> tuple[str, ...] | str:
    """argparse type: 'all-linear', or comma-separated names of linear layers."""
    return text if text == "all-linear" else _names(text)


def _layer_indices(text: str) -> tuple[int, ...]:
    """argparse type: block indices from 0, comma-separated, with ranges such as 0-3 (inclusive)."""
    indices: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        first, _, last = part.partition("-")
        try:
            start, end = int(first), int(last or first)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected block indices such as 0,2 or 0-3, got {text!r}") from None
        if start < 0 or end < start:
            raise argparse.ArgumentTypeError(f"expected block indices >= 0 and ranges low-high, got {part!r}")
        indices += range(start, end + 1)
    return tuple(sorted(set(indices)))


def _model(name: str) -> str:
    """argparse type: a built-in model name, or a model source (`models.resolve`): a directory or
    .gguf file (made absolute) or a Hugging Face id in the local cache."""
    from mebp_compiler.app.model_names import MODEL_NAMES

    if name in MODEL_NAMES:  # checked without importing transformers
        return name
    from mebp_compiler.app import models

    try:
        source = models.resolve(name)
    except (models.UnknownModelError, models.ModelNotFoundError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if source.kind == "gguf":
        return str(Path(source.location) / source.gguf_file)
    return source.location


def _tokenizer(model: str):
    """The model's own tokenizer (`models.load_tokenizer`), else UTF-8 bytes (`data.ByteTokenizer`)."""
    from mebp_compiler.app import adapters, models

    if not models.is_builtin(model) and not models.has_tokenizer(model):
        _say(f"{model} has no tokenizer files; the text is fed as UTF-8 bytes (token ids 0-255)")
    return adapters.tokenizer_for(model)


def _fraction(text: str) -> float:
    """argparse type: a number in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be at least 0 and less than 1, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number of at least 0, got {text}")
    return value


def _directory(text: str) -> str:
    """argparse type: an existing directory."""
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a directory")
    return text


def with_config(argv: list[str], command: str, parser: argparse.ArgumentParser) -> list[str]:
    """`argv` with the settings of its `--config FILE` put in as flags right after `command`.

    The file (YAML, or JSON by its suffix) maps flag names (`steps`, `lr-schedule` or
    `lr_schedule`) to values: true gives a bare flag, false or null leaves it out, a list
    repeats the values. They come before the command line's own flags, so those override
    them, and argparse checks them as it checks flags.
    """
    rest = argv[argv.index(command) + 1:]
    path = None
    for i, token in enumerate(rest):
        if token == "--config" and i + 1 < len(rest):
            path = rest[i + 1]
        elif token.startswith("--config="):
            path = token.split("=", 1)[1]
    if path is None:
        return argv
    settings = _read_config(Path(path), parser.prog)
    flags = []
    for key, value in settings.items():
        flag = "--" + str(key).replace("_", "-")
        if flag not in parser._option_string_actions or flag in ("--config", "--help"):
            raise _ArgumentError(parser.prog, f"--config {path}: {key!r} is not a setting of {parser.prog}")
        if value is True:
            flags.append(flag)
        elif value is not False and value is not None:
            flags += [flag, *(str(v) for v in (value if isinstance(value, list) else [value]))]
    at = argv.index(command) + 1
    return [*argv[:at], *flags, *argv[at:]]


def _read_config(path: Path, prog: str) -> dict:
    import json

    if not path.is_file():
        raise _ArgumentError(prog, f"--config {path}: no such file")
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() == ".json":
        kind, parse, errors = "JSON", json.loads, (ValueError,)
    else:
        try:
            import yaml
        except ImportError:
            raise _ArgumentError(prog, f"--config {path}: reading YAML needs PyYAML (pip install pyyaml); "
                                       "or write the settings as a .json file") from None
        kind, parse, errors = "YAML", yaml.safe_load, (yaml.YAMLError,)
    try:
        settings = parse(text)
    except errors as exc:
        raise _ArgumentError(prog, f"--config {path}: not valid {kind} ({' '.join(str(exc).split())})") from None
    if not isinstance(settings, dict):
        raise _ArgumentError(prog, f"--config {path}: expected a mapping of flag names to values")
    return settings


def _device(name: str) -> str:
    """argparse type: a device profile that loads (a shipped name or a JSON file); kept as given."""
    from mebp_compiler.device import DeviceProfile

    try:
        DeviceProfile.load(name)
    except (ValueError, OSError) as exc:
        raise argparse.ArgumentTypeError(" ".join(str(exc).split())) from None
    return name


def _check_common(args) -> None:
    """Check how the options of `_add_common` combine (each one's own range is its argparse type)."""
    policy = _policy(args)
    if args.budget is not None and policy != "optimal":
        raise UsageError(f"--budget caps the schedule of --policy optimal (the default when --budget is given), "
                         f"not of --policy {policy}: drop --policy {policy} or --budget")
    if policy == "optimal" and args.budget is None:
        raise UsageError("--policy optimal schedules under a hard memory cap: give --budget SIZE, e.g. --budget 300MB")
    if args.head_chunks == "auto" and policy != "optimal":
        raise UsageError("--head-chunks auto takes the fewest chunks whose step fits --budget: give --budget, "
                         "or a number of chunks")
    for flag, chunks in (("--head-chunks", args.head_chunks), ("--mlp-chunks", args.mlp_chunks)):
        if chunks != "auto" and chunks > args.seq_len:
            raise UsageError(f"{flag} {chunks} is more than the {args.seq_len} tokens of --seq-len: "
                             f"give at most {args.seq_len}")
    if args.offload_dir is not None and Path(args.offload_dir).exists() and not Path(args.offload_dir).is_dir():
        raise UsageError(f"--offload-dir {args.offload_dir} is a file, not a directory")
    if not (args.gguf_blocks or args.int4 or args.vocab_slices):
        return
    from mebp_compiler.app import models  # last: these need the model's shapes, from transformers

    if args.gguf_blocks:
        if models.gguf_file_of(args.model) is None:
            raise UsageError(f"--gguf-blocks keeps the blocks of the GGUF file a model is loaded from, and "
                             f"{args.model} is not loaded from one (give smollm2-135m or a .gguf file); drop "
                             "--gguf-blocks or use --int4")
    if args.int4 and not args.gguf_blocks:
        from mebp_compiler.passes.quantize import GroupSizeError, check_group_size

        try:  # the meta-device model: shapes only, nothing read or allocated
            check_group_size(dict(models.load(args.model, device="meta").named_parameters()), args.group_size)
        except GroupSizeError as exc:
            raise UsageError(f"--group-size: {exc}") from None
    if args.vocab_slices:
        vocab_size = models.config(args.model).vocab_size
        if args.vocab_slices > vocab_size:
            raise UsageError(f"--vocab-slices {args.vocab_slices} is more than the {vocab_size} tokens of "
                             f"{args.model}'s vocabulary: give at most {vocab_size}")


def _check_out_dir(out: str | None) -> None:
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise UsageError(f"--out {out} is a file, not a directory")


def _check_train(args) -> None:
    """Everything `mebp train` can check before it loads the data, the model, or touches --out."""
    if args.method == "mezo":
        backprop_only = {"--policy": args.policy is not None, "--budget": args.budget is not None,
                         "--optimizer": args.optimizer is not None, "--checkpoints": args.checkpoints != "ram",
                         "--head-chunks": args.head_chunks != 0, "--vocab-slices": args.vocab_slices != 0,
                         "--mlp-chunks": args.mlp_chunks != 0, "--int4": args.int4,
                         "--gguf-blocks": args.gguf_blocks, "--fuse-update": args.fuse_update,
                         "--grad-accum": args.grad_accum != 1, "--lr-schedule": args.lr_schedule != "constant",
                         "--warmup-steps": args.warmup_steps != 0, "--eval-every": args.eval_every != 0,
                         "--checkpoint-every": args.checkpoint_every != 0, "--resume": args.resume is not None,
                         "--buckets": args.buckets != 0, "--baselines": args.baselines,
                         "--tensorboard": args.tensorboard is not None}
        given = [flag for flag, is_given in backprop_only.items() if is_given]
        if given:
            raise UsageError(f"--method mezo evaluates the model's plain forward and updates by SGD: "
                             f"{', '.join(given)} apply to --method backprop only")
    elif args.eps is not None:
        raise UsageError("--eps is MeZO's perturbation scale: use it with --method mezo")
    if args.grad_accum > 1 and args.fuse_update:
        raise UsageError("--fuse-update applies each update inside the step, so gradients cannot be summed over "
                         "--grad-accum batches: drop one of them")
    if args.warmup_steps > args.steps:
        raise UsageError(f"--warmup-steps {args.warmup_steps} is more than the {args.steps} --steps")
    if args.resume is not None and args.fuse_update:
        raise UsageError("--resume restores the optimizer beside the step, and --fuse-update runs it inside the "
                         "step: drop --fuse-update")
    if args.tensorboard is not None:
        from mebp_compiler.app.tensorboard_log import TensorBoardMissing, check_available

        if Path(args.tensorboard).exists() and not Path(args.tensorboard).is_dir():
            raise UsageError(f"--tensorboard {args.tensorboard} is a file, not a directory")
        try:
            check_available()
        except TensorBoardMissing as exc:
            raise UsageError(str(exc)) from None
    if args.baselines and args.buckets:
        raise UsageError("--baselines measures the step of one batch shape, and --buckets compiles one per length: "
                         "drop one of them")
    if args.buckets and not str(args.data).lower().endswith(".jsonl"):
        raise UsageError(f"--buckets pads the records of a .jsonl file to a few lengths, and --data {args.data} is "
                         "plain text, packed into blocks of --seq-len already: drop --buckets or give such a file")
    _check_data(args)
    _check_common(args)
    _check_out_dir(args.out)


def _check_data(args) -> None:
    if args.mask_prompt and not str(args.data).lower().endswith(".jsonl"):
        raise UsageError(f"--mask-prompt masks the prompts of a .jsonl file of prompt/completion or chat records, "
                         f"and --data {args.data} is plain text: drop --mask-prompt or give such a file")


def _check_compile(args) -> None:
    """Everything `mebp compile` can check before it loads the model or touches --out."""
    _check_common(args)
    _check_out_dir(args.out)
    if args.target and args.dtype != "float32":
        raise UsageError(f"--target {args.target} exports float32 steps only, and --dtype {args.dtype} was given: "
                         f"its stages and drivers are checked in float32; drop --dtype or --target")


def _check_plan(args) -> None:
    """Everything `mebp plan` can check before it builds the model."""
    _check_common(args)
    if args.head_chunks == "auto" and args.policy != "optimal":
        raise UsageError("mebp plan schedules policies none and mebp too, and only optimal chooses --head-chunks "
                         "auto: give a number of chunks, or --policy optimal")


def _check_run(args) -> None:
    """Everything `mebp run` can check before it opens the artifact directory."""
    if args.out is not None:
        out = Path(args.out)
        if out.is_dir():
            raise UsageError(f"--out {out} is a directory: give the file to write the LoRA parameters to "
                             "(safetensors)")
        if not out.parent.is_dir():
            raise UsageError(f"--out {out}: the directory {out.parent} does not exist")


def _check_compare(args) -> None:
    """Everything `mebp compare` can check before it loads the model."""
    if args.redraw:
        return
    if args.buckets:
        raise UsageError("--buckets: mebp compare packs --data into blocks of --seq-len so that every method trains "
                         "on the same batches and is evaluated on the same held-out blocks, and MeZO's forward-only "
                         "step is compiled for one batch shape; drop --buckets (mebp train --buckets trains on "
                         "examples of varying length)")
    try:
        _compare_settings(args).check()
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _add_common(p: argparse.ArgumentParser) -> None:
    from mebp_compiler.app.model_names import MODEL_NAMES
    from mebp_compiler.passes.scheduler.limits import DEFAULT_WORK_LIMIT

    p.add_argument("--model", type=_model, default="smollm2-135m", metavar="NAME|PATH",
                   help=f"model to fine-tune (default: %(default)s): one of {', '.join(MODEL_NAMES)}, a "
                        "directory saved with save_pretrained, a .gguf file, or a Hugging Face id already in "
                        "the local cache (nothing is downloaded); the tokenizer comes from the same place")
    p.add_argument("--seq-len", type=_positive, default=DEMO_SEQ_LEN, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--batch-size", type=_positive, default=1, help="sequences per step (default: %(default)s)")
    p.add_argument("--policy", default=None, choices=("none", "mebp", "optimal"),
                   help="none: keep every activation (plain autograd's memory); mebp: keep block "
                        "inputs, recompute each block in the backward; optimal: the CP-SAT "
                        "scheduler's least-time keep/recompute/offload plan under --budget "
                        "(default: optimal with --budget, else mebp)")
    p.add_argument("--budget", type=_size, default=None, metavar="SIZE",
                   help="hard memory cap for the whole step (weights, LoRA parameters and gradients, "
                        "activations, AdamW state), e.g. 300MB, 1GiB; for --policy optimal only")
    p.add_argument("--device", type=_device, default="iphone15promax",
                   help="device profile for the scheduler's cost model: iphone15promax, cpu-local or a JSON file")
    p.add_argument("--work-limit", type=_positive_float, default=DEFAULT_WORK_LIMIT, metavar="W",
                   help="the scheduler's search limit per solve, in CP-SAT deterministic time: work, not "
                        "seconds, so the plan does not depend on machine load (default: %(default)s)")
    p.add_argument("--checkpoints", default="ram", choices=("ram", "disk"),
                   help="where mebp keeps block checkpoints: RAM, or memory-mapped files (default: %(default)s)")
    p.add_argument("--offload-dir", default=None, help="directory for memory-mapped checkpoints (default: a temporary one)")
    p.add_argument("--head-chunks", type=_head_chunks, default=0, metavar="K|auto",
                   help="compute the LM head and loss in K sequence chunks so no [seq x vocab] tensor "
                        "is held whole; 'auto' (with --budget) takes the fewest that fit (default: 0, unchunked)")
    p.add_argument("--vocab-slices", type=_non_negative, default=0, metavar="S",
                   help="stream the LM head and loss over S vocabulary slices, forward and backward, "
                        "so no [tokens x vocab] logits exist; with --int4 each head slice is "
                        "decompressed on its own (default: 0, off)")
    p.add_argument("--mlp-chunks", type=_non_negative, default=0, metavar="M",
                   help="run every block's MLP on M sequence chunks, so its [seq x intermediate] "
                        "products and their gradients exist a chunk at a time (default: 0, off)")
    p.add_argument("--int4", action="store_true",
                   help="store frozen weights as symmetric INT4 (scale per --group-size inputs), "
                        "dequantized just before each use")
    p.add_argument("--group-size", type=_positive, default=64, help="INT4 group size (default: %(default)s)")
    p.add_argument("--gguf-blocks", action="store_true",
                   help="with smollm2-135m: keep its GGUF file's own quantized blocks (Q4_1 weights, a "
                        "Q8_0 embedding) byte for byte instead of re-quantizing them; implies --int4")
    p.add_argument("--fuse-update", action="store_true",
                   help="apply each LoRA parameter's optimizer update inside the step as soon as its "
                        "gradient is final, instead of holding every gradient to the end (same parameters)")
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="load the model's weights in this dtype and train in it (LoRA parameters and AdamW "
                        "state stay float32, peft's default; --target needs float32) (default: %(default)s)")
    p.add_argument("--lora-r", type=_positive, default=16, help="LoRA rank (default: %(default)s)")
    p.add_argument("--lora-alpha", type=_positive, default=32, help="LoRA alpha (default: %(default)s)")
    _add_lora_placement(p)
    p.add_argument("--threads", type=_positive, default=1,
                   help="torch CPU threads (default: %(default)s; on a busy 2-core machine two threads "
                        "stall each other, see the README)")


def _add_lora_placement(p: argparse.ArgumentParser) -> None:
    """Where LoRA goes and what else trains: peft's target_modules, layers_to_transform, modules_to_save."""
    p.add_argument("--lora-targets", type=_lora_targets, default=None, metavar="NAMES|all-linear",
                   help="comma-separated linear layers that get LoRA, or all-linear for every linear layer but "
                        "the LM head (default: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj)")
    p.add_argument("--lora-layers", type=_layer_indices, default=None, metavar="INDICES",
                   help="decoder blocks that get LoRA, e.g. 0,2 or 8-15 (from 0; default: all)")
    p.add_argument("--modules-to-save", type=_names, default=(), metavar="NAMES",
                   help="comma-separated modules trained in full beside LoRA and saved in the adapter, e.g. "
                        "lm_head or embed_tokens (a head tied to the embedding trains one shared copy)")


def _lora_settings(args):
    """`models.LoraSettings` of the LoRA options (`--lora-r`, `--lora-alpha`, `_add_lora_placement`)."""
    from mebp_compiler.app import models

    placement = {"target_modules": args.lora_targets} if getattr(args, "lora_targets", None) else {}
    return models.LoraSettings(r=args.lora_r, alpha=args.lora_alpha, **placement,
                               layers_to_transform=getattr(args, "lora_layers", None),
                               modules_to_save=getattr(args, "modules_to_save", ()))


def _add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="pydoc",
                   help="'pydoc' (CPython's bundled documentation text), a .txt file, or a .jsonl file of "
                        '{"text": ...}, {"prompt": ..., "completion": ...} or {"messages": [{"role": ..., '
                        '"content": ...}, ...]} records (chat through the tokenizer\'s chat template) '
                        "(default: %(default)s)")
    p.add_argument("--mask-prompt", action="store_true",
                   help="with prompt/completion or chat records: learn the answers only (labels -100 on the "
                        "prompt's tokens, every non-assistant message and each assistant header)")
    p.add_argument("--heldout-fraction", type=_fraction, default=None, metavar="F",
                   help="fraction of the token blocks held out for evaluation, chosen by --seed (default: 0.1 "
                        "with --eval-every or for mebp eval, else 0)")


def _add_train(sub, debug: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "train", parents=[debug], help=COMMANDS["train"][0],
        description="LoRA fine-tuning of a causal LM on real text, every step compiled and run by "
                    "mebp's CPU runtime. Writes the adapter (peft, safetensors), the loss curve "
                    "(PNG) and the per-step history (JSON) to --out.",
    )
    _add_common(p)
    _add_data(p)
    p.add_argument("--steps", type=_positive, default=DEMO_STEPS, help="optimizer steps (default: %(default)s)")
    p.add_argument("--grad-accum", type=_positive, default=1, metavar="K",
                   help="sum the gradients of K batches per optimizer step, weighted by their predicted tokens: "
                        "exactly the gradient of one K x --batch-size batch, in the memory of one (default: 1)")
    p.add_argument("--lr-schedule", default="constant", choices=LR_SCHEDULES,  # train.LR_SCHEDULES, without torch
                   help="after the warmup: constant, linear decay to 0 or cosine decay to 0 over the remaining "
                        "steps (default: %(default)s)")
    p.add_argument("--warmup-steps", type=_non_negative, default=0, metavar="N",
                   help="raise the learning rate linearly over the first N steps (default: 0)")
    p.add_argument("--buckets", type=_non_negative, default=0, metavar="K",
                   help="with a .jsonl file: train on each record as an example of its own (cut at --seq-len), "
                        "padded (attention mask, labels -100) to at most K lengths, one plan compiled per length "
                        "on first use, each under the same --budget (default: 0, records packed into blocks of "
                        "--seq-len)")
    p.add_argument("--eval-every", type=_non_negative, default=0, metavar="N",
                   help="evaluate the held-out blocks (--heldout-fraction) before training, every N steps and "
                        "at the end: loss, perplexity, next-token accuracy (default: 0, never)")
    p.add_argument("--eval-blocks", type=_positive, default=16, metavar="B",
                   help="at most B held-out blocks per evaluation (default: %(default)s)")
    p.add_argument("--checkpoint-every", type=_non_negative, default=0, metavar="N",
                   help="write --out/checkpoint (adapter, optimizer and schedule state, step, data position, RNG) "
                        "every N steps and at the end, replaced whole each time (default: 0, never)")
    p.add_argument("--resume", type=_directory, default=None, metavar="DIR",
                   help="continue the run whose checkpoint is in DIR (a checkpoint directory, or a run directory "
                        "holding one) with the same settings: the result is that of the uninterrupted run")
    p.add_argument("--method", default="backprop", choices=("backprop", "mezo"),
                   help="backprop: exact gradients by the compiled plan (--policy); mezo: zeroth-order "
                        "MeZO (Malladi et al., 2023), two forward passes per step at +-eps along a "
                        "seeded random direction, SGD update; --policy, --budget and --optimizer do not "
                        "apply (default: %(default)s)")
    p.add_argument("--lr", type=_positive_float, default=None,
                   help=f"learning rate (default: {BACKPROP_LR} for backprop (AdamW); {MEZO_LR} for mezo, whose "
                        "SGD step along a random direction needs a far smaller one)")
    p.add_argument("--eps", type=_positive_float, default=None,
                   help=f"MeZO perturbation scale (default: {MEZO_EPS})")
    p.add_argument("--optimizer", default=None, choices=("adamw", "sgd"), help="(default: adamw)")
    p.add_argument("--seed", type=int, default=0, help="data order, random init and MeZO direction seed (default: %(default)s)")
    p.add_argument("--out", default=None, help="output directory (default: runs/train-MODEL)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--tensorboard", default=None, metavar="DIR",
                   help="write loss, lr, held bytes and step time per step (and each evaluation) to DIR with "
                        "torch.utils.tensorboard; needs the tensorboard package (the 'tensorboard' extra)")
    p.add_argument("--baselines", action="store_true",
                   help="before compiling, run the first batch's step as eager autograd and with transformers' "
                        "gradient checkpointing, measure what each needs (parameters + allocator peak of the "
                        "step) and print it beside what the plan held; marked in --out/memory.png")
    p.set_defaults(run=_run_train, check=_check_train)


def _add_model_and_adapter(p: argparse.ArgumentParser, adapter_required: bool = False) -> None:
    from mebp_compiler.app.model_names import MODEL_NAMES

    p.add_argument("--model", type=_model, default="smollm2-135m", metavar="NAME",
                   help=f"the base model (default: %(default)s); one of {', '.join(MODEL_NAMES)}")
    p.add_argument("--adapter", type=_directory, default=None, required=adapter_required, metavar="DIR",
                   help="a LoRA adapter directory (what mebp train writes to --out/adapter)"
                        + ("" if adapter_required else "; default: the base model alone"))
    p.add_argument("--seed", type=int, default=0, help="random-weight seed of the tiny and planning models, "
                   "held-out split and sampling seed (default: %(default)s)")
    p.add_argument("--threads", type=_positive, default=1, help="torch CPU threads (default: %(default)s)")


def _add_eval(sub, debug: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "eval", parents=[debug], help=COMMANDS["eval"][0],
        description="Evaluate the base model, or the base model with a LoRA adapter, on held-out text: the "
                    "blocks mebp train holds out with the same --data, --seq-len, --heldout-fraction and "
                    "--seed (with --heldout-fraction 0: every block). Prints the loss (nats per predicted "
                    "token), perplexity and next-token accuracy; --mask-prompt counts the answers only.",
    )
    _add_model_and_adapter(p)
    _add_data(p)
    p.add_argument("--seq-len", type=_positive, default=DEMO_SEQ_LEN, help="tokens per block (default: %(default)s)")
    p.add_argument("--batch-size", type=_positive, default=4, help="blocks per forward pass (default: %(default)s)")
    p.add_argument("--max-blocks", type=_positive, default=None, metavar="B",
                   help="evaluate at most the first B held-out blocks (default: all)")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    p.set_defaults(run=_run_eval, check=_check_data)


def _add_generate(sub, debug: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "generate", parents=[debug], help=COMMANDS["generate"][0],
        description="Continue a prompt with the base model, or the base model with a LoRA adapter "
                    "(transformers' generate): greedy by default, or sampled with --temperature and --top-p "
                    "from --seed. Prints the prompt and its continuation.",
    )
    _add_model_and_adapter(p)
    p.add_argument("--prompt", default="The capital of France is", help="text to continue (default: %(default)r)")
    p.add_argument("--chat", action="store_true",
                   help="send --prompt as a user message through the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=_positive, default=40, help="(default: %(default)s)")
    p.add_argument("--temperature", type=_non_negative_float, default=0.0,
                   help="0: greedy decoding; above 0: sampling at this temperature (default: %(default)s)")
    p.add_argument("--top-p", type=_positive_float, default=1.0, help="nucleus sampling mass (default: %(default)s)")
    p.add_argument("--with-base", action="store_true",
                   help="with --adapter: first continue the prompt with the base model alone (the adapter "
                        "disabled, one model load), then with the adapter, each under a heading")
    p.set_defaults(run=_run_generate, check=_check_generate)


def _add_merge(sub, debug: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "merge", parents=[debug], help=COMMANDS["merge"][0],
        description="Fold a LoRA adapter into its base model's weights (peft's merge_and_unload) and save the "
                    "plain transformers model (safetensors, config, and the tokenizer where the model has one) "
                    "to --out, which transformers' from_pretrained loads without peft.",
    )
    _add_model_and_adapter(p, adapter_required=True)
    p.add_argument("--out", required=True, help="output directory (replaced whole)")
    p.set_defaults(run=_run_merge, check=_check_merge)


def _check_merge(args) -> None:
    _check_out_dir(args.out)


def _check_generate(args) -> None:
    if args.top_p > 1:
        raise UsageError(f"--top-p {args.top_p:g} is more than 1: give a probability mass in (0, 1]")
    if args.with_base and args.adapter is None:
        raise UsageError("--with-base compares the base model with an adapter: give --adapter DIR")


def _run_eval(args) -> int:
    import json

    from mebp_compiler.app import adapters, data
    from mebp_compiler.app.evaluate import evaluate

    _say(f"loading {args.model}{' with ' + args.adapter if args.adapter else ''} ...")
    model = adapters.load_model(args.model, args.adapter, seed=args.seed)
    ids, labels = data.labelled_blocks(adapters.tokenizer_for(args.model), args.data, args.seq_len,
                                       mask_prompt=args.mask_prompt)
    fraction = 0.1 if args.heldout_fraction is None else args.heldout_fraction
    if fraction > 0:
        _, rows = data.split_rows(ids.shape[0], fraction, seed=args.seed)
        ids, labels = ids[rows], labels[rows]
    ids, labels = ids[: args.max_blocks], labels[: args.max_blocks]
    _say(f"evaluating {ids.shape[0]} {'held-out ' if fraction > 0 else ''}blocks of {args.seq_len} tokens ...")
    result = evaluate(model, ids, labels, batch_size=args.batch_size)
    print(json.dumps(result.to_json()) if args.json else result.describe())
    return 0


def _run_generate(args) -> int:
    from mebp_compiler.app import adapters

    model = adapters.load_model(args.model, args.adapter, seed=args.seed)
    tokenizer = adapters.tokenizer_for(args.model)
    prompt = args.prompt
    if args.chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
    def continuation() -> str:
        return adapters.generate(model, tokenizer, prompt, max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, top_p=args.top_p, seed=args.seed)

    if args.with_base:
        with model.disable_adapter():
            base = continuation()
        print(f"--- {args.model} alone:\n{prompt}{base}\n--- with the adapter {args.adapter}:")
    print(f"{prompt}{continuation()}")
    return 0


def _run_merge(args) -> int:
    from mebp_compiler.app import adapters

    _say(f"merging {args.adapter} into {args.model} ...")
    out = adapters.merge(args.model, args.adapter, args.out)
    _say(f"wrote {out}/ (model.safetensors, config.json): load it with "
         "transformers.AutoModelForCausalLM.from_pretrained")
    return 0


def _add_compile(sub, debug: argparse.ArgumentParser) -> None:
    from mebp_compiler.targets import TARGETS

    targets = "\n".join(textwrap.fill(text, 88, initial_indent=f"  {name:<8}", subsequent_indent=" " * 10)
                         for name, (_, text) in TARGETS.items())
    p = sub.add_parser(
        "compile", parents=[debug], help=COMMANDS["compile"][0],
        description="Capture one training step, schedule it (by default: optimal under --budget) "
                    "and write the schedule (JSON) and its predicted memory to --out. With --target, "
                    "also cut the scheduled step into stages (embedding, each block's forward and "
                    "backward, head and loss) and write one artifact per distinct stage, the manifest "
                    "(manifest.json: stage order, inputs and outputs, checkpoints, predicted peak) "
                    "and the weights (weights.safetensors); `mebp run DIR` executes it.",
        epilog=f"targets:\n{targets}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(p)
    p.add_argument("--seed", type=int, default=0, help="random-weight seed (default: %(default)s)")
    p.add_argument("-o", "--out", default=None, help="output directory (default: runs/compile-MODEL)")
    p.add_argument("--target", default=None, choices=tuple(TARGETS),
                   help="write per-stage training graphs for this runtime (see 'targets' below); "
                        "loads the real weights instead of planning on the meta device")
    p.set_defaults(run=_run_compile, check=_check_compile)


def _run_compile(args) -> int:
    import torch

    from mebp_compiler.app import models
    from mebp_compiler.files import atomic_write_json
    from mebp_compiler.ir import format_bytes
    from mebp_compiler.passes.cost import step_cost
    from mebp_compiler.device import DeviceProfile
    from mebp_compiler.passes.fuse_update import OptimizerSettings
    from mebp_compiler.passes.partition import partition
    from mebp_compiler.app.rundir import COMPILE_ENTRIES, RunDirectory
    from mebp_compiler.targets import load_target

    target = load_target(args.target) if args.target else None
    out = Path(args.out or f"runs/compile-{models.display_name(args.model)}")
    run = RunDirectory(out, COMPILE_ENTRIES)  # locked until the end; the old files stay until the new ones are whole
    device = "cpu" if target else "meta"  # scheduling alone needs shapes, not weights
    model = _load_lora_model(args, device=device)
    ids = torch.zeros((args.batch_size, args.seq_len), dtype=torch.int64, device=device)
    _say(f"capturing and scheduling (policy {_policy(args)}) ...")
    start = time.perf_counter()
    # Two tensors, as a training batch has: one tensor under both keys is one step input.
    plan = _compile(model, {"input_ids": ids, "labels": ids.clone()}, args)
    cost = step_cost(plan.captured, plan.schedule, DeviceProfile.load(args.device))
    part = None
    if target:
        _say("partitioning into stages ...")
        # Fused updates run in the stages with what `mebp run` applies by default.
        optimizer = OptimizerSettings(lr=BACKPROP_LR) if args.fuse_update else None
        part = partition(plan.graph, model=args.model, target=args.target, optimizer=optimizer)
    print(plan.profile.report())
    _say(f"scheduled in {time.perf_counter() - start:.1f} s: predicted peak {format_bytes(plan.predicted_peak_bytes)}, "
         f"predicted step {cost.total_s:.3f} s on {args.device} ({cost.extra_s:.3f} s of recompute and I/O)")
    with run.replace() as staging:
        plan.schedule.save(staging / "schedule.json")
        atomic_write_json(staging / "memory.json", {
            "predicted_peak_bytes": plan.predicted_peak_bytes,
            "predicted_peak_activation_bytes": plan.predicted_peak_activation_bytes,
            "predicted_step_s": cost.total_s, "extra_s": cost.extra_s, "budget": args.budget,
            "device": args.device, "stats": plan.schedule.stats,
        })
        if target:
            _write_target(plan, part, model, args, target, staging)
    _say(f"wrote {out}/ (schedule.json, memory.json{', manifest.json, weights and artifacts' if target else ''})")
    return 0


def _write_target(plan, part, model, args, target, out: Path) -> None:
    import torch

    from mebp_compiler.ir import format_bytes
    from mebp_compiler.targets.artifacts import step_weights, write_artifacts

    manifest = part.manifest
    _say(f"{len(manifest.stages)} stages, {len(manifest.unique_artifacts())} distinct; exporting to {args.target} ...")
    start = time.perf_counter()
    facts = write_artifacts(part, target, out, weights=step_weights(model, part, plan.weights))
    total = sum(f["bytes"] for f in facts.values())
    _say(f"wrote {len(facts)} {args.target} artifacts ({format_bytes(total)}) in {time.perf_counter() - start:.1f} s, "
         f"manifest.json and weights.safetensors; staged peak "
         f"{format_bytes(manifest.predicted_peak_bytes)} (op-by-op plan {format_bytes(manifest.plan_peak_bytes)})")
    verify = getattr(target, "verify_artifacts", None)
    if verify is not None:  # a target that cannot run here is checked here as far as it can be
        _say(f"checking every {args.target} artifact against its torch stage on a random batch ...")
        generator = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(0, model.config.vocab_size, tuple(manifest.batch_shape), generator=generator)
        arrays = {k: v.detach().numpy() for k, v in step_weights(model, part).items()}
        arrays.update({"input_ids": ids.numpy(), "labels": ids.numpy()})
        report = verify(part, out, arrays)
        worst = max(a["worst_relative_error"] for a in report["artifacts"].values())
        _say(f"all {len(report['artifacts'])} checks passed (worst error {worst:.2g} x max(1, output scale), "
             f"tolerance {report['tolerance']:g}); wrote {target.CHECK_REPORT}")


def _add_run(sub, debug: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "run", parents=[debug], help=COMMANDS["run"][0],
        description="Execute the stages of an ONNX or MLX artifact directory here (a CoreML one is checked, "
                    "then refused: Core ML predictions need macOS or iOS), as its manifest says (keep, "
                    "free, write to and read from memory-mapped files), for --steps steps on real "
                    "text, applying the LoRA update after each. Everything is checked against the "
                    "manifest before any compute.",
    )
    p.add_argument("directory", help="artifact directory (manifest.json, stage files, weights.safetensors)")
    p.add_argument("--steps", type=_positive, default=10, help="training steps (default: %(default)s)")
    p.add_argument("--data", default="pydoc", help="'pydoc' or a .txt / .jsonl file (default: %(default)s)")
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"), help="(default: %(default)s)")
    p.add_argument("--lr", type=_positive_float, default=BACKPROP_LR, help="learning rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="data order seed (default: %(default)s)")
    p.add_argument("--offload-dir", default=None, help="directory for offloaded tensors (default: a temporary one)")
    p.add_argument("--out", default=None, help="write the trained LoRA parameters here (safetensors)")
    p.add_argument("--threads", type=_positive, default=1, help="CPU threads (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--native", action="store_true",
                   help="run the steps in the native driver (mebp-native, C++ on MLX, no Python in its "
                        "process; MLX directories only): this process tokenizes and writes the token file")
    p.set_defaults(run=_run_artifacts, check=_check_run)


def _run_artifacts(args) -> int:
    from safetensors.numpy import save
    from tqdm.auto import tqdm

    from mebp_compiler.ir import format_bytes
    from mebp_compiler.app.rundir import RunFile
    from mebp_compiler.targets import load_target
    from mebp_compiler.targets.driver import Driver, load_manifest

    out = RunFile(args.out) if args.out else None  # locked until the end; replaced atomically
    manifest = load_manifest(args.directory)
    if args.native:
        return _run_native(args, manifest)
    _say(f"checking {args.directory} ({manifest.target}, {len(manifest.stages)} stages) ...")
    driver = Driver.open(args.directory, load_target(manifest.target), offload_dir=args.offload_dir)
    driver.use_optimizer(args.optimizer, args.lr)
    batches = iter(_training_batches(manifest, args))
    losses, peaks = [], []
    bar = tqdm(range(args.steps), desc=f"run {manifest.target}", unit="step", disable=args.no_progress,
               dynamic_ncols=True)
    for _ in bar:
        batch = next(batches)
        result = driver.train_step(batch)
        losses.append(result.loss)
        peaks.append(result.staged_peak_bytes)
        bar.set_postfix(loss=f"{result.loss:.3f}", held=format_bytes(result.held_peak_bytes))
    _say(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; driver held peak {format_bytes(result.held_peak_bytes)}, "
         f"with the stages' own tensors {format_bytes(max(peaks))} (manifest predicts "
         f"{format_bytes(manifest.predicted_peak_bytes)})")
    if args.out:
        out.write_bytes(save({manifest.adapter_keys.get(k, k): a.copy() for k, a in driver.lora_arrays().items()}))
        _say(f"wrote {args.out}")
    return 0


def _training_batches(manifest, args):
    """`args.steps` batches of real text in the manifest's batch shape, as `mebp run` trains on."""
    from mebp_compiler.app import data

    batch_size, seq_len = manifest.batch_shape
    tokenizer = _tokenizer(manifest.model)
    blocks = data.token_blocks(tokenizer, data.load_text(None if args.data == "pydoc" else args.data), seq_len)
    batches = data.batches(blocks, batch_size, seed=args.seed)
    return [{k: v.numpy() for k, v in next(batches).items()} for _ in range(args.steps)]


def _run_native(args, manifest) -> int:
    import tempfile

    from mebp_compiler.ir import format_bytes
    from mebp_compiler.targets import native_driver

    if manifest.target != "mlx":
        raise ValueError(f"--native runs MLX artifact directories; {args.directory} holds {manifest.target} "
                         "artifacts: compile with --target mlx, or run without --native")
    driver = native_driver.ensure_built()
    with tempfile.TemporaryDirectory(prefix="mebp-native-") as scratch:
        tokens = native_driver.write_tokens(Path(scratch) / "tokens.bin", _training_batches(manifest, args))
        _say(f"running {args.steps} steps in {driver} ...")
        result = native_driver.run(args.directory, tokens, args.out or Path(scratch) / "lora.safetensors",
                                   optimizer=args.optimizer, lr=args.lr, offload_dir=args.offload_dir,
                                   threads=args.threads, driver=driver)
    _say(f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}; driver held peak "
         f"{format_bytes(result.held_peak_bytes)}, with the stages' own tensors {format_bytes(result.staged_peak_bytes)} "
         f"(manifest predicts {format_bytes(manifest.predicted_peak_bytes)}); process peak RSS "
         f"{format_bytes(result.vm_hwm_bytes)} (anonymous {format_bytes(result.rss_anon_peak_bytes)}, file-backed "
         f"{format_bytes(result.rss_file_peak_bytes)})")
    if args.out:
        _say(f"wrote {args.out}")
    return 0


def _add_plan(sub, debug: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "plan", parents=[debug], help=COMMANDS["plan"][0],
        description="Capture one training step (on the meta device: no weights are allocated), "
                    "schedule it with each policy - none and mebp, and optimal under --budget - or with "
                    "--policy alone, and print the predicted memory.",
    )
    _add_common(p)
    p.set_defaults(run=_run_plan, check=_check_plan)


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where there is none (the help then says what happens)."""

    def _get_help_string(self, action):
        return action.help if action.default is None or action.default is False else super()._get_help_string(action)


def _add_compare(sub, debug: argparse.ArgumentParser) -> None:
    from mebp_compiler.app.study_settings import StudySettings

    d = StudySettings()
    p = sub.add_parser(
        "compare", parents=[debug], help=COMMANDS["compare"][0],
        description="Fine-tune the same LoRA adapter three ways on the same text - backprop under the mebp plan, "
                    "backprop under the scheduler's optimal plan at a budget (default: the mebp plan's peak plus "
                    "AdamW's state, i.e. the same memory at the least predicted time), and MeZO (Malladi et al., "
                    "2023; forward passes only) - with equal batch size and sequence length, and record the "
                    "training loss, held-out loss and held-out next-token accuracy against step and training wall "
                    "time, with each method's held peak bytes. Held-out blocks are disjoint from training blocks. "
                    "Writes curves.png, study.json (every point) and table.md (final metrics, memory, steps and "
                    "time to reach the same held-out loss) to --out. The defaults took 35 minutes on a heavily loaded "
                    "2-core machine (about 15-17 expected on a quiet one; see the README).",
        formatter_class=_DefaultsHelpFormatter,
    )
    from mebp_compiler.app.model_names import MODEL_NAMES

    p.add_argument("--model", type=_model, default="smollm2-135m", metavar="NAME|PATH",
                   help=f"one of {', '.join(MODEL_NAMES)}, a save_pretrained directory, a .gguf file or a cached "
                        "Hugging Face id")
    p.add_argument("--data", default="pydoc", help="'pydoc' (CPython's bundled documentation text) or a .txt/.jsonl file")
    p.add_argument("--steps", type=_positive, default=d.steps, help="backprop steps (each backprop method)")
    p.add_argument("--mezo-steps", type=_positive, default=None,
                   help="MeZO steps; by default MeZO gets the same training wall time as the mebp backprop run "
                        "(it steps until its summed step time reaches that run's)")
    p.add_argument("--seq-len", type=_positive, default=d.seq_len, help="tokens per sequence (all methods)")
    p.add_argument("--batch-size", type=_positive, default=d.batch_size, help="sequences per step (all methods)")
    p.add_argument("--eval-every", type=_positive, default=d.eval_every,
                   help="backprop steps between held-out evaluations, plus two early ones at 1/5 and 2/5 of it "
                        "(MeZO: at the same training times, or proportionally more steps with --mezo-steps)")
    p.add_argument("--eval-blocks", type=_positive, default=d.eval_blocks, help="held-out blocks evaluated at each point")
    p.add_argument("--heldout-fraction", type=float, default=d.heldout_fraction,
                   help="fraction of the token blocks held out (never trained on)")
    p.add_argument("--lr", type=_positive_float, default=d.lr, help="backprop learning rate (AdamW)")
    p.add_argument("--mezo-lr", type=_positive_float, default=d.mezo_lr, help="MeZO learning rate (SGD); of 1e-4, 1e-3 and 1e-2 in a 60-step probe on SmolLM2 and "
                        "this text, 1e-2 diverged and 1e-3 lowered the held-out loss most")
    p.add_argument("--eps", type=_positive_float, default=d.mezo_eps, help="MeZO perturbation scale")
    p.add_argument("--budget", type=_size, default=None, metavar="SIZE",
                   help="budget of the optimal schedule (whole step incl. AdamW state), e.g. 700MB; "
                        "default: the mebp plan's predicted peak + AdamW state")
    p.add_argument("--device", type=_device, default=d.device, help="device profile of the optimal schedule's cost model")
    p.add_argument("--work-limit", type=_positive_float, default=d.work_limit,
                   help="scheduler search limit per solve, in CP-SAT deterministic time (work, not seconds)")
    p.add_argument("--head-chunks", type=_non_negative, default=d.head_chunks, help="LM head + loss in K sequence chunks (backprop)")
    p.add_argument("--methods", default=",".join(d.methods), help="comma-separated subset of mebp,optimal,mezo")
    p.add_argument("--lora-r", type=_positive, default=16, help="LoRA rank")
    p.add_argument("--lora-alpha", type=_positive, default=32, help="LoRA alpha")
    _add_lora_placement(p)
    p.add_argument("--buckets", type=_non_negative, default=0, metavar="K",
                   help="refused: the study packs --data into blocks of --seq-len so that every method trains on "
                        "the same batches, and MeZO's forward-only step is compiled for one shape; per-length "
                        "buckets are for mebp train")
    p.add_argument("--seed", type=int, default=d.seed, help="held-out split, data order, MeZO directions")
    p.add_argument("--threads", type=_positive, default=1, help="torch CPU threads")
    p.add_argument("--out", default=None, help="output directory (default: runs/compare-MODEL)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--redraw", action="store_true",
                   help="no training: read --out/study.json and write its curves.png and table.md again")
    p.set_defaults(run=_run_compare, check=_check_compare)


def _compare_settings(args):
    from mebp_compiler.app.study_settings import StudySettings

    return StudySettings(
        seq_len=args.seq_len, batch_size=args.batch_size, steps=args.steps, mezo_steps=args.mezo_steps,
        eval_every=args.eval_every, eval_blocks=args.eval_blocks, heldout_fraction=args.heldout_fraction,
        lr=args.lr, mezo_lr=args.mezo_lr, mezo_eps=args.eps, budget=args.budget, device=args.device,
        head_chunks=args.head_chunks, work_limit=args.work_limit, seed=args.seed,
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
    )


def _run_compare(args) -> int:
    from mebp_compiler.app import data, models
    from mebp_compiler.app.compare import redraw, run_study, write_study

    if args.redraw:
        paths = redraw(args.out or f"runs/compare-{models.display_name(args.model)}")
        print(paths["table"].read_text())
        _say(f"wrote {paths['png']} and {paths['table']}")
        return 0
    settings = _compare_settings(args)
    out = Path(args.out or f"runs/compare-{models.display_name(args.model)}")
    _say(f"loading {args.model} ...")
    model = _load_lora_model(args)
    tokenizer = _tokenizer(args.model)
    blocks = data.token_blocks(tokenizer, data.load_text(None if args.data == "pydoc" else args.data), args.seq_len)
    _say(f"data: {len(blocks)} blocks of {args.seq_len} tokens; methods {', '.join(settings.methods)}; "
         f"MeZO budget: {settings.mezo_budget}")
    start = time.perf_counter()
    study = run_study(model, blocks, settings, model_name=args.model, progress=not args.no_progress)
    paths = write_study(study, out)
    print(paths["table"].read_text())
    _say(f"study took {time.perf_counter() - start:.0f} s; wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def _load_lora_model(args, device: str = "cpu"):
    import torch

    from mebp_compiler.app import models

    dtype = getattr(torch, getattr(args, "dtype", "float32"))
    model = models.load(args.model, device=device, dtype=dtype, seed=getattr(args, "seed", 0))
    # peft draws LoRA's A matrices from torch's global RNG, which torch seeds at random in each
    # process and loading real weights does not reseed: without this, each run of SmolLM2 differed
    torch.manual_seed(getattr(args, "seed", 0))
    try:
        return models.add_lora(model, _lora_settings(args))
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _run_train(args) -> int:
    from mebp_compiler.app import data, models
    from mebp_compiler.files import atomic_write_json
    from mebp_compiler.ir import format_bytes
    from mebp_compiler.app.rundir import TRAIN_ENTRIES, RunDirectory
    from mebp_compiler.app.train import plot_loss, save_adapter

    out = Path(args.out or f"runs/train-{models.display_name(args.model)}")
    run = RunDirectory(out, TRAIN_ENTRIES)  # locked until the end; the old run stays until the new one is whole
    resumed = _load_checkpoint(args.resume) if args.resume else None
    tokenizer = _tokenizer(args.model)
    if args.buckets:
        ids, labels, heldout, buckets = _bucketed_data(args, tokenizer)
        stream = functools.partial(data.bucket_batches, buckets, args.batch_size, seed=args.seed)
    else:
        ids, labels, heldout = _packed_data(args, tokenizer)
        stream = functools.partial(data.batches, ids, args.batch_size, seed=args.seed, labels=labels)
    mezo = args.method == "mezo"
    lr = args.lr = args.lr if args.lr is not None else (MEZO_LR if mezo else BACKPROP_LR)
    args.optimizer = None if mezo else args.optimizer or "adamw"
    if resumed is not None:
        resumed.check_settings(_run_settings(args, ids, labels))
        if resumed.step >= args.steps:
            raise UsageError(f"the checkpoint is at step {resumed.step}, and --steps {args.steps} asks for no "
                             "more: give more --steps")
    what = (f"{sum(len(b) for b in buckets)} training examples padded to lengths "
            f"{', '.join(str(b.length) for b in buckets)}" if args.buckets
            else f"{len(ids)} training blocks of {args.seq_len} tokens")
    _say(f"data: {args.data} -> {what}" + (f", {len(heldout[0])} held-out blocks evaluated" if heldout else ""))
    _say(f"loading {args.model} ...")
    model = _load_lora_model(args)
    baselines = []

    if args.buckets:
        from mebp_compiler.plan_cache import PlanCache

        _say(f"compiling a training step (policy {_policy(args)}) per length, on its first batch")
        plan = PlanCache(model, _policy(args), _compile_options(args, _policy(args)), max_shapes=len(buckets))
    else:
        example = next(stream())
        baselines = _measure_baselines(model, example) if args.baselines else []
        what = "forward-only step (MeZO)" if mezo else f"training step (policy {_policy(args)})"
        _say(f"compiling the {what} ...")
        start = time.perf_counter()
        if mezo:
            from mebp_compiler.app.mezo import compile_mezo, train_mezo

            plan = compile_mezo(model, example, offload_dir=args.offload_dir)
        else:
            plan = _compile(model, example, args)
        _say(f"compiled in {time.perf_counter() - start:.1f} s: predicted peak "
             f"{format_bytes(plan.predicted_peak_bytes)} (computed tensors "
             f"{format_bytes(plan.predicted_peak_activation_bytes)})")

    if mezo:
        args.eps = args.eps or MEZO_EPS
        batches = data.batches(ids, args.batch_size, seed=args.seed, labels=labels)
        history = train_mezo(plan, batches, args.steps, lr=lr, eps=args.eps, seed=args.seed,
                             progress=not args.no_progress)
    else:
        history = _train_backprop(args, plan, stream, ids, labels, heldout, resumed, out)
    shapes = {"compiled_shapes": [list(p.batch_shape) for p in plan.plans.values()]} if args.buckets else {}
    measured = {"baselines": [b.to_json() for b in baselines]} if baselines else {}

    method = "MeZO" if mezo else f"policy {_policy(args)}"
    with run.replace() as staging:
        save_adapter(model, staging / "adapter")
        plot_loss(history, staging / "loss.png", title=f"{args.model}, LoRA r={args.lora_r}, {method}")
        if not (mezo or args.buckets):
            _plot_step_memory(plan, args, baselines, staging / "memory.png")
        atomic_write_json(staging / "history.json", {"args": _jsonable(vars(args)), **history.to_json(),
                                                      "predicted_peak_bytes": plan.predicted_peak_bytes, **shapes,
                                                      **measured})
        if args.checkpoint_every:
            os.replace(out / "checkpoint", staging / "checkpoint")  # the last step's, written by _train_backprop
    done = history.loss[len(history.loss) - (args.steps - (resumed.step if resumed else 0)):]
    k = max(1, len(done) // 5)
    first, last = sum(done[:k]) / k, sum(done[-k:]) / k
    _say(f"loss {first:.3f} -> {last:.3f} (mean of first and last {k} steps); "
         f"held peak {format_bytes(max(history.held_peak_bytes))}, predicted "
         f"{format_bytes(plan.predicted_peak_bytes)}")
    if baselines:
        _say_memory_comparison(plan, args, baselines, max(history.held_peak_bytes))
    _say(f"wrote {out / 'adapter'}/, {out / 'loss.png'}, {out / 'history.json'}"
         + (f", {out / 'checkpoint'}/" if args.checkpoint_every else ""))
    if not (mezo or args.buckets):
        _say(f"memory over the step: {out / 'memory.png'}")
    return 0


def _measure_baselines(model, batch):
    """`baselines.measure_baselines` of the first batch, with a line saying so."""
    from mebp_compiler.app.baselines import measure_baselines

    _say("measuring the same step as eager autograd and with transformers' gradient checkpointing ...")
    return measure_baselines(model, batch)


def _say_memory_comparison(plan, args, baselines, held_peak: int) -> None:
    """The plan's held peak beside what eager autograd and gradient checkpointing were measured to need."""
    from mebp_compiler.ir import format_bytes

    shape = " x ".join(str(n) for n in plan.batch_shape)
    _say(f"memory of one training step (batch {shape} tokens; measured in this run on the first batch):")
    width = max(len(b.label) for b in baselines)
    for b in baselines:
        _say(f"  {b.label:<{width}}  {format_bytes(b.total_bytes):>10}  (parameters {format_bytes(b.parameter_bytes)}"
             f" + the step's tensors {format_bytes(b.step_peak_bytes)}, allocator peak)")
    extra = "" if plan.fused_update or not plan.optimizer_state_bytes else (
        f", + {format_bytes(plan.optimizer_state_bytes)} {plan.optimizer} state beside the step")
    budget = f", budget {format_bytes(args.budget)}" if args.budget else ""
    if plan.weights is not None:
        budget += "; its INT4 weights are memory-mapped, read from the file, not held"
    _say(f"  {'mebp-compiler, policy ' + _policy(args):<{width}}  {format_bytes(held_peak):>10}  (held by the "
         f"runtime, most of any step; predicted {format_bytes(plan.predicted_peak_bytes)}{budget}{extra})")


def _plot_step_memory(plan, args, baselines, path: Path) -> None:
    """--out/memory.png: the plan's predicted memory over the step, the budget and the measured baselines."""
    import matplotlib

    matplotlib.use("Agg")
    from mebp_compiler.app.plots import save_memory_plot

    save_memory_plot({_policy(args): plan.profile}, path, budget_bytes=args.budget,
                     title=f"{args.model}, batch {' x '.join(str(n) for n in plan.batch_shape)}: memory over one step",
                     baselines={b.name: b.total_bytes for b in baselines})


def _add_federate(sub, debug: argparse.ArgumentParser) -> None:
    from mebp_compiler.app.model_names import MODEL_NAMES
    from mebp_compiler.passes.scheduler.limits import DEFAULT_WORK_LIMIT

    p = sub.add_parser(
        "federate", parents=[debug], help=COMMANDS["federate"][0],
        description="Simulate federated LoRA fine-tuning with Flower (needs the 'federated' extra): "
                    "--clients virtual clients, each holding its own shard of the pydoc text (split by "
                    "topic) and its own step-memory budget, compile their own plan under it and train "
                    "--local-steps steps per round; Flower's FedAvg averages their LoRA parameters. A "
                    "client whose budget fits no schedule says so and is left out. Writes the final "
                    "adapter (peft) and the per-round history (JSON) to --out.",
    )
    p.add_argument("--model", type=_model, default="smollm2-135m", metavar="NAME",
                   help=f"model to fine-tune (default: %(default)s); one of {', '.join(MODEL_NAMES)}")
    p.add_argument("--clients", type=_positive, default=4, help="virtual clients (default: %(default)s)")
    p.add_argument("--budgets", default=None, metavar="SIZE,...",
                   help="one step-memory budget per client (whole step and AdamW state, as --budget of "
                        "mebp compile), e.g. 64MB,256MB,512MB,1GB (default for smollm2-135m: that with "
                        "--int4, else 768MB,1GB,1.5GB,2GB; spread over the clients)")
    p.add_argument("--rounds", type=_positive, default=3, help="federated rounds (default: %(default)s)")
    p.add_argument("--local-steps", type=_positive, default=4,
                   help="optimizer steps each client trains per round (default: %(default)s)")
    p.add_argument("--lr", type=_positive_float, default=BACKPROP_LR,
                   help="clients' AdamW learning rate (default: %(default)s)")
    p.add_argument("--seq-len", type=_positive, default=64, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--batch-size", type=_positive, default=1, help="sequences per step (default: %(default)s)")
    p.add_argument("--lora-r", type=_positive, default=8, help="LoRA rank (default: %(default)s)")
    p.add_argument("--lora-alpha", type=_positive, default=16, help="LoRA alpha (default: %(default)s)")
    _add_lora_placement(p)
    p.add_argument("--int4", action="store_true",
                   help="clients keep the frozen weights as memory-mapped INT4 (not held), as a phone would")
    p.add_argument("--heldout-blocks", type=_non_negative, default=8,
                   help="held-out sequences per client the server evaluates the aggregate on after each "
                        "round; 0: no evaluation (default: %(default)s)")
    p.add_argument("--parallel", type=_positive, default=2,
                   help="clients that train at once (Ray actors, one CPU each) (default: %(default)s)")
    p.add_argument("--device", type=_device, default="iphone15promax",
                   help="device profile for the scheduler's cost model (default: %(default)s)")
    p.add_argument("--work-limit", type=_positive_float, default=DEFAULT_WORK_LIMIT, metavar="W",
                   help="the scheduler's search limit per solve, CP-SAT deterministic time (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="data order and random-weight seed (default: %(default)s)")
    p.add_argument("--threads", type=_positive, default=1, help="torch CPU threads (default: %(default)s)")
    p.add_argument("--out", default=None, help="output directory (default: runs/federate-MODEL)")
    p.add_argument("--verbose", action="store_true", help="show Flower's own INFO log")
    p.set_defaults(run=_run_federate, check=_check_federate)


#: Default --budgets of `mebp federate` for the real model: phone-small to phone-large step memory.
FEDERATE_BUDGETS = {True: ("64MB", "256MB", "512MB", "1GB"),  # --int4: weights memory-mapped, not held
                    False: ("768MB", "1GB", "1.5GB", "2GB")}  # fp32 weights (538 MB) held in the step


def _federate_budgets(args) -> list[int]:
    """--budgets as bytes, one per client; for smollm2-135m by default a spread from FEDERATE_BUDGETS."""
    from mebp_compiler.device import parse_size

    if args.budgets is not None:
        return [_size(text.strip()) for text in args.budgets.split(",")]
    if args.model != "smollm2-135m":
        raise UsageError(f"give --budgets for {args.model}, one per client (the default spread is for smollm2-135m)")
    sizes = FEDERATE_BUDGETS[args.int4]
    return [parse_size(sizes[i * len(sizes) // args.clients]) for i in range(args.clients)]


def _check_federate(args) -> None:
    """Everything `mebp federate` can check before it loads Flower, the model or the data."""
    import importlib.util

    try:
        budgets = _federate_budgets(args)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"--budgets: {exc}") from None
    if len(budgets) != args.clients:
        raise UsageError(f"--budgets gives {len(budgets)} budgets for {args.clients} --clients: give one per client")
    if importlib.util.find_spec("flwr") is None or importlib.util.find_spec("ray") is None:
        raise UsageError("mebp federate runs on Flower's simulation runtime, which is not installed: "
                         "pip install -e '.[federated]'")
    _check_out_dir(args.out)


def _run_federate(args) -> int:
    from mebp_compiler.app import data, federated, models
    from mebp_compiler.files import atomic_write_json
    from mebp_compiler.ir import format_bytes
    from mebp_compiler.app.rundir import FEDERATE_ENTRIES, RunDirectory
    from mebp_compiler.app.train import save_adapter

    out = Path(args.out or f"runs/federate-{args.model}")
    run = RunDirectory(out, FEDERATE_ENTRIES)  # locked until the end; the old run stays until the new one is whole
    lora = _lora_settings(args)
    settings = federated.ModelSettings(model=args.model, seed=args.seed, lora_r=lora.r, lora_alpha=lora.alpha,
                                       target_modules=lora.target_modules,
                                       layers_to_transform=lora.layers_to_transform,
                                       modules_to_save=lora.modules_to_save, seq_len=args.seq_len,
                                       batch_size=args.batch_size, device=args.device, work_limit=args.work_limit,
                                       int4=args.int4)
    try:  # this process's copy, built before Flower starts, so that a placement naming nothing is one line
        federated.initial_lora(settings)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    tokenizer = models.load_tokenizer(args.model) if args.model == "smollm2-135m" else data.ByteTokenizer()
    budgets = _federate_budgets(args)
    clients, heldout = federated.shard_clients(tokenizer, federated.topic_shards(args.clients), budgets,
                                               args.seq_len, seed=args.seed)
    heldout = heldout[:args.heldout_blocks * args.clients] if args.heldout_blocks else None
    for k, client in enumerate(clients):
        _say(f"client {k}: {len(client.blocks)} sequences of {args.seq_len} tokens, budget "
             f"{format_bytes(client.budget_bytes)}")
    config = federated.TrainConfig(local_steps=args.local_steps, lr=args.lr)
    start = time.perf_counter()
    said: set[str] = set()

    def progress(record) -> None:
        loss = "" if record.heldout_loss is None else f"held-out loss {record.heldout_loss:.4f}; "
        if record.round == 0:
            _say(f"start: {loss}{args.clients} clients, {args.rounds} rounds (Flower simulation, "
                 f"{args.parallel} at once)")
            return
        peaks = ", ".join(f"{int(r.metrics['client'])}: {format_bytes(int(r.metrics['held-peak-bytes']))}/"
                          f"{format_bytes(int(r.metrics['budget-bytes']))}" for r in record.replies)
        _say(f"round {record.round}/{args.rounds}: {loss}{len(record.replies)} replied (held/budget {peaks}), "
             f"{len(record.failures)} failed; sent {format_bytes(record.uplink_bytes)} up, "
             f"{format_bytes(record.broadcast_bytes)} down; {time.perf_counter() - start:.0f} s")
        for reason in set(record.failures.values()) - said:
            _say(f"  left out: {' '.join(reason.split())}")
            said.add(reason)

    _say(f"starting Flower's simulation runtime ({args.model}, FedAvg) ...")
    result = federated.run_federation(settings, clients, args.rounds, config, heldout=heldout,
                                      parallel=args.parallel, on_round=progress, verbose=args.verbose)
    if not any(record.replies for record in result.rounds):
        print("mebp federate: error: no client trained in any round (each failed or refused, see above), so "
              "there is no adapter to write; give budgets that fit (--budgets)", file=sys.stderr)
        return 1
    model = federated.load_lora(settings, result.final)
    with run.replace() as staging:
        save_adapter(model, staging / "adapter")
        atomic_write_json(staging / "history.json", {"args": _jsonable(vars(args)),
                                                     "rounds": [r.to_json() for r in result.rounds]})
    _say(f"wrote {out / 'adapter'}/ and {out / 'history.json'}")
    return 0


def _run_settings(args, ids, labels) -> dict:
    """What a resumed run must share with the run that wrote its checkpoint to continue it exactly."""
    import hashlib

    settings = {k: getattr(args, k) for k in (
        "model", "seq_len", "batch_size", "grad_accum", "seed", "lora_r", "lora_alpha", "optimizer", "lr",
        "lr_schedule", "warmup_steps", "heldout_fraction", "mask_prompt", "int4", "gguf_blocks", "group_size")}
    if args.buckets:  # only where given: older checkpoints lack it
        settings["buckets"] = args.buckets
    placement = {"lora_targets": args.lora_targets, "lora_layers": args.lora_layers,
                 "modules_to_save": args.modules_to_save}  # only where given: older checkpoints lack them
    settings.update({k: v if isinstance(v, str) else list(v) for k, v in placement.items() if v})
    if args.lr_schedule != "constant" or args.warmup_steps:
        settings["steps"] = args.steps  # the schedule's length
    if args.dtype != "float32":
        settings["dtype"] = args.dtype  # absent in float32, as in checkpoints from before --dtype
    settings["data_sha256"] = hashlib.sha256(ids.numpy().tobytes() + labels.numpy().tobytes()).hexdigest()
    return settings


def _load_checkpoint(directory: str):
    from mebp_compiler.app import checkpoint

    state = checkpoint.load(directory)
    _say(f"resuming from {directory} at step {state.step}")
    return state


def _packed_data(args, tokenizer):
    """(input_ids, labels, held-out (input_ids, labels) or None) of --data packed into blocks of --seq-len."""
    from mebp_compiler.app import data

    ids, labels = data.labelled_blocks(tokenizer, args.data, args.seq_len, mask_prompt=args.mask_prompt)
    fraction = args.heldout_fraction if args.heldout_fraction is not None else (0.1 if args.eval_every else 0.0)
    heldout = None
    if fraction > 0:
        train_rows, heldout_rows = data.split_rows(ids.shape[0], fraction, seed=args.seed)
        heldout = (ids[heldout_rows][: args.eval_blocks], labels[heldout_rows][: args.eval_blocks])
        ids, labels = ids[train_rows], labels[train_rows]
    return ids, labels, heldout


def _bucketed_data(args, tokenizer):
    """(every training token and label in one row each, held-out (input_ids, labels) or None, the
    length buckets) of --data's records, each its own example (`data.length_buckets`, --buckets).

    Held-out examples are padded on the right to --seq-len with labels -100: a causal LM's
    predictions of the tokens before the padding do not see it, so evaluating them without a
    mask is exact."""
    import torch

    from mebp_compiler.app import data

    examples = data.labelled_examples(tokenizer, args.data, args.seq_len, mask_prompt=args.mask_prompt)
    pad = data.pad_id(tokenizer)
    fraction = args.heldout_fraction if args.heldout_fraction is not None else (0.1 if args.eval_every else 0.0)
    heldout = None
    if fraction > 0:
        train_rows, heldout_rows = data.split_rows(len(examples), fraction, seed=args.seed)
        rows = data.padded([examples[i] for i in heldout_rows[: args.eval_blocks]], args.seq_len, pad)
        heldout = (rows["input_ids"], rows["labels"])
        examples = [examples[i] for i in train_rows]
    try:
        buckets = data.length_buckets(examples, args.buckets, args.batch_size, pad)
    except ValueError as exc:
        raise UsageError(f"--batch-size {args.batch_size}: {exc}") from None
    ids = torch.cat([b.rows["input_ids"].flatten() for b in buckets]).unsqueeze(0)
    labels = torch.cat([b.rows["labels"].flatten() for b in buckets]).unsqueeze(0)
    return ids, labels, heldout, buckets


def _train_backprop(args, plan, stream, ids, labels, heldout, resumed, out: Path):
    """`train` with the CLI's schedule, accumulation, evaluations and checkpoints; resumed when `resumed`.

    `stream(skip=n)` gives the training batches after the first n; `ids` and `labels` are the
    training data the checkpoint's settings fingerprint."""
    from mebp_compiler.app import checkpoint, data
    from mebp_compiler.app.evaluate import evaluate
    from mebp_compiler.app.train import TrainHistory, lora_norm, make_scheduler, train
    from mebp_compiler.plan import make_optimizer

    lora = plan.lora_parameters()
    optimizer = make_optimizer(lora.values(), args.optimizer, args.lr)
    scheduler = make_scheduler(optimizer, args.lr_schedule, args.steps, args.warmup_steps)
    settings = _run_settings(args, ids, labels)
    start, history = 0, None
    if resumed is not None:
        resumed.restore(lora, optimizer, scheduler)
        start, history = resumed.step, TrainHistory(**resumed.history)

    def measure(step: int, history) -> None:
        result = evaluate(plan.model, *heldout, batch_size=args.batch_size)
        history.evals.append({"step": step, **result.to_json()})
        _say(f"step {step}: held-out {result.describe()}")

    log = None
    if args.tensorboard is not None:
        from mebp_compiler.app.tensorboard_log import StepLog

        log = StepLog(args.tensorboard)
        _say(f"TensorBoard: writing to {args.tensorboard} (tensorboard --logdir {args.tensorboard})")

    def on_step(step: int, history) -> None:
        if heldout is not None and args.eval_every and (step % args.eval_every == 0 or step == args.steps):
            measure(step, history)
        if args.checkpoint_every and (step % args.checkpoint_every == 0 or step == args.steps):
            checkpoint.save(out / "checkpoint", step=step, batches_consumed=step * args.grad_accum,
                            settings=settings, lora=lora, optimizer=optimizer, scheduler=scheduler,
                            history=history.to_json())
        if log is not None:
            log.log_step(step, history)

    if heldout is not None and args.eval_every and history is None:
        history = TrainHistory(start_lora_norm=lora_norm(lora.values()))
        measure(0, history)
    batches = stream(skip=start * args.grad_accum)
    try:
        return train(plan, batches, args.steps, optimizer, progress=not args.no_progress,
                     accumulate=args.grad_accum, scheduler=scheduler, on_step=on_step, start_step=start,
                     history=history)
    finally:
        if log is not None:
            log.close()


def _run_plan(args) -> int:
    import torch

    from mebp_compiler.ir import format_bytes

    model = _load_lora_model(args, device="meta")
    ids = torch.zeros((args.batch_size, args.seq_len), dtype=torch.int64, device="meta")
    policies = [args.policy] if args.policy else ["none", "mebp", *(["optimal"] if args.budget else [])]
    for k, policy in enumerate(policies):
        plan = _compile(model, {"input_ids": ids, "labels": ids.clone()}, args, policy)
        if k == 0:
            print(plan.captured.summary())
        print(f"\npolicy {plan.schedule.policy}: predicted peak {format_bytes(plan.predicted_peak_bytes)}")
        print(plan.profile.report())
    return 0


def _policy(args) -> str:
    return args.policy or ("optimal" if args.budget else "mebp")


def _compile(model, example, args, policy: str | None = None):
    """`mebp_compiler.compile` with the options of `_add_common` (policy: `_policy(args)` unless given)."""
    import mebp_compiler

    policy = policy or _policy(args)
    return mebp_compiler.compile(model, example, policy, **_compile_options(args, policy))


def _compile_options(args, policy: str) -> dict:
    """The keyword arguments of `mebp_compiler.compile` that the options of `_add_common` give."""
    from mebp_compiler.app import models

    return dict(checkpoints=args.checkpoints, offload_dir=args.offload_dir, device=args.device,
                budget=args.budget if policy == "optimal" else None,
                optimizer=getattr(args, "optimizer", None) or "adamw",
                head_chunks=args.head_chunks, vocab_slices=args.vocab_slices, mlp_chunks=args.mlp_chunks,
                int4=args.int4 or args.gguf_blocks, group_size=args.group_size,
                gguf_file=models.gguf_file_of(args.model) if args.gguf_blocks else None,
                fuse_update=args.fuse_update, work_limit=args.work_limit, solver_progress=_solver_status)


def _solver_status(progress) -> None:
    """The scheduler's search on stderr: one line, rewritten in place on a terminal (else its last state)."""
    line = f"[mebp] scheduling: {progress.describe()}"
    if sys.stderr.isatty():
        print(f"\r{line}\033[K", end="\n" if progress.done else "", file=sys.stderr, flush=True)
    elif progress.done:
        print(line, file=sys.stderr, flush=True)


def _say(message: str) -> None:
    print(f"[mebp] {message}", file=sys.stderr, flush=True)


def _jsonable(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (str, int, float, bool, type(None)))}


def _add_calibrate(sub, debug: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "calibrate", parents=[debug], help=COMMANDS["calibrate"][0],
        description="Measure this machine for the scheduler's cost model and write a device profile (JSON): "
                    "the rate of each op class (matmul FLOP/s; bytes per second of reductions, data movement and "
                    "element-wise ops) timed op by op in a real-size training step, the per-op overhead, the "
                    "rates of writing offloaded tensors to a file on disk and reading them back, and the INT4 "
                    "decode rate. Times are process CPU seconds, medians of --rounds; other jobs on the machine "
                    "still slow it down (caches, memory bandwidth), so calibrate on a quiet machine. Then pass "
                    "the file to --device of compile, plan and train.",
        epilog="example: mebp calibrate --out cpu-here.json && mebp plan --device cpu-here.json --budget 700MB",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="device-profile.json", metavar="FILE",
                   help="profile to write, atomically (default: %(default)s)")
    p.add_argument("--name", default=None, help="the profile's name (default: the file's stem)")
    p.add_argument("--model", type=_model, default="smollm2-135m", metavar="NAME|PATH",
                   help="model whose LoRA training step is timed (default: %(default)s)")
    p.add_argument("--seq-len", type=_positive, default=256, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--batch-size", type=_positive, default=1, help="sequences per step (default: %(default)s)")
    p.add_argument("--rounds", type=_positive, default=5,
                   help="timed repetitions of each measurement; the median is kept (default: %(default)s)")
    p.add_argument("--offload-dir", default=None, metavar="DIR",
                   help="directory on the disk offloaded tensors go to (default: the --out file's directory)")
    p.add_argument("--offload-mib", type=_positive, default=64,
                   help="MiB written and read back per offload round (default: %(default)s)")
    p.add_argument("--threads", type=_positive, default=1, help="torch CPU threads (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_calibrate, check=_check_calibrate)


def _check_calibrate(args) -> None:
    out = Path(args.out)
    if out.is_dir() or not out.resolve().parent.is_dir():
        raise UsageError(f"--out {args.out} must be a file in an existing directory")
    if args.offload_dir is not None and not Path(args.offload_dir).is_dir():
        raise UsageError(f"--offload-dir {args.offload_dir} is not a directory; create it or choose another")


def _run_calibrate(args) -> int:
    from mebp_compiler.app import calibrate

    return calibrate.run_command(args)


#: Command name -> (one-line summary for `mebp --help`, the function that builds its arguments).
COMMANDS = {
    "train": ("LoRA fine-tuning under a memory plan (default: a short SmolLM2-135M demo)", _add_train),
    "eval": ("held-out loss, perplexity and next-token accuracy of a model, with or without an adapter", _add_eval),
    "generate": ("continue a prompt with a model, with or without an adapter", _add_generate),
    "merge": ("fold an adapter into its base model and save it as safetensors", _add_merge),
    "compile": ("schedule a training step under a memory budget and save the schedule", _add_compile),
    "plan": ("predict the memory of a training step under each policy (no training)", _add_plan),
    "compare": ("convergence study: exact backprop under memory plans vs. MeZO, same data and memory accounting",
                _add_compare),
    "run": ("train with an artifact directory written by `mebp compile --target`", _add_run),
    "federate": ("federated LoRA fine-tuning on Flower, each client under its own budget", _add_federate),
    "calibrate": ("measure this machine's op, offload and decode rates and write a device profile", _add_calibrate),
}


if __name__ == "__main__":
    sys.exit(main())
