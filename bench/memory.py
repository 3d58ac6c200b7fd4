#!/usr/bin/env python
"""Side-by-side memory and time of one LoRA training step, each method in a fresh process.

    python bench/memory.py --model smollm2-135m --seq-len 256 [--steps 3] [--out bench/results]

Run `python bench/memory.py --help` for what every column means and how it is measured.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import pathlib
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from typing import Any

METHODS = ("eager", "hf-checkpointing", "mezo-forward", "inference", "mebp-none", "mebp-mebp")
PLAN_METHODS = ("mebp-none", "mebp-mebp")
BACKPROP_METHODS = ("eager", "hf-checkpointing", "mebp-none", "mebp-mebp")

#: The environment every measured subprocess runs under (on top of the parent's).
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}

#: Held peak vs predicted peak for our plans must agree within this fraction.
PREDICTION_TOLERANCE = 0.02
#: Loss (absolute) and LoRA-gradient norm (relative) agreement between backprop methods.
LOSS_TOLERANCE = 1e-4
GRAD_NORM_TOLERANCE = 1e-3

MIB = 2**20
PROGRESS = "[bench]"

DESCRIPTION = """\
Side-by-side memory and time of one LoRA training step (batch 1) of one model at one
sequence length. Every method runs in its own fresh subprocess (this script with
--method), one after the other, with MALLOC_MMAP_THRESHOLD_=65536 (each large tensor is
its own mmap, returned to the OS on free, so RSS peaks repeat within ~10 MB) and
OMP_NUM_THREADS=1, torch.set_num_threads(1).

methods:
  eager             plain autograd on the LoRA model: model(**batch).loss.backward()
  hf-checkpointing  transformers' per-layer activation (gradient) checkpointing on the base
                    model, use_reentrant=False, then LoRA; the run checks that each decoder
                    layer really is recomputed in the backward (layer-0 MLP runs 2x a step)
  mezo-forward      a MeZO step (zeroth order): perturb the LoRA params in place by +eps*z
                    (z from a seeded generator), forward under no_grad, perturb by -2eps*z,
                    forward, restore, apply the projected-gradient update
  inference         one forward (with the loss) under torch.no_grad()
  mebp-none         mebp_compiler.compile(policy="none"), plan.step(batch): keep every
                    activation the backward reads (autograd's memory), op-by-op runtime
  mebp-mebp         mebp_compiler.compile(policy="mebp"), plan.step(batch): keep block
                    boundaries only, recompute each block in the backward (MeBP)

columns (MiB = 2^20 bytes):
  predicted peak act.   our plans only: the liveness pass's predicted peak of computed
                        tensors (activations, gradients, loss; not weights/LoRA/batch)
  runtime-held peak act.
                        our plans only: the same peak as measured by the runtime, which
                        counts the unique storages it really holds after every op
  predicted peak, all   our plans only: predicted peak of everything held (frozen weights,
                        LoRA params, batch and computed tensors)
  runtime-held peak, all
                        our plans only: the runtime's measured peak of everything held
  allocator peak        peak bytes of the tensors allocated during one step by torch's CPU
                        allocator, the same way for every method: one extra step under
                        torch.profiler.profile(profile_memory=True); its allocation (+) and
                        free (-) events are summed in time order and the running maximum is
                        taken. Frees of tensors allocated before the step are not counted
                        (the profiler does not see them), so this is the peak of the bytes
                        the step itself allocated, including op-internal scratch tensors.
                        Checked in every subprocess on a 100 MiB probe tensor.
  RSS over base         process peak RSS during the steps minus the RSS before them:
                        build the model (and for our plans compile it: compile is not part of
                        the step), one no-grad warm-up forward, gc.collect(),
                        malloc_trim(0), read VmRSS as the base, reset VmHWM
                        (echo 5 > /proc/self/clear_refs), run 1 warm-up step and --steps
                        timed steps, read VmHWM. Includes everything the process touches
                        during the step: tensors, allocator slack, kernels' scratch, Python
                        objects of the runtime.
  step / eager          median wall time of the --steps timed steps (after the warm-up step)
                        divided by eager's median, measured in its own subprocess in the same
                        run (n/a when eager is not among --methods); compile time is not
                        included; absolute seconds (every step) are in the JSON.

Checks (non-zero exit when one fails): for our plans the runtime's held peaks (all and
computed-only) equal the predicted ones within 2%; hf-checkpointing really recomputes;
the backprop methods agree on the loss (1e-4) and on the norm of the LoRA gradients
(1e-3 relative). The LoRA adapters are drawn after torch.manual_seed(0) and the B
matrices are set to seeded small random values (not peft's zeros) in every method, so
that all LoRA gradients are non-zero and comparable; token ids are seeded random ids.
Memory and time do not depend on the values.

Step times come from different processes run one after the other; on a shared machine
the load on the other cores drifts, and identical work was seen to vary by up to ~30%
between processes: read ratios within ~0.3 of each other as equal (for a precise time
ratio, alternate the methods' steps inside one process).

Output: a markdown table on stdout and in {out}/memory-{model}-seq{N}.md, and every number,
the environment and the command line in {out}/memory-{model}-seq{N}.json. A progress line
per method goes to stderr.
"""


# --------------------------------------------------------------------------- helpers


def read_status() -> dict[str, int]:
    """VmRSS / VmHWM (and friends) of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Vm") or line.startswith("Rss"):
                key, value = line.split(":", 1)
                parts = value.split()
                if len(parts) == 2 and parts[1] == "kB":
                    out[key] = int(parts[0]) * 1024
    return out


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def malloc_trim() -> None:
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def allocator_peak(fn) -> tuple[int, Any]:
    """Run `fn()` under the torch profiler; peak bytes of CPU tensors it allocated, and its result.

    Sums the profiler's `[memory]` events (+bytes on allocation, -bytes on free) in time
    order and returns the running maximum (>= 0). A free of a tensor allocated before the
    profiler started is not reported by the profiler and so does not lower the sum.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    events.sort(key=lambda e: e.start_ns())  # stable: ties keep the recorded order
    running = peak = 0
    for e in events:
        running += e.nbytes()
        peak = max(peak, running)
    return peak, result


def allocator_probe() -> int:
    """The allocator peak of a step that allocates a 100 MiB tensor, then 50 MiB, frees both."""
    import torch

    def probe():
        a = torch.empty(100 * MIB, dtype=torch.uint8)
        a.fill_(1)
        b = torch.empty(50 * MIB, dtype=torch.uint8)
        del a
        c = torch.empty(30 * MIB, dtype=torch.uint8)
        del b, c

    peak, _ = allocator_peak(probe)
    return peak


def progress(message: str) -> None:
    print(f"{PROGRESS} {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- one method (child)


def run_method(args: argparse.Namespace) -> dict[str, Any]:
    """Measure one method in this (fresh) process; returns the result record."""
    t_start = time.perf_counter()
    import torch

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    probe = allocator_probe()

    import mebp_compiler
    from mebp_compiler.app import models
    from mebp_compiler.ir import INPUT_ROLES, Role

    method = args.method
    rec: dict[str, Any] = {
        "method": method,
        "pid": os.getpid(),
        "torch_threads": torch.get_num_threads(),
        "env": {k: os.environ.get(k) for k in CHILD_ENV},
        "allocator_probe_bytes": probe,
        "allocator_probe_expected_bytes": 150 * MIB,
        "failures": [],
    }
    if probe != 150 * MIB:
        rec["failures"].append(f"allocator probe measured {probe} bytes, expected {150 * MIB}")

    # ---- build
    t0 = time.perf_counter()
    base_model = models.load(args.model)
    if method == "hf-checkpointing":
        kwargs = {"use_reentrant": False}
        if hasattr(base_model, "activation_checkpointing_enable"):
            base_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            rec["checkpointing_api"] = "activation_checkpointing_enable(use_reentrant=False)"
        else:
            base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            rec["checkpointing_api"] = "gradient_checkpointing_enable(use_reentrant=False)"
    torch.manual_seed(0)  # peft draws lora_A from the global RNG: same adapters in every process
    model = models.add_lora(base_model)
    lora = {k: p for k, p in model.named_parameters() if p.requires_grad}
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in lora.items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, args.seq_len), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone()}
    rec["load_s"] = time.perf_counter() - t0
    rec["params_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    rec["lora_params"] = sum(p.numel() for p in lora.values())

    plan = None
    if method in PLAN_METHODS:
        t0 = time.perf_counter()
        plan = mebp_compiler.compile(model, batch, policy=method.split("-", 1)[1])
        rec["compile_s"] = time.perf_counter() - t0
        rec["predicted_peak_bytes"] = plan.predicted_peak_bytes
        rec["predicted_peak_activation_bytes"] = plan.predicted_peak_activation_bytes
    progress(f"{method}: built in {time.perf_counter() - t_start:.1f} s, measuring")

    # ---- the step
    mlp_calls = [0]
    if method == "hf-checkpointing":
        # Count calls of layer 0's MLP forward (a wrapper on the instance, not a forward
        # hook: module hooks do not fire when torch.utils.checkpoint recomputes).
        mlp = models.decoder_layers(model)[0].mlp
        mlp_forward = mlp.forward

        def counted_forward(*a, **kw):
            mlp_calls[0] += 1
            return mlp_forward(*a, **kw)

        mlp.forward = counted_forward

    def clear_grads() -> None:
        for p in lora.values():
            p.grad = None

    eps, lr = 1e-3, 1e-6
    mezo_seed = [0]

    def mezo_perturb(seed: int, scale: float) -> None:
        g = torch.Generator().manual_seed(seed)
        for p in lora.values():
            p.add_(torch.randn(p.shape, generator=g), alpha=scale)

    def step() -> dict[str, Any]:
        if method in ("eager", "hf-checkpointing"):
            loss = model(**batch).loss
            loss.backward()
            return {"loss": loss.detach()}
        if method == "inference":
            with torch.no_grad():
                return {"loss": model(**batch).loss}
        if method == "mezo-forward":
            mezo_seed[0] += 1
            seed = mezo_seed[0]
            with torch.no_grad():
                mezo_perturb(seed, +eps)
                loss_plus = model(**batch).loss
                mezo_perturb(seed, -2 * eps)
                loss_minus = model(**batch).loss
                mezo_perturb(seed, +eps)
                projected = float((loss_plus - loss_minus) / (2 * eps))
                mezo_perturb(seed, -lr * projected)
            return {"loss": loss_plus}
        r = plan.step(batch)
        return {"loss": r.loss, "result": r}

    def grad_norm(out: dict[str, Any]) -> float | None:
        if method in ("eager", "hf-checkpointing"):
            return math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in lora.values() if p.grad is not None))
        if method in PLAN_METHODS:
            return math.sqrt(sum(float(g.double().pow(2).sum()) for g in out["result"].grads.values()))
        return None

    # ---- warm-up forward, base, reset the peak
    with torch.no_grad():
        model(**batch)
    gc.collect()
    malloc_trim()
    rec["base_rss_bytes"] = read_status()["VmRSS"]
    try:
        reset_peak_rss()
        rec["hwm_reset"] = True
    except OSError as e:  # pragma: no cover - depends on the kernel
        rec["hwm_reset"] = False
        rec["failures"].append(f"cannot reset VmHWM ({e}); RSS peaks would include model loading")

    times: list[float] = []
    for k in range(args.steps + 1):
        clear_grads()
        calls_before = mlp_calls[0]
        t0 = time.perf_counter()
        out = step()
        elapsed = time.perf_counter() - t0
        if k == 0:
            rec["warmup_step_s"] = elapsed
            rec["loss"] = float(out["loss"])
            rec["lora_grad_norm"] = grad_norm(out)
            if method == "hf-checkpointing":
                rec["layer0_mlp_calls_per_step"] = mlp_calls[0] - calls_before
            if plan is not None:
                r = out["result"]
                computed = tuple(role for role in Role if role not in INPUT_ROLES)
                rec["held_peak_bytes"] = r.held_peak_bytes
                rec["held_peak_activation_bytes"] = r.held_peak_bytes_of(computed)
                del r  # it holds the LoRA gradients: keep nothing across steps
        else:
            times.append(elapsed)
        del out
    status = read_status()
    rec["peak_rss_bytes"] = status["VmHWM"]
    rec["rss_over_base_bytes"] = status["VmHWM"] - rec["base_rss_bytes"]
    rec["rss_after_steps_bytes"] = status["VmRSS"]
    rec["step_times_s"] = times
    rec["step_median_s"] = statistics.median(times) if times else rec["warmup_step_s"]

    # ---- allocator peak of one more step (after the RSS measurement: the profiler's own
    # records would otherwise count in the RSS)
    clear_grads()
    gc.collect()
    peak, out = allocator_peak(step)
    rec["allocator_peak_bytes"] = peak
    del out
    clear_grads()

    # ---- checks
    if method == "hf-checkpointing" and rec["layer0_mlp_calls_per_step"] != 2:
        rec["failures"].append(
            f"hf-checkpointing: layer 0's MLP ran {rec['layer0_mlp_calls_per_step']}x in a step, "
            f"expected 2 (forward + recompute): checkpointing is not in effect"
        )
    if plan is not None:
        for held_key, pred_key in (
            ("held_peak_bytes", "predicted_peak_bytes"),
            ("held_peak_activation_bytes", "predicted_peak_activation_bytes"),
        ):
            held, pred = rec[held_key], rec[pred_key]
            rel = abs(held - pred) / max(pred, 1)
            rec[f"{held_key}_rel_error"] = rel
            if rel > PREDICTION_TOLERANCE:
                rec["failures"].append(
                    f"{method}: {held_key} {held / MIB:.1f} MiB differs from {pred_key} "
                    f"{pred / MIB:.1f} MiB by {rel:.1%} (> {PREDICTION_TOLERANCE:.0%})"
                )
    rec["child_wall_s"] = time.perf_counter() - t_start
    return rec


# --------------------------------------------------------------------------- the run (parent)


def spawn(args: argparse.Namespace, method: str) -> tuple[dict[str, Any] | None, str]:
    """Run one method in a fresh subprocess; its record (or None) and the tail of its stderr."""
    with tempfile.TemporaryDirectory(prefix="mebp-bench-") as tmp:
        result_file = pathlib.Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--model", args.model,
            "--seq-len", str(args.seq_len),
            "--steps", str(args.steps),
            "--method", method,
            "--result-file", str(result_file),
        ]
        env = {**os.environ, **CHILD_ENV}
        tail: deque[str] = deque(maxlen=40)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

        def pump(stream, keep: bool) -> None:
            for line in stream:
                if line.startswith(PROGRESS):
                    print(f"{PROGRESS}   {line[len(PROGRESS):].strip()}", file=sys.stderr, flush=True)
                elif keep and not line.startswith("USDT:"):
                    tail.append(line.rstrip("\n"))

        threads = [
            threading.Thread(target=pump, args=(proc.stdout, True), daemon=True),
            threading.Thread(target=pump, args=(proc.stderr, True), daemon=True),
        ]
        for t in threads:
            t.start()
        try:
            rc = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = None
        for t in threads:
            t.join(timeout=5)
        record = json.loads(result_file.read_text()) if result_file.exists() else None
        if record is None:
            reason = "timed out" if rc is None else f"exited with status {rc}"
            tail.append(f"(subprocess {reason} without a result)")
        return record, "\n".join(tail)


def mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / MIB:.1f}"


def build_table(records: dict[str, dict[str, Any]]) -> str:
    header = [
        "method",
        "predicted peak act. (MiB)",
        "runtime-held peak act. (MiB)",
        "predicted peak, all (MiB)",
        "runtime-held peak, all (MiB)",
        "allocator peak during step (MiB)",
        "RSS over base (MiB)",
        "step time / eager",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    eager = records.get("eager")
    for method, rec in records.items():
        if rec.get("error"):
            lines.append(f"| {method} | " + " | ".join(["FAILED"] * (len(header) - 1)) + " |")
            continue
        ratio = (
            f"{rec['step_median_s'] / eager['step_median_s']:.2f}x"
            if eager and not eager.get("error")
            else "n/a"
        )
        cells = [
            method,
            mib(rec.get("predicted_peak_activation_bytes")),
            mib(rec.get("held_peak_activation_bytes")),
            mib(rec.get("predicted_peak_bytes")),
            mib(rec.get("held_peak_bytes")),
            mib(rec["allocator_peak_bytes"]),
            mib(rec["rss_over_base_bytes"]),
            ratio,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cross_checks(records: dict[str, dict[str, Any]]) -> list[str]:
    """Backprop methods must agree on the loss and the LoRA gradient norm."""
    failures = []
    done = {m: r for m, r in records.items() if not r.get("error")}
    ref_name = next((m for m in BACKPROP_METHODS if m in done), None)
    if ref_name is None:
        return failures
    ref = done[ref_name]
    for method, rec in done.items():
        if abs(rec["loss"] - ref["loss"]) > LOSS_TOLERANCE and method in BACKPROP_METHODS + ("inference",):
            failures.append(f"{method}: loss {rec['loss']:.6f} differs from {ref_name}'s {ref['loss']:.6f}")
        if method in BACKPROP_METHODS and method != ref_name:
            a, b = rec["lora_grad_norm"], ref["lora_grad_norm"]
            if abs(a - b) > GRAD_NORM_TOLERANCE * max(abs(b), 1e-12):
                failures.append(f"{method}: LoRA grad norm {a:.6g} differs from {ref_name}'s {b:.6g}")
    return failures


def run_all(args: argparse.Namespace, argv: list[str]) -> int:
    import peft
    import torch
    import transformers

    from mebp_compiler.app import models

    if args.model not in models.MODEL_NAMES:
        print(f"bench/memory.py: error: {models.UnknownModelError(args.model)}", file=sys.stderr)
        return 2
    methods = args.methods
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"memory-{args.model}-seq{args.seq_len}"
    env_line = " ".join(f"{k}={v}" for k, v in CHILD_ENV.items())
    progress(
        f"{args.model} seq {args.seq_len}, batch 1: {len(methods)} methods, each in a fresh "
        f"subprocess with {env_line}, torch.set_num_threads(1)"
    )
    t_run = time.perf_counter()
    records: dict[str, dict[str, Any]] = {}
    failures: list[str] = []
    for i, method in enumerate(methods, 1):
        progress(f"[{i}/{len(methods)}] {method}: starting")
        t0 = time.perf_counter()
        record, tail = spawn(args, method)
        wall = time.perf_counter() - t0
        if record is None:
            records[method] = {"method": method, "error": tail, "subprocess_wall_s": wall}
            last = tail.strip().splitlines()[-2:] if tail.strip() else ["(no output)"]
            failures.append(f"{method}: the subprocess failed ({' / '.join(last)}):\n{tail}")
            progress(f"[{i}/{len(methods)}] {method}: FAILED after {wall:.0f} s")
            continue
        record["subprocess_wall_s"] = wall
        records[method] = record
        failures += record["failures"]
        extra = ""
        if method in PLAN_METHODS:
            extra = (
                f", held act. {mib(record['held_peak_activation_bytes'])} MiB "
                f"(predicted {mib(record['predicted_peak_activation_bytes'])})"
            )
        progress(
            f"[{i}/{len(methods)}] {method}: RSS over base {mib(record['rss_over_base_bytes'])} MiB, "
            f"allocator peak {mib(record['allocator_peak_bytes'])} MiB{extra}, "
            f"step {record['step_median_s']:.2f} s, {wall:.0f} s in all"
            + (" - CHECK FAILED" if record["failures"] else "")
        )
    failures += cross_checks(records)

    table = build_table(records)
    command = shlex.join([os.path.relpath(sys.executable), *sys.argv])
    env_info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "torch_threads_in_subprocesses": sorted({r.get("torch_threads") for r in records.values() if "torch_threads" in r}),
        "subprocess_env": CHILD_ENV,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    notes = [
        f"{args.model}, sequence length {args.seq_len}, batch 1, LoRA r=16 on q/k/v/o/gate/up/down "
        f"(fp32). Each method ran in a fresh subprocess with `{env_line}` and "
        f"`torch.set_num_threads(1)`; median of {args.steps} steps after 1 warm-up step. "
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}.",
        f"RSS over base: VmHWM during the steps minus VmRSS after build{'/compile' if any(m in PLAN_METHODS for m in methods) else ''} "
        f"+ no-grad warm-up forward + gc + malloc_trim(0). Allocator peak: running sum of "
        f"torch.profiler memory events over one step.",
    ]
    hf = records.get("hf-checkpointing")
    if hf and not hf.get("error"):
        notes.append(
            f"hf-checkpointing: layer 0's MLP ran {hf['layer0_mlp_calls_per_step']}x per step "
            f"(2 = forward + recompute in the backward)."
        )
    notes.append(
        "Step times: separate processes run one after the other on a shared machine; "
        "identical work varied by up to ~30% between processes, so ratios within ~0.3 are equal."
    )
    notes.append(
        "Checks: " + ("all passed (held = predicted within 2%; backprop methods agree on loss and "
                      "LoRA grad norm)." if not failures else f"{len(failures)} FAILED, see below.")
    )
    notes.append(f"Command: `{command}`")
    markdown = f"### Memory of one training step: {args.model}, seq {args.seq_len}\n\n{table}\n\n" + "\n".join(
        f"- {n}" for n in notes
    )
    if failures:
        markdown += "\n\n**FAILED CHECKS**\n\n" + "\n".join(f"- {f.splitlines()[0]}" for f in failures)
    markdown += "\n"

    payload = {
        "model": args.model,
        "seq_len": args.seq_len,
        "batch": 1,
        "steps": args.steps,
        "methods": methods,
        "command": command,
        "argv": argv,
        "environment": env_info,
        "results": records,
        "step_time_ratio_to_eager": {
            m: r["step_median_s"] / records["eager"]["step_median_s"]
            for m, r in records.items()
            if not r.get("error") and "eager" in records and not records["eager"].get("error")
        },
        "failures": failures,
        "wall_s": time.perf_counter() - t_run,
    }
    (out_dir / f"{stem}.md").write_text(markdown)
    (out_dir / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(markdown)
    progress(f"wrote {out_dir / stem}.md and .json in {payload['wall_s']:.0f} s")
    if failures:
        print("\nBENCHMARK CHECKS FAILED:", file=sys.stderr)
        for f in failures:
            print(f"  - {f}", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------- CLI


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/memory.py",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="smollm2-135m", help="a name from mebp_compiler.app.models.MODEL_NAMES")
    parser.add_argument("--seq-len", type=int, default=256, help="sequence length (batch is 1)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after 1 warm-up step (default 3)")
    parser.add_argument("--out", default="bench/results", help="folder for the .md and .json (default bench/results)")
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated subset of {', '.join(METHODS)} (default: all, in this order)",
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed per method subprocess")
    parser.add_argument("--method", choices=METHODS, help="internal: measure this one method in this process")
    parser.add_argument("--result-file", help="internal: where --method writes its JSON record")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        parser.error(f"unknown method(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(METHODS)}")
    args.methods = list(dict.fromkeys(methods))
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.method and not args.result_file:
        parser.error("--method needs --result-file")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.method:
        record = run_method(args)
        pathlib.Path(args.result_file).write_text(json.dumps(record))
        return 0
    return run_all(args, argv)


if __name__ == "__main__":
    sys.exit(main())
