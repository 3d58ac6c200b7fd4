"""The `mebp` command line."""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
import warnings
from pathlib import Path

import torch

DEMO_STEPS = 60
DEMO_SEQ_LEN = 128
BACKPROP_LR = 2e-3
MEZO_LR = 1e-4

EPILOG = """\
examples:
  mebp train                                  # demo: LoRA on SmolLM2-135M, pydoc text, mebp policy
  mebp train --data notes.txt --steps 200     # your own text (.txt, or .jsonl with a "text" field)
  mebp compile --model smollm2-135m --budget 700MB   # optimal schedule under a hard cap
  mebp plan --model qwen2.5-0.5b --seq-len 256   # predicted memory of a real-size model (meta device)
  mebp compare                                # backprop (mebp, optimal) vs. MeZO on SmolLM2-135M (README)
  mebp compile --model smollm2-135m --target onnx -o out/   # per-stage training graphs + manifest
  mebp run out/ --steps 10                    # train with those artifacts here
  mebp compile --model smollm2-135m --target coreml -o pkg/ # .mlpackage stages, each checked here
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mebp",
        description="Compile exact LoRA backpropagation under a memory plan and run it on CPU.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train(sub)
    _add_compile(sub)
    _add_plan(sub)
    _add_compare(sub)
    _add_run(sub)
    args = parser.parse_args(argv)
    from mebp_compiler.targets import TargetUnavailableError

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    if args.command is None:
        parser.print_help()
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return args.run(args)
    except (ValueError, OSError, TypeError, TargetUnavailableError) as exc:
        print(f"mebp {args.command}: error: {exc}", file=sys.stderr)
        return 1


def _add_common(p: argparse.ArgumentParser) -> None:
    from mebp_compiler.models import MODEL_NAMES

    p.add_argument("--model", default="smollm2-135m", metavar="NAME",
                   help=f"model to fine-tune (default: %(default)s); one of {', '.join(MODEL_NAMES)}")
    p.add_argument("--seq-len", type=int, default=DEMO_SEQ_LEN, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per step (default: %(default)s)")
    p.add_argument("--policy", default=None, choices=("none", "mebp", "optimal"),
                   help="none: keep every activation (plain autograd's memory); mebp: keep block "
                        "inputs, recompute each block in the backward; optimal: the CP-SAT "
                        "scheduler's least-time keep/recompute/offload plan under --budget "
                        "(default: optimal with --budget, else mebp)")
    p.add_argument("--budget", default=None, metavar="SIZE",
                   help="hard memory cap for the whole step (weights, LoRA parameters and gradients, "
                        "activations, AdamW state), e.g. 300MB, 1GiB")
    p.add_argument("--device", default="iphone15promax",
                   help="device profile for the scheduler's cost model: iphone15promax, cpu-local or a JSON file")
    p.add_argument("--checkpoints", default="ram", choices=("ram", "disk"),
                   help="where mebp keeps block checkpoints: RAM, or memory-mapped files (default: %(default)s)")
    p.add_argument("--offload-dir", default=None, help="directory for memory-mapped checkpoints (default: a temporary one)")
    p.add_argument("--head-chunks", default="0", metavar="K|auto",
                   help="compute the LM head and loss in K sequence chunks so no [seq x vocab] tensor "
                        "is held whole; 'auto' (with --budget) takes the fewest that fit (default: 0, unchunked)")
    p.add_argument("--vocab-slices", type=int, default=0, metavar="S",
                   help="stream the LM head and loss over S vocabulary slices, forward and backward, "
                        "so no [tokens x vocab] logits exist; with --int4 each head slice is "
                        "decompressed on its own (default: 0, off)")
    p.add_argument("--mlp-chunks", type=int, default=0, metavar="M",
                   help="run every block's MLP on M sequence chunks, so its [seq x intermediate] "
                        "products and their gradients exist a chunk at a time (default: 0, off)")
    p.add_argument("--int4", action="store_true",
                   help="store frozen weights as symmetric INT4 (scale per --group-size inputs), "
                        "dequantized just before each use")
    p.add_argument("--group-size", type=int, default=64, help="INT4 group size (default: %(default)s)")
    p.add_argument("--gguf-blocks", action="store_true",
                   help="with smollm2-135m: keep its GGUF file's own quantized blocks (Q4_1 weights, a "
                        "Q8_0 embedding) byte for byte instead of re-quantizing them; implies --int4")
    p.add_argument("--fuse-update", action="store_true",
                   help="apply each LoRA parameter's optimizer update inside the step as soon as its "
                        "gradient is final, instead of holding every gradient to the end (same parameters)")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default: %(default)s)")
    p.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default: %(default)s; on a busy 2-core machine two threads "
                        "stall each other, see the README)")


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="LoRA fine-tuning under a memory plan (default: a short SmolLM2-135M demo)",
        description="LoRA fine-tuning of a causal LM on real text, every step compiled and run by "
                    "mebp's CPU runtime. Writes the adapter (peft, safetensors), the loss curve "
                    "(PNG) and the per-step history (JSON) to --out.",
    )
    _add_common(p)
    p.add_argument("--data", default="pydoc",
                   help="'pydoc' (CPython's bundled documentation text), or a .txt / .jsonl file (default: %(default)s)")
    p.add_argument("--steps", type=int, default=DEMO_STEPS, help="optimizer steps (default: %(default)s)")
    p.add_argument("--method", default="backprop", choices=("backprop", "mezo"),
                   help="backprop: exact gradients by the compiled plan (--policy); mezo: zeroth-order "
                        "MeZO (Malladi et al., 2023), two forward passes per step at +-eps along a "
                        "seeded random direction, SGD update; --policy, --budget and --optimizer do not "
                        "apply (default: %(default)s)")
    p.add_argument("--lr", type=float, default=None,
                   help=f"learning rate (default: {BACKPROP_LR} for backprop (AdamW); {MEZO_LR} for mezo, whose "
                        "SGD step along a random direction needs a far smaller one)")
    p.add_argument("--eps", type=float, default=1e-3, help="MeZO perturbation scale (default: %(default)s)")
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"), help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="data order, random init and MeZO direction seed (default: %(default)s)")
    p.add_argument("--out", default=None, help="output directory (default: runs/train-MODEL)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_train)


def _add_compile(sub) -> None:
    from mebp_compiler.targets import TARGETS

    targets = "\n".join(textwrap.fill(text, 88, initial_indent=f"  {name:<8}", subsequent_indent=" " * 10)
                         for name, (_, text) in TARGETS.items())
    p = sub.add_parser(
        "compile", help="schedule a training step under a memory budget and save the schedule",
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
    p.set_defaults(run=_run_compile)


def _run_compile(args) -> int:
    from mebp_compiler.files import atomic_write_json
    from mebp_compiler.ir import format_bytes
    from mebp_compiler.passes.cost import step_cost
    from mebp_compiler.device import DeviceProfile
    from mebp_compiler.rundir import COMPILE_ENTRIES, RunDirectory

    out = Path(args.out or f"runs/compile-{args.model}")
    run = RunDirectory(out, COMPILE_ENTRIES)  # locked until the end; the old files stay until the new ones are whole
    device = "cpu" if args.target else "meta"  # scheduling alone needs shapes, not weights
    model = _load_lora_model(args, device=device)
    ids = torch.zeros((args.batch_size, args.seq_len), dtype=torch.int64, device=device)
    _say(f"capturing and scheduling (policy {_policy(args)}) ...")
    start = time.perf_counter()
    plan = _compile(model, {"input_ids": ids, "labels": ids}, args)
    cost = step_cost(plan.captured, plan.schedule, DeviceProfile.load(args.device))
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
        if args.target:
            _write_target(plan, model, args, staging)
    _say(f"wrote {out}/ (schedule.json, memory.json{', manifest.json, weights and artifacts' if args.target else ''})")
    return 0


def _write_target(plan, model, args, out: Path) -> None:
    from mebp_compiler.ir import format_bytes
    from mebp_compiler.passes.partition import partition
    from mebp_compiler.targets import load_target
    from mebp_compiler.targets.artifacts import step_weights, write_artifacts

    if args.gguf_blocks:
        raise ValueError("--gguf-blocks is not supported with --target: the GGUF blocks' fp16 scales are read "
                         "by reinterpreting bytes, which ONNX cannot express; use --int4 instead")
    target = load_target(args.target)
    _say("partitioning into stages ...")
    part = partition(plan.graph, model=args.model, target=args.target)
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


def _add_run(sub) -> None:
    p = sub.add_parser(
        "run", help="train with an artifact directory written by `mebp compile --target`",
        description="Execute the stages of an ONNX or MLX artifact directory here (a CoreML one is checked, "
                    "then refused: Core ML predictions need macOS or iOS), as its manifest says (keep, "
                    "free, write to and read from memory-mapped files), for --steps steps on real "
                    "text, applying the LoRA update after each. Everything is checked against the "
                    "manifest before any compute.",
    )
    p.add_argument("directory", help="artifact directory (manifest.json, stage files, weights.safetensors)")
    p.add_argument("--steps", type=int, default=10, help="training steps (default: %(default)s)")
    p.add_argument("--data", default="pydoc", help="'pydoc' or a .txt / .jsonl file (default: %(default)s)")
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"), help="(default: %(default)s)")
    p.add_argument("--lr", type=float, default=BACKPROP_LR, help="learning rate (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="data order seed (default: %(default)s)")
    p.add_argument("--offload-dir", default=None, help="directory for offloaded tensors (default: a temporary one)")
    p.add_argument("--out", default=None, help="write the trained LoRA parameters here (safetensors)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_artifacts)


def _run_artifacts(args) -> int:
    from safetensors.numpy import save
    from tqdm.auto import tqdm

    from mebp_compiler import data, models
    from mebp_compiler.ir import format_bytes
    from mebp_compiler.rundir import RunFile
    from mebp_compiler.targets import load_target
    from mebp_compiler.targets.driver import Driver, load_manifest

    out = RunFile(args.out) if args.out else None  # locked until the end; replaced atomically
    manifest = load_manifest(args.directory)
    _say(f"checking {args.directory} ({manifest.target}, {len(manifest.stages)} stages) ...")
    driver = Driver.open(args.directory, load_target(manifest.target), offload_dir=args.offload_dir)
    driver.use_optimizer(args.optimizer, args.lr)
    batch_size, seq_len = manifest.batch_shape
    tokenizer = models.load_tokenizer(manifest.model) if manifest.model == "smollm2-135m" else data.ByteTokenizer()
    blocks = data.token_blocks(tokenizer, data.load_text(None if args.data == "pydoc" else args.data), seq_len)
    batches = data.batches(blocks, batch_size, seed=args.seed)
    losses, peaks = [], []
    bar = tqdm(range(args.steps), desc=f"run {manifest.target}", unit="step", disable=args.no_progress,
               dynamic_ncols=True)
    for _ in bar:
        batch = next(batches)
        result = driver.train_step({k: v.numpy() for k, v in batch.items()})
        losses.append(result.loss)
        peaks.append(result.staged_peak_bytes)
        bar.set_postfix(loss=f"{result.loss:.3f}", held=format_bytes(result.held_peak_bytes))
    _say(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; driver held peak {format_bytes(result.held_peak_bytes)}, "
         f"with the stages' own tensors {format_bytes(max(peaks))} (manifest predicts "
         f"{format_bytes(manifest.predicted_peak_bytes)})")
    if args.out:
        out.write_bytes(save({k: a.copy() for k, a in driver.lora_arrays().items()}))
        _say(f"wrote {args.out}")
    return 0


def _add_plan(sub) -> None:
    p = sub.add_parser(
        "plan", help="predict the memory of a training step under each policy (no training)",
        description="Capture one training step (on the meta device: no weights are allocated), "
                    "schedule it with each policy and print the predicted memory.",
    )
    _add_common(p)
    p.set_defaults(run=_run_plan)


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where there is none (the help then says what happens)."""

    def _get_help_string(self, action):
        return action.help if action.default is None or action.default is False else super()._get_help_string(action)


def _add_compare(sub) -> None:
    from mebp_compiler.compare import StudySettings

    d = StudySettings()
    p = sub.add_parser(
        "compare", help="convergence study: exact backprop under memory plans vs. MeZO, same data and memory accounting",
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
    from mebp_compiler.models import MODEL_NAMES

    p.add_argument("--model", default="smollm2-135m", metavar="NAME", help=f"one of {', '.join(MODEL_NAMES)}")
    p.add_argument("--data", default="pydoc", help="'pydoc' (CPython's bundled documentation text) or a .txt/.jsonl file")
    p.add_argument("--steps", type=int, default=d.steps, help="backprop steps (each backprop method)")
    p.add_argument("--mezo-steps", type=int, default=None,
                   help="MeZO steps; by default MeZO gets the same training wall time as the mebp backprop run "
                        "(it steps until its summed step time reaches that run's)")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per sequence (all methods)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per step (all methods)")
    p.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="backprop steps between held-out evaluations, plus two early ones at 1/5 and 2/5 of it "
                        "(MeZO: at the same training times, or proportionally more steps with --mezo-steps)")
    p.add_argument("--eval-blocks", type=int, default=d.eval_blocks, help="held-out blocks evaluated at each point")
    p.add_argument("--heldout-fraction", type=float, default=d.heldout_fraction,
                   help="fraction of the token blocks held out (never trained on)")
    p.add_argument("--lr", type=float, default=d.lr, help="backprop learning rate (AdamW)")
    p.add_argument("--mezo-lr", type=float, default=d.mezo_lr, help="MeZO learning rate (SGD); of 1e-4, 1e-3 and 1e-2 in a 60-step probe on SmolLM2 and "
                        "this text, 1e-2 diverged and 1e-3 lowered the held-out loss most")
    p.add_argument("--eps", type=float, default=d.mezo_eps, help="MeZO perturbation scale")
    p.add_argument("--budget", default=None, metavar="SIZE",
                   help="budget of the optimal schedule (whole step incl. AdamW state), e.g. 700MB; "
                        "default: the mebp plan's predicted peak + AdamW state")
    p.add_argument("--device", default=d.device, help="device profile of the optimal schedule's cost model")
    p.add_argument("--time-limit", type=float, default=d.time_limit_s, help="scheduler time limit (s)")
    p.add_argument("--head-chunks", type=int, default=d.head_chunks, help="LM head + loss in K sequence chunks (backprop)")
    p.add_argument("--methods", default=",".join(d.methods), help="comma-separated subset of mebp,optimal,mezo")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank")
    p.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha")
    p.add_argument("--seed", type=int, default=d.seed, help="held-out split, data order, MeZO directions")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", default=None, help="output directory (default: runs/compare-MODEL)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--redraw", action="store_true",
                   help="no training: read --out/study.json and write its curves.png and table.md again")
    p.set_defaults(run=_run_compare)


def _run_compare(args) -> int:
    from mebp_compiler import data, models
    from mebp_compiler.compare import StudySettings, redraw, run_study, write_study

    if args.redraw:
        paths = redraw(args.out or f"runs/compare-{args.model}")
        print(paths["table"].read_text())
        _say(f"wrote {paths['png']} and {paths['table']}")
        return 0
    settings = StudySettings(
        seq_len=args.seq_len, batch_size=args.batch_size, steps=args.steps, mezo_steps=args.mezo_steps,
        eval_every=args.eval_every, eval_blocks=args.eval_blocks, heldout_fraction=args.heldout_fraction,
        lr=args.lr, mezo_lr=args.mezo_lr, mezo_eps=args.eps, budget=args.budget, device=args.device,
        head_chunks=args.head_chunks, time_limit_s=args.time_limit, seed=args.seed,
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
    )
    settings.check()
    out = Path(args.out or f"runs/compare-{args.model}")
    _say(f"loading {args.model} ...")
    model = _load_lora_model(args)
    tokenizer = models.load_tokenizer(args.model) if args.model == "smollm2-135m" else data.ByteTokenizer()
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
    from mebp_compiler import models

    model = models.load(args.model, device=device, seed=getattr(args, "seed", 0))
    return models.add_lora(model, models.LoraSettings(r=args.lora_r, alpha=args.lora_alpha))


def _run_train(args) -> int:
    from mebp_compiler import data, models
    from mebp_compiler.files import atomic_write_json
    from mebp_compiler.ir import format_bytes
    from mebp_compiler.rundir import TRAIN_ENTRIES, RunDirectory
    from mebp_compiler.train import make_optimizer, plot_loss, save_adapter, train

    out = Path(args.out or f"runs/train-{args.model}")
    run = RunDirectory(out, TRAIN_ENTRIES)  # locked until the end; the old run stays until the new one is whole
    _say(f"loading {args.model} ...")
    model = _load_lora_model(args)
    tokenizer = models.load_tokenizer(args.model) if args.model == "smollm2-135m" else data.ByteTokenizer()
    text = data.load_text(None if args.data == "pydoc" else args.data)
    blocks = data.token_blocks(tokenizer, text, args.seq_len)
    _say(f"data: {len(text) / 1e3:.0f} kB of text -> {len(blocks)} sequences of {args.seq_len} tokens")
    batches = data.batches(blocks, args.batch_size, seed=args.seed)
    example = next(data.batches(blocks, args.batch_size, seed=args.seed))

    mezo = args.method == "mezo"
    lr = args.lr = args.lr if args.lr is not None else (MEZO_LR if mezo else BACKPROP_LR)
    what = "forward-only step (MeZO)" if mezo else f"training step (policy {_policy(args)})"
    _say(f"compiling the {what} ...")
    start = time.perf_counter()
    if mezo:
        from mebp_compiler.mezo import compile_mezo, train_mezo

        plan = compile_mezo(model, example, offload_dir=args.offload_dir)
    else:
        plan = _compile(model, example, args)
    _say(f"compiled in {time.perf_counter() - start:.1f} s: predicted peak "
         f"{format_bytes(plan.predicted_peak_bytes)} (computed tensors "
         f"{format_bytes(plan.predicted_peak_activation_bytes)})")

    if mezo:
        history = train_mezo(plan, batches, args.steps, lr=lr, eps=args.eps, seed=args.seed,
                             progress=not args.no_progress)
    else:
        optimizer = make_optimizer(plan.lora_parameters().values(), args.optimizer, lr)
        history = train(plan, batches, args.steps, optimizer, progress=not args.no_progress)

    method = "MeZO" if mezo else f"policy {_policy(args)}"
    with run.replace() as staging:
        save_adapter(model, staging / "adapter")
        plot_loss(history, staging / "loss.png", title=f"{args.model}, LoRA r={args.lora_r}, {method}")
        atomic_write_json(staging / "history.json", {"args": _jsonable(vars(args)), **history.to_json(),
                                                      "predicted_peak_bytes": plan.predicted_peak_bytes})
    k = max(1, len(history.loss) // 5)
    first, last = sum(history.loss[:k]) / k, sum(history.loss[-k:]) / k
    _say(f"loss {first:.3f} -> {last:.3f} (mean of first and last {k} steps); "
         f"held peak {format_bytes(max(history.held_peak_bytes))}, predicted "
         f"{format_bytes(plan.predicted_peak_bytes)}")
    _say(f"wrote {out / 'adapter'}/, {out / 'loss.png'}, {out / 'history.json'}")
    return 0


def _run_plan(args) -> int:
    from mebp_compiler.capture import capture
    from mebp_compiler.ir import format_bytes
    from mebp_compiler.passes.liveness import liveness
    from mebp_compiler.passes.policies import mebp_schedule, none_schedule
    from mebp_compiler.passes.rewrite import rewrite

    model = _load_lora_model(args, device="meta")
    ids = torch.zeros((args.batch_size, args.seq_len), dtype=torch.int64, device="meta")
    chunks = _head_chunks(args)
    if chunks == "auto":
        raise ValueError("mebp plan has no budget to choose --head-chunks from; give a number")
    graph = capture(model, {"input_ids": ids, "labels": ids}, head_chunks=chunks, vocab_slices=args.vocab_slices)
    print(graph.summary())
    for schedule in (none_schedule(graph), mebp_schedule(graph, args.checkpoints)):
        profile = liveness(rewrite(graph, schedule))
        print(f"\npolicy {schedule.policy}: predicted peak {format_bytes(profile.peak_bytes)}")
        print(profile.report())
    return 0


def _head_chunks(args) -> int | str:
    if args.head_chunks == "auto":
        return "auto"
    try:
        return int(args.head_chunks)
    except ValueError:
        raise ValueError(f"--head-chunks must be a number or 'auto', got {args.head_chunks!r}") from None


def _policy(args) -> str:
    return args.policy or ("optimal" if args.budget else "mebp")


def _compile(model, example, args):
    import mebp_compiler

    policy = _policy(args)
    return mebp_compiler.compile(model, example, policy, checkpoints=args.checkpoints,
                                 offload_dir=args.offload_dir, device=args.device,
                                 budget=args.budget if policy == "optimal" else None,
                                 optimizer=getattr(args, "optimizer", "adamw"),
                                 head_chunks=_head_chunks(args), vocab_slices=args.vocab_slices,
                                 mlp_chunks=args.mlp_chunks,
                                 int4=args.int4 or args.gguf_blocks, group_size=args.group_size,
                                 gguf_file=_gguf_file(args), fuse_update=args.fuse_update)


def _gguf_file(args) -> Path | None:
    from mebp_compiler import models

    if not args.gguf_blocks:
        return None
    if args.model != "smollm2-135m":
        raise ValueError(f"--gguf-blocks keeps the blocks of the GGUF file a model is loaded from, and only "
                         f"smollm2-135m is ({args.model} has random weights); drop --gguf-blocks or use --int4")
    return models.smollm2_gguf_path()


def _say(message: str) -> None:
    print(f"[mebp] {message}", file=sys.stderr, flush=True)


def _jsonable(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (str, int, float, bool, type(None)))}


if __name__ == "__main__":
    sys.exit(main())
