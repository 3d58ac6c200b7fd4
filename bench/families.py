#!/usr/bin/env python
"""Sweep over transformers' causal LMs: does mebp compile each family exactly, or refuse it clearly?

    python bench/families.py [--only gpt2,bloom] [--timeout 120] [--jobs 2] [--resume] [--out docs/families.md]

For every architecture in transformers' causal-LM auto mapping
(`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`) the sweep builds a small model from the family's own
config class (`small_config`: two layers, hidden 64, vocabulary 256; random weights, eager
attention, no download), puts LoRA on every linear layer with peft
(`target_modules="all-linear"`, which includes GPT-2's Conv1D with `fan_in_fan_out`),
computes loss and LoRA gradients with plain autograd, then captures the step once and
schedules it under the policies none, mebp and optimal (budget halfway between the two
others' peaks), rewrites and runs each schedule as `compile` does, and compares each with
autograd at the project's tolerance (max gradient difference <= 1e-5 x the largest
gradient, and the loss; tests/conftest.py).

Each family ends in one of:

- pass: every policy matched autograd;
- refused: mebp raised its own clear error (CaptureError and the other project errors)
  before running a step - the reason is in the table;
- FAIL: a policy returned a different loss or gradient (a wrong answer), or mebp crashed
  with an error that is not its own;
- not built / no autograd: the family does not build from a small config here, or plain
  autograd does not produce a finite loss and gradients; these are outside the pass rate.

The pass rate is pass / (pass + refused + FAIL). Families run in a worker process (one
import for many families); a family that hangs past --timeout or kills the worker is
recorded and the sweep goes on. The table and the rows (JSON) are rewritten after every
family, so an interrupted sweep continues with --resume. `docs/families.md` records a run.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import pathlib
import platform
import signal
import subprocess
import sys
import time
import traceback
import warnings

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

PROJECT_TOLERANCE = 1e-5
SEQ_LEN, BATCH = 16, 2
VOCAB = 256
POLICIES = ("none", "mebp", "optimal")
#: A config that keeps more parameters than this is not built (its fallback levels keep the
#: family's own sizes; some reach 18-20 GB and were killed by the kernel's OOM killer).
MAX_PARAMETERS = 200_000_000

#: A small model of any family: the generic names (configs map their own, e.g. GPT-2's n_embd,
#: through `attribute_map`), and the knobs of MoE, MLA and state-space families.
SMALL = {
    "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "vocab_size": VOCAB, "max_position_embeddings": 128,
    "n_inner": 128, "ffn_dim": 128, "d_ff": 128, "ffn_hidden_size": 128, "decoder_ffn_dim": 128,
    "encoder_ffn_dim": 128, "encoder_layers": 2, "decoder_layers": 2, "num_layers": 2,
    "encoder_attention_heads": 4, "decoder_attention_heads": 4,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
    "n_shared_experts": 1, "num_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "sliding_window": 8, "attention_chunk_size": 8,
    "mamba_d_state": 8, "state_size": 8, "mamba_n_heads": 4, "mamba_head_dim": 16, "mamba_d_conv": 4,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1,
    "is_decoder": True, "use_cache": False, "tie_word_embeddings": True,
}


#: How much of SMALL a config gets, most first: a family that rejects one (its own checks of how
#: sizes combine) or does not train with it under autograd is built with the next.
LEVELS = ("small", "core", "layers")


def small_config(model_type: str, level: str = "small"):
    """The family's config class at the SMALL sizes (or only its CORE ones, or only two layers and the
    vocabulary), every dropout 0; text sub-configs shrunk too."""
    from transformers import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[model_type]
    accepted = _accepted(config_class, SMALL)
    keep = {"small": accepted, "core": CORE, "layers": ("num_hidden_layers", "vocab_size", "use_cache")}[level]
    config = config_class(**{k: v for k, v in accepted.items() if k in keep}, **FAMILY.get(model_type, {}))
    for key in getattr(config_class, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None and hasattr(sub, "to_dict"):
            setattr(config, key, type(sub)(**{**_accepted(type(sub), SMALL), **_no_dropout(sub)}))
    for key, value in _no_dropout(config).items():
        setattr(config, key, value)
    config._attn_implementation = "eager"
    return config


#: Settings a family needs beyond SMALL to build at two layers (its per-layer patterns).
FAMILY = {
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
}

#: The sizes every family has; the fallback when the family rejects the full SMALL set.
CORE = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size",
        "pad_token_id", "bos_token_id", "eos_token_id", "use_cache", "is_decoder")


def _accepted(config_class, values: dict) -> dict:
    """The entries of `values` the config class takes: its own parameters and `attribute_map` names,
    not read-only properties."""
    params = set(inspect.signature(config_class.__init__).parameters)
    fields = set(getattr(config_class, "__dataclass_fields__", {}))
    mapped = set(getattr(config_class, "attribute_map", {}))
    defaults = config_class()
    present = {k for k in values if hasattr(defaults, k)}
    properties = {k for k in values if isinstance(getattr(config_class, k, None), property)}
    return {k: v for k, v in values.items() if k in (params | fields | mapped | present) - properties}


def _no_dropout(config) -> dict:
    return {k: 0.0 for k, v in config.to_dict().items()
            if isinstance(v, float) and ("dropout" in k or "pdrop" in k or k == "router_jitter_noise")}


class _Timeout(BaseException):  # not an Exception: passes through the code under test
    pass


@contextlib.contextmanager
def _deadline(seconds: int):
    def expire(signum, frame):
        raise _Timeout(f"took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:400]}"


def _build(model_type: str, level: str, seed: int):
    """(model with LoRA, batch, autograd loss, autograd LoRA gradients), or a result row saying why not."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    try:
        config = small_config(model_type, level)
        with torch.device("meta"):  # a fallback level keeps the family's own sizes: count before building
            parameters = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        if parameters > MAX_PARAMETERS:
            return {"status": "not built", "detail": f"the {level} config keeps {parameters / 1e6:.0f}M parameters "
                                                     f"(more than {MAX_PARAMETERS / 1e6:.0f}M: not small)"}
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        model.train()
        model = _with_lora(model)
    except Exception as exc:
        return {"status": "not built", "detail": _line(exc)}
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    vocab = min(VOCAB, model.get_input_embeddings().num_embeddings)
    ids = torch.randint(3, vocab, (BATCH, SEQ_LEN), generator=generator)
    labels = ids.clone()
    labels[:, :2] = -100
    batch = {"input_ids": ids, "labels": labels}
    lora_params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    try:
        loss = model(**batch, use_cache=False).loss
        grads = dict(zip(lora_params, torch.autograd.grad(loss, list(lora_params.values()), allow_unused=True)))
    except Exception as exc:
        return {"status": "no autograd", "detail": _line(exc)}
    if loss is None or not torch.isfinite(loss) or any(g is not None and not g.isfinite().all() for g in grads.values()):
        return {"status": "no autograd", "detail": "loss or gradients not finite under plain autograd"}
    grads = {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(lora_params.items(), grads.values())}
    return model, batch, loss, grads


def _with_lora(model):
    """peft LoRA on every linear layer, less those peft itself refuses for this family (it names them)."""
    import re

    import peft

    excluded = []
    while True:
        lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", exclude_modules=excluded or None,
                               lora_dropout=0.0, bias="none", task_type=peft.TaskType.CAUSAL_LM)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return peft.get_peft_model(model, lora)
        except ValueError as exc:
            refused = re.search(r"Module '([\w.]+)' is incompatible", str(exc))
            if refused is None or refused.group(1) in excluded:
                raise
            excluded.append(refused.group(1))


def check_family(model_type: str, seed: int = 0) -> dict:
    """Build, LoRA, autograd, then capture once, schedule under each policy, run and compare with autograd;
    a result row (see module doc). The steps are `mebp_compiler.compile`'s own passes, run on one capture."""
    from mebp_compiler.app import models
    from mebp_compiler.capture import capture
    from mebp_compiler.app.cli import _user_errors
    from mebp_compiler.device import DeviceProfile
    from mebp_compiler.passes.liveness import liveness
    from mebp_compiler.passes.policies import mebp_schedule, none_schedule, optimal_schedule
    from mebp_compiler.passes.rewrite import rewrite
    from mebp_compiler.plan import graph_inputs
    from mebp_compiler.runtime import Runtime

    row = {"family": model_type, "class": "", "blocks": "", "status": "", "detail": "", "max_diff": {}}
    failure = None
    for level in LEVELS:
        built = _build(model_type, level, seed)
        if isinstance(built, dict):
            failure = failure or built
            continue
        model, batch, loss, grads = built
        break
    else:
        return {**row, **failure}
    row["class"] = type(model.get_base_model()).__name__
    row["config"] = level
    scale = max(g.abs().max().item() for g in grads.values())
    try:
        layers = models.decoder_layers(model)
        path = next(n for n, m in model.named_modules() if m is layers)
        row["blocks"] = f"{path.removeprefix('base_model.model.')} ({len(layers)} x {type(layers[0]).__name__})"
    except Exception:
        pass
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            captured = capture(model, batch)
    except _user_errors() as exc:
        return {**row, "status": "refused", "detail": _line(exc)}
    except Exception as exc:
        return {**row, "status": "FAIL", "detail": f"capture crashed: {_line(exc)}"}
    peaks = {}
    for policy in POLICIES:
        try:
            if policy == "none":
                schedule = none_schedule(captured)
            elif policy == "mebp":
                schedule = mebp_schedule(captured)
            else:
                budget = (peaks["none"] + peaks["mebp"]) // 2
                schedule = optimal_schedule(captured, budget, DeviceProfile.load("iphone15promax"))
            graph = rewrite(captured, schedule)
            result = Runtime(graph).run(graph_inputs(model, graph, batch))
        except _user_errors() as exc:
            return {**row, "status": "FAIL", "detail": f"{policy}: {_line(exc)}"}
        except Exception as exc:
            return {**row, "status": "FAIL", "detail": f"{policy}: crashed: {_line(exc)}"}
        peaks[policy] = liveness(graph).peak_bytes
        worst = max((result.grads[n] - g).abs().max().item() for n, g in grads.items())
        loss_diff = abs(result.loss.item() - loss.item())
        row["max_diff"][policy] = worst / scale if scale > 0 else worst
        if not (worst <= PROJECT_TOLERANCE * scale and loss_diff <= PROJECT_TOLERANCE * max(1.0, abs(loss.item()))):
            return {**row, "status": "FAIL",
                    "detail": f"{policy}: wrong answer: grad diff {worst:.3g} (largest grad {scale:.3g}), "
                              f"loss diff {loss_diff:.3g}"}
    return {**row, "status": "pass"}


def _worker(families: list[str], timeout: int) -> None:
    """Check each family in turn, one JSON line per family on stdout (announced first on stderr)."""
    import torch

    torch.set_num_threads(1)
    for family in families:
        print(json.dumps({"start": family}), flush=True)
        start = time.perf_counter()
        try:
            with _deadline(timeout):
                row = check_family(family)
        except _Timeout as exc:
            row = {"family": family, "status": "FAIL", "detail": f"timeout: {exc}", "max_diff": {}}
        except Exception as exc:
            row = {"family": family, "status": "FAIL", "detail": f"crashed: {_line(exc)}", "max_diff": {}}
            traceback.print_exc()
        row["seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps(row), flush=True)


def sweep(families: list[str], timeout: int, done: list[dict] | None = None,
          progress=lambda rows: None, jobs: int = 1) -> list[dict]:
    """Run the families in `jobs` worker processes at a time; restart a worker that dies, recording its
    family as FAIL. Families already in `done` are not run again; `progress(rows)` is called after each."""
    import threading

    rows = list(done or [])
    remaining = [f for f in families if f not in {r["family"] for r in rows}]
    lock = threading.Lock()

    def record(row: dict) -> None:
        with lock:
            rows.append(row)
            progress(rows)
        print(f"{row['family']:28s} {row['status']:12s} {row.get('detail', '')[:110]}", file=sys.stderr, flush=True)

    def run(share: list[str]) -> None:
        while share:
            proc = subprocess.Popen([sys.executable, __file__, "--worker", ",".join(share), "--timeout", str(timeout)],
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                    env={**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"})
            current = None
            for line in proc.stdout:
                message = json.loads(line)
                if "start" in message:
                    current = message["start"]
                    continue
                share.remove(message["family"])
                current = None
                record(message)
            proc.wait()
            if current is None and share:
                raise RuntimeError(f"worker exited ({proc.returncode}) before {share[0]}")
            if current is not None:
                share.remove(current)
                record({"family": current, "status": "FAIL", "max_diff": {},
                        "detail": f"the worker process died (exit {proc.returncode})"})

    threads = [threading.Thread(target=run, args=(remaining[k::jobs],)) for k in range(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    order = {f: i for i, f in enumerate(families)}
    return sorted(rows, key=lambda r: order.get(r["family"], len(order)))


def write_table(rows: list[dict], path: pathlib.Path, command: str, total: int | None = None) -> None:
    import peft
    import torch
    import transformers

    counted = [r for r in rows if r["status"] in ("pass", "refused", "FAIL")]
    passed = sum(r["status"] == "pass" for r in counted)
    refused = sum(r["status"] == "refused" for r in counted)
    failed = sum(r["status"] == "FAIL" for r in counted)
    wrong = sum("wrong answer" in r.get("detail", "") for r in counted)
    lines = [
        "# Causal-LM families: exact, refused, or failing",
        "",
        "Every architecture in transformers' causal-LM auto mapping, built small (2 layers, hidden 64, "
        "vocabulary 256, random weights, eager attention), LoRA (r=4) on every linear layer with peft "
        "(`target_modules=\"all-linear\"`), compiled under the policies none, mebp and optimal (budget halfway "
        "between the two others' peaks) and compared with plain autograd: max LoRA-gradient difference "
        "<= 1e-5 x the largest gradient, and the loss (tests/conftest.py). Produced by:",
        "",
        f"    {command}",
        "",
        f"transformers {transformers.__version__}, peft {peft.__version__}, torch {torch.__version__}, "
        f"{platform.machine()}; {time.strftime('%Y-%m-%d')}.",
        "",
        *([f"**Partial run: {len(rows)} of the {total} families in the mapping have run so far** (the rest: "
           f"`{command} --resume`).", ""] if total and len(rows) < total else []),
        f"**Pass rate: {passed} of {len(counted)} families that build and train under plain autograd "
        f"({100 * passed / max(1, len(counted)):.0f}%)**; {refused} refused with a reason, {failed} failing "
        f"({wrong} of them wrong answers). {len(rows) - len(counted)} more do not build from a small config "
        "here or do not train under plain autograd (listed at the end, outside the rate).",
        "",
        "| family | class | decoder blocks | result | reason / max grad diff (x largest grad) |",
        "|---|---|---|---|---|",
    ]
    for r in sorted(counted, key=lambda r: ({"FAIL": 0, "refused": 1, "pass": 2}[r["status"]], r["family"])):
        detail = r.get("detail") or ", ".join(f"{p} {d:.1e}" for p, d in r.get("max_diff", {}).items())
        lines.append(f"| {r['family']} | {r.get('class', '')} | {r.get('blocks', '')} | {r['status']} | "
                     f"{detail.replace('|', '/')} |")
    lines += ["", "## Outside the rate", "", "| family | class | why |", "|---|---|---|"]
    for r in sorted((r for r in rows if r not in counted), key=lambda r: r["family"]):
        lines.append(f"| {r['family']} | {r.get('class', '')} | {r['status']}: "
                     f"{r.get('detail', '').replace('|', '/')[:300]} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="comma-separated model types (default: the whole mapping)")
    parser.add_argument("--timeout", type=int, default=180, help="seconds per family")
    parser.add_argument("--out", default="docs/families.md", help="Markdown table to write")
    parser.add_argument("--json", default=None, help="the rows as JSON (default: --out with .json); read back by --resume")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes at a time")
    parser.add_argument("--resume", action="store_true", help="keep the families already in --json, run the rest")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        _worker(args.worker.split(","), args.timeout)
        return
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    families = args.only.split(",") if args.only else list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    command = "python bench/families.py" + (f" --only {args.only}" if args.only else "")
    results = pathlib.Path(args.json or pathlib.Path(args.out).with_suffix(".json"))
    done = json.loads(results.read_text()) if args.resume and results.is_file() else []

    def progress(rows: list[dict]) -> None:
        results.write_text(json.dumps(rows, indent=1))
        write_table(rows, pathlib.Path(args.out), command, total=len(families))

    rows = sweep(families, args.timeout, done, progress, args.jobs)
    progress(rows)
    print(pathlib.Path(args.out).read_text())


if __name__ == "__main__":
    main()
