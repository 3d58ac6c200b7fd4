"""Convergence study: exact LoRA backprop under memory plans against MeZO, on equal terms.

Every method starts from the same LoRA adapter, reads the same stream of training batches
(same seed, batch size and sequence length) and is evaluated on the same held-out blocks:

* ``mebp``: backprop under the `mebp` plan (block checkpoints, recompute), AdamW;
* ``optimal``: backprop under the CP-SAT scheduler's plan at a budget - by default the
  mebp plan's predicted peak plus AdamW's state, i.e. the same memory, least predicted
  time on the device profile - AdamW;
* ``mezo``: MeZO (Malladi et al., 2023, "Fine-Tuning Language Models with Just Forward
  Passes"): two forward passes per step along a seeded random direction, SGD update.

Metrics, as in the MeZO paper's evaluation (loss curves and accuracy), for causal language
modelling: training loss per step, and at evaluation points the held-out cross-entropy
(nats per predicted token) and held-out next-token accuracy (greedy argmax), both against
the step and against the training wall time (the summed step times; evaluation and
compilation are not counted). Memory is the bytes the CPU runtime holds during a step
(weights, LoRA parameters, batch and computed tensors, same accounting for every method),
with the optimizer state the trainer holds on top reported next to it.

The held-out blocks are a seeded random subset of the token blocks, disjoint from the
training blocks (`data.split_blocks`); evaluation uses the first `eval_blocks` of them.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

import mebp_compiler
from mebp_compiler.app import data
from mebp_compiler.device import parse_size
from mebp_compiler.app.evaluate import evaluate as evaluate_blocks
from mebp_compiler.checksums import SEAL_KEY, seal_json, unseal_json
from mebp_compiler.files import atomic_write, atomic_write_json, atomic_write_text
from mebp_compiler.ir import format_bytes
from mebp_compiler.app.mezo import compile_mezo, mezo_step
from mebp_compiler.plan import optimizer_state_bytes
from mebp_compiler.plan import make_optimizer
from mebp_compiler.app.study_settings import LABELS, METHODS, StudySettings

@dataclass
class EvalPoint:
    """Held-out metrics after `step` optimizer steps and `train_s` seconds of training."""

    step: int
    train_s: float
    heldout_loss: float  # nats per predicted token
    heldout_accuracy: float  # fraction of next tokens predicted exactly (argmax)
    train_loss: float | None  # mean training loss of the steps since the previous point


@dataclass
class MethodResult:
    """One method's run: per-step training record, evaluation points and memory (bytes)."""

    method: str
    label: str
    settings: dict
    compile_s: float
    predicted_peak_bytes: int
    held_peak_bytes: int  # most the runtime held in any step (weights, LoRA, batch, computed)
    optimizer_state_bytes: int  # held by the trainer on top (AdamW moments; 0 for MeZO's SGD)
    train_loss: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    evals: list[EvalPoint] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.train_loss)

    @property
    def train_s(self) -> float:
        return sum(self.step_s)

    def first_reaching(self, loss: float) -> EvalPoint | None:
        """The first evaluation point whose held-out loss is at most `loss`."""
        return next((p for p in self.evals if p.heldout_loss <= loss), None)


@dataclass
class Study:
    model: str
    settings: StudySettings
    train_blocks: int
    heldout_blocks: int
    results: list[MethodResult]
    environment: dict
    lora: dict = field(default_factory=dict)  # `lora_placement` of the model (absent in older studies)

    @classmethod
    def from_json(cls, record: dict) -> Study:
        """The study written by `to_json` (e.g. read back from study.json to draw it again)."""
        results = [MethodResult(**{k: v for k, v in m.items() if k not in ("steps", "train_s", "evals")},
                                evals=[EvalPoint(**p) for p in m["evals"]]) for m in record["methods"]]
        settings = {**record["settings"], "methods": tuple(record["settings"]["methods"])}
        settings.pop("time_limit_s", None)  # studies run when the scheduler's limit was wall-clock seconds
        return cls(model=record["model"], settings=StudySettings(**settings), train_blocks=record["train_blocks"],
                   heldout_blocks=record["heldout_blocks"], results=results, environment=record["environment"],
                   lora=record.get("lora", {}))

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "settings": asdict(self.settings),
            "mezo_budget": self.settings.mezo_budget,
            "train_blocks": self.train_blocks,
            "heldout_blocks": self.heldout_blocks,
            "environment": self.environment,
            "lora": self.lora,
            "targets": [asdict(t) for t in targets(self)],
            "methods": [{**asdict(r), "steps": r.steps, "train_s": r.train_s} for r in self.results],
        }


def lora_placement(model: torch.nn.Module) -> dict:
    """What the study's peft adapter trains: rank, alpha, target modules, blocks, modules trained in full,
    and the names of every trainable parameter (LoRA factors and the modules' full copies)."""
    config = model.peft_config["default"]
    targets = config.target_modules
    return {"r": config.r, "alpha": config.lora_alpha,
            "target_modules": targets if isinstance(targets, str) else sorted(targets),
            "layers_to_transform": None if config.layers_to_transform is None else list(config.layers_to_transform),
            "modules_to_save": sorted(config.modules_to_save or ()),
            "trainable_parameters": [n for n, p in model.named_parameters() if p.requires_grad]}


def evaluate(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 4) -> tuple[float, float]:
    """Held-out (cross-entropy in nats per predicted token, next-token accuracy) of `model` on `blocks`
    (`mebp_compiler.app.evaluate.evaluate`, every position but the last of each block predicting the next)."""
    result = evaluate_blocks(model, blocks, batch_size=batch_size)
    return result.loss, result.accuracy


def study_blocks(blocks: torch.Tensor, settings: StudySettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(training blocks, held-out blocks, the held-out blocks evaluated): disjoint rows of `blocks`."""
    train, heldout = data.split_blocks(blocks, settings.heldout_fraction, seed=settings.seed)
    if settings.batch_size > train.shape[0]:
        raise ValueError(f"batch size {settings.batch_size} exceeds the {train.shape[0]} training blocks")
    return train, heldout, heldout[: settings.eval_blocks]


def run_study(model: torch.nn.Module, blocks: torch.Tensor, settings: StudySettings, *,
              model_name: str = "", progress: bool = True) -> Study:
    """Train each method of `settings.methods` from the same LoRA start and record the curves.

    `model` is a peft LoRA model; its LoRA parameters are reset to their values at the
    call before each method and left at the last method's result. `blocks` are the token
    blocks `[n, seq_len]` of the corpus.
    """
    settings.check()
    if blocks.shape[1] != settings.seq_len:
        raise ValueError(f"blocks have {blocks.shape[1]} tokens, settings.seq_len is {settings.seq_len}")
    train_blocks, heldout, eval_blocks = study_blocks(blocks, settings)
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    start_values = {n: p.detach().clone() for n, p in lora.items()}
    example = next(data.batches(train_blocks, settings.batch_size, seed=settings.seed))
    initial = evaluate(model, eval_blocks, settings.eval_batch_size)
    results: list[MethodResult] = []
    mebp_peak: list[int] = []  # the mebp plan's predicted peak, once known

    def measure() -> tuple[float, float]:
        return evaluate(model, eval_blocks, settings.eval_batch_size)

    for method in settings.methods:
        with torch.no_grad():
            for name, param in lora.items():
                param.copy_(start_values[name])
        batches = data.batches(train_blocks, settings.batch_size, seed=settings.seed)
        if method == "mezo":
            result = _run_mezo(model, example, batches, settings, measure, initial, results, progress)
        else:
            result = _run_backprop(method, model, example, batches, settings, measure, initial, mebp_peak, progress)
        results.append(result)

    return Study(
        model=model_name, settings=settings, train_blocks=train_blocks.shape[0],
        heldout_blocks=heldout.shape[0], results=results,
        environment={"torch": torch.__version__, "threads": torch.get_num_threads(),
                     "cpus": os.cpu_count(), "machine": platform.machine(),
                     "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())},
        lora=lora_placement(model),
    )


def _mebp_peak(model, example, settings: StudySettings, known: list[int]) -> int:
    if not known:
        known.append(mebp_compiler.compile(model, example, "mebp", head_chunks=settings.head_chunks)
                     .predicted_peak_bytes)
    return known[0]


def _run_backprop(method, model, example, batches, settings: StudySettings, measure, initial,
                  mebp_peak: list[int], progress: bool) -> MethodResult:
    state_bytes = optimizer_state_bytes(model, "adamw")
    start = time.perf_counter()
    if method == "mebp":
        plan = mebp_compiler.compile(model, example, "mebp", head_chunks=settings.head_chunks)
        mebp_peak[:] = [plan.predicted_peak_bytes]
        described = {"policy": "mebp"}
    else:
        budget = settings.budget
        if budget is None:
            budget = _mebp_peak(model, example, settings, mebp_peak) + state_bytes
        plan = mebp_compiler.compile(model, example, "optimal", budget=budget, device=settings.device,
                                     work_limit=settings.work_limit, optimizer="adamw",
                                     head_chunks=settings.head_chunks)
        described = {"policy": "optimal", "budget": budget, "budget_bytes": parse_size(budget), "device": settings.device,
                     "budget_rule": "given" if settings.budget is not None
                     else "mebp plan's predicted peak + AdamW state"}
    compile_s = time.perf_counter() - start
    params = plan.lora_parameters()
    optimizer = make_optimizer(params.values(), "adamw", settings.lr)

    def step(batch: Mapping[str, torch.Tensor], _t: int) -> tuple[float, int]:
        result = plan.step(batch)
        for name, param in params.items():
            param.grad = result.grads[name]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(result.loss), result.held_peak_bytes

    result = MethodResult(
        method=method, label=LABELS[method],
        settings={**described, "optimizer": "adamw", "lr": settings.lr},
        compile_s=compile_s, predicted_peak_bytes=plan.predicted_peak_bytes, held_peak_bytes=0,
        optimizer_state_bytes=state_bytes,
    )
    marks = eval_steps(settings.steps, settings.eval_every)
    _train_loop(result, step, batches, initial, measure, steps=settings.steps, step_marks=marks,
                progress=progress)
    return result


def eval_steps(steps: int, every: int) -> list[int]:
    """Steps after which to evaluate: every `every` steps and the last, plus two early points
    (`every // 5`, `2 * every // 5`) so that fast early progress is resolved."""
    marks = {every // 5, 2 * every // 5, *range(every, steps + 1, every), steps}
    return sorted(m for m in marks if 1 <= m <= steps)


def _run_mezo(model, example, batches, settings: StudySettings, measure, initial,
              earlier: list[MethodResult], progress: bool) -> MethodResult:
    start = time.perf_counter()
    plan = compile_mezo(model, example)
    compile_s = time.perf_counter() - start

    def step(batch: Mapping[str, torch.Tensor], t: int) -> tuple[float, int]:
        # one direction per step, regenerated from (seed, t) and never stored
        out = mezo_step(plan, batch, lr=settings.mezo_lr, eps=settings.mezo_eps, seed=settings.seed * 2**32 + t)
        return (out.loss_plus + out.loss_minus) / 2, out.held_peak_bytes

    result = MethodResult(
        method="mezo", label=LABELS["mezo"],
        settings={"optimizer": "sgd", "lr": settings.mezo_lr, "eps": settings.mezo_eps,
                  "budget": settings.mezo_budget},
        compile_s=compile_s, predicted_peak_bytes=plan.predicted_peak_bytes, held_peak_bytes=0,
        optimizer_state_bytes=0,
    )
    if settings.mezo_steps is not None:
        every = max(1, round(settings.eval_every * settings.mezo_steps / settings.steps))
        marks = eval_steps(settings.mezo_steps, every)
        _train_loop(result, step, batches, initial, measure, steps=settings.mezo_steps, step_marks=marks,
                    progress=progress)
    else:
        reference = next(r for r in earlier if r.method == settings.backprop_methods[0])
        _train_loop(result, step, batches, initial, measure, time_s=reference.train_s,
                    time_marks=[p.train_s for p in reference.evals[1:]], progress=progress)
    return result


def _train_loop(result: MethodResult, step: Callable[[Mapping[str, torch.Tensor], int], tuple[float, int]],
                batches: Iterator, initial: tuple[float, float], measure: Callable[[], tuple[float, float]], *,
                steps: int | None = None, step_marks: list[int] = (), time_s: float | None = None,
                time_marks: list[float] = (), progress: bool = True) -> None:
    """Step until `steps` steps, or until the summed step time reaches `time_s`; evaluate at the marks.

    Evaluates at step 0 (`initial`, shared by all methods), after each step in
    `step_marks`, when the training time first passes each of `time_marks`, and after
    the last step.
    """
    result.evals.append(EvalPoint(0, 0.0, initial[0], initial[1], None))
    by_time = steps is None
    bar = tqdm(total=round(time_s, 1) if by_time else steps, unit="s" if by_time else "step",
               desc=f"{result.method:8s}", disable=not progress, dynamic_ncols=True,
               bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} {unit} [{elapsed}<{remaining}{postfix}]")
    pending_times = list(time_marks)
    since_eval: list[float] = []
    t = 0
    while True:
        batch = next(batches)
        start = time.perf_counter()
        loss, held = step(batch, t)
        elapsed = time.perf_counter() - start
        t += 1
        result.train_loss.append(loss)
        result.step_s.append(elapsed)
        result.held_peak_bytes = max(result.held_peak_bytes, held)
        since_eval.append(loss)
        done = result.train_s >= time_s if by_time else t >= steps
        due = (t in step_marks) or bool(pending_times and result.train_s >= pending_times[0])
        while pending_times and result.train_s >= pending_times[0]:
            pending_times.pop(0)
        bar.update(min(elapsed, time_s - bar.n) if by_time else 1)
        bar.set_postfix_str(f"step {t}, loss {loss:.3f}, held {format_bytes(result.held_peak_bytes)}")
        if due or done:
            bar.set_postfix_str(f"step {t}, evaluating ...")
            heldout_loss, accuracy = measure()
            result.evals.append(EvalPoint(t, result.train_s, heldout_loss, accuracy,
                                          sum(since_eval) / len(since_eval)))
            since_eval = []
            bar.set_postfix_str(f"step {t}, held-out loss {heldout_loss:.3f}, acc {accuracy:.3f}, "
                                f"held {format_bytes(result.held_peak_bytes)}")
        if done:
            break
    bar.close()


@dataclass
class Target:
    """Steps and training seconds each method needs to first reach a held-out loss (None: not reached)."""

    name: str
    heldout_loss: float
    steps: dict[str, int | None]
    train_s: dict[str, float | None]


def targets(study: Study) -> list[Target]:
    """Held-out losses to compare the methods at.

    "common": the lowest held-out loss every method reaches (the largest of their best
    losses); "first": the lowest held-out loss any method has at its first evaluation after
    step 0 (what the fastest method reaches within a few steps); "best": the lowest held-out
    loss any method reaches. Resolution is the evaluation interval: a method reaches a
    target at the first evaluation at or below it.
    """
    best = {r.method: min(p.heldout_loss for p in r.evals) for r in study.results}
    first = min(r.evals[1].heldout_loss for r in study.results if len(r.evals) > 1)
    chosen = [("common (reached by all)", max(best.values())), ("first (best method's first evaluation)", first),
              ("best (lowest reached)", min(best.values()))]
    out = []
    for name, loss in chosen:
        points = {r.method: r.first_reaching(loss) for r in study.results}
        out.append(Target(name, loss, {m: p.step if p else None for m, p in points.items()},
                          {m: p.train_s if p else None for m, p in points.items()}))
    return out


def markdown_table(study: Study) -> str:
    """The study's settings, final metrics and memory, and the steps/time to reach the target losses."""
    s = study.settings
    sentences = [
        f"Model {study.model or '?'}, LoRA, sequence length {s.seq_len}, batch size {s.batch_size} (all methods);",
        f"{study.train_blocks} training blocks, {study.heldout_blocks} held-out blocks (disjoint), the first",
        f"{min(s.eval_blocks, study.heldout_blocks)} evaluated. Backprop: {s.steps} AdamW steps, lr {s.lr:g}.",
        f"MeZO: SGD lr {s.mezo_lr:g}, eps {s.mezo_eps:g}, budget {s.mezo_budget}.",
        *(f"Optimal schedule: budget {format_bytes(r.settings['budget_bytes'])} ({r.settings['budget_rule']}), "
          f"cost model '{r.settings['device']}'." for r in study.results if r.method == "optimal"),
        f"Training time is the summed step time ({study.environment.get('threads', '?')} torch thread(s));",
        "held peak is what the CPU runtime held in a step (weights, LoRA, batch, computed tensors).",
    ]
    lines = [
        " ".join(sentences),
        "",
        "| method | steps | training time | held-out loss (start -> end) | held-out next-token accuracy "
        "(start -> end) | training loss, last 10% of steps | held peak | + optimizer state | step time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in study.results:
        first, last = r.evals[0], r.evals[-1]
        tail = r.train_loss[-max(1, r.steps // 10):]
        lines.append(
            f"| {r.label} | {r.steps} | {_seconds(r.train_s)} | {first.heldout_loss:.3f} -> {last.heldout_loss:.3f} | "
            f"{first.heldout_accuracy:.3f} -> {last.heldout_accuracy:.3f} | {sum(tail) / len(tail):.3f} | "
            f"{format_bytes(r.held_peak_bytes)} | {format_bytes(r.optimizer_state_bytes)} | "
            f"{r.train_s / max(1, r.steps):.2f} s |"
        )
    lines += ["", "| held-out loss target | " + " | ".join(r.label for r in study.results) + " |",
              "|---|" + "---:|" * len(study.results)]
    for t in targets(study):
        cells = []
        for r in study.results:
            step, secs = t.steps[r.method], t.train_s[r.method]
            cells.append(f"{step} steps, {_seconds(secs)}" if step is not None
                         else f"not reached in {r.steps} steps, {_seconds(r.train_s)}")
        lines.append(f"| {t.name}: {t.heldout_loss:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _seconds(s: float) -> str:
    return f"{s:.0f} s" if s >= 10 else f"{s:.2g} s"


def plot_study(study: Study, path: str | os.PathLike) -> Path:
    """Held-out loss vs step and vs training time (top), held-out accuracy and training loss vs step (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for r in study.results:
        label = (f"{r.label} (held {format_bytes(r.held_peak_bytes)}"
                 + (f" + {format_bytes(r.optimizer_state_bytes)} AdamW)" if r.optimizer_state_bytes else ")"))
        steps = [p.step for p in r.evals]
        line, = axes[0, 0].plot(steps, [p.heldout_loss for p in r.evals], marker="o", ms=3, label=label)
        axes[0, 1].plot([p.train_s for p in r.evals], [p.heldout_loss for p in r.evals], marker="o", ms=3,
                        color=line.get_color(), label=label)
        axes[1, 0].plot(steps, [p.heldout_accuracy for p in r.evals], marker="o", ms=3, color=line.get_color(),
                        label=label)
        window = max(1, r.steps // 15)
        smooth = [sum(r.train_loss[max(0, i - window + 1): i + 1]) / (i + 1 - max(0, i - window + 1))
                  for i in range(r.steps)]
        axes[1, 1].plot(range(1, r.steps + 1), smooth, color=line.get_color(), label=f"{r.label} ({window}-step mean)")
    for ax, x, y in ((axes[0, 0], "step", "held-out loss (nats/token)"),
                     (axes[0, 1], "training wall time (s)", "held-out loss (nats/token)"),
                     (axes[1, 0], "step", "held-out next-token accuracy"),
                     (axes[1, 1], "step", "training loss (moving mean)")):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    axes[1, 1].legend(fontsize=8)
    s = study.settings
    fig.suptitle(f"{study.model}, LoRA: backprop vs. MeZO (seq {s.seq_len}, batch {s.batch_size}; "
                 f"MeZO budget: {s.mezo_budget})", fontsize=10)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90))
    finally:
        plt.close(fig)


def write_study(study: Study, out: str | os.PathLike) -> dict[str, Path]:
    """Write `curves.png`, `study.json` and `table.md` into the directory `out` (created if missing)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return {
        "png": plot_study(study, out / "curves.png"),
        "json": atomic_write_json(out / "study.json", seal_json(_finite(study.to_json()))),
        "table": atomic_write_text(out / "table.md", markdown_table(study)),
    }


def redraw(out: str | os.PathLike) -> dict[str, Path]:
    """Read `out/study.json` and write its PNG and table again (no training).

    Raises FileNotFoundError if there is no study.json, ValueError if it is not one or does
    not match its checksum (a study written before checksums were sealed in is read as it is).
    """
    path = Path(out) / "study.json"
    if not path.is_file():
        raise FileNotFoundError(f"no study to redraw: {path} does not exist (run mebp compare --out {out} first)")
    try:
        record = json.loads(path.read_text())
        if SEAL_KEY in record:
            record = unseal_json(record)
            if record is None:
                raise ValueError(f"{path} does not match its SHA-256 checksum (its bytes changed after it was "
                                 "written); run mebp compare again")
        study = Study.from_json(record)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a study written by mebp compare ({exc})") from None
    return write_study(study, out)


def _finite(value):
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
