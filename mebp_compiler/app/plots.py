"""Pictures of schedules: memory over the step, decisions per block, the memory/time trade-off.

Every figure draws a decision, a policy and a baseline in the colour `PALETTE` gives it, so
`keep` (or `mebp`) looks the same in every plot of the notebook, the CLI and the docs.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import matplotlib.pyplot as plt

from mebp_compiler.app.baselines import BASELINES
from mebp_compiler.ir import TrainingGraph
from mebp_compiler.passes.liveness import MemoryProfile
from mebp_compiler.schedule import Decision, Schedule, TensorOrigin, with_origins

MIB = 2**20

#: The one colour of each decision, policy and baseline in every figure (matplotlib's tab10 colours).
PALETTE = {
    "keep": "tab:blue",
    "recompute": "tab:orange",
    "offload": "tab:green",
    "none": "tab:gray",
    "mebp": "tab:purple",
    "optimal": "tab:red",
    "eager": "tab:brown",
    "hf-checkpointing": "tab:pink",
    "budget": "black",
}


def plot_memory(profiles: Mapping[str, MemoryProfile], ax=None, budget_bytes: int | None = None,
                baselines: Mapping[str, int] | None = None):
    """Live bytes over the step, one line per schedule (keyed by policy); x is the fraction of the step's ops.

    `baselines` maps a baseline name (`app.baselines.BASELINES`) to the peak bytes it was measured
    to need for the same step, drawn as a dotted line across the step.
    """
    ax = ax or plt.subplots(figsize=(8, 4))[1]
    for policy, profile in profiles.items():
        total = profile.total
        xs = [k / max(1, len(total) - 1) for k in range(len(total))]
        ax.plot(xs, [b / MIB for b in total], color=PALETTE.get(policy),
                label=f"{policy} schedule, predicted (peak {profile.peak_bytes / MIB:.1f} MiB)")
    for name, peak in (baselines or {}).items():
        ax.axhline(peak / MIB, color=PALETTE[name], linestyle=":", linewidth=1.5,
                   label=f"{BASELINES[name]}, measured peak ({peak / MIB:.1f} MiB)")
    if budget_bytes is not None:
        ax.axhline(budget_bytes / MIB, color=PALETTE["budget"], linestyle="--", linewidth=1,
                   label=f"budget ({budget_bytes / MIB:.1f} MiB)")
    ax.set_xlabel("progress through the step (forward, then backward)")
    ax.set_ylabel("held MiB (weights in RAM included)")
    ax.grid(alpha=0.3)
    ax.legend()
    return ax


def _origins(graph: TrainingGraph, schedule: Schedule) -> dict[str, TensorOrigin]:
    """Where each tensor of `schedule` was computed: its own record, else the graph's (`with_origins`)."""
    return (schedule if schedule.origins else with_origins(schedule, graph)).origins


def decisions_by_block(graph: TrainingGraph, schedule: Schedule) -> dict[str, dict[str, int]]:
    """Bytes per layer ("layer k", and "outside" the layers) that the schedule keeps, recomputes or offloads."""
    table: dict[str, dict[str, int]] = defaultdict(lambda: {d.value: 0 for d in Decision})
    origins = _origins(graph, schedule)
    for name, decision in schedule.decisions.items():
        layer = origins[name].layer
        table["outside" if layer is None else f"layer {layer}"][decision.value] += graph.info[name].alloc_bytes
    return dict(sorted(table.items(), key=lambda kv: (kv[0] == "outside", len(kv[0]), kv[0])))


def largest_tensors(graph: TrainingGraph, schedule: Schedule, top: int = 10) -> list[dict]:
    """The `top` largest tensors the schedule decides on, largest first: node name, decision, bytes,
    layer and module path (`Schedule.origins`)."""
    origins = _origins(graph, schedule)
    rows = [{"tensor": name, "decision": decision.value, "bytes": graph.info[name].alloc_bytes,
             "layer": origins[name].layer, "module": origins[name].module}
            for name, decision in schedule.decisions.items()]
    return sorted(rows, key=lambda r: (-r["bytes"], r["tensor"]))[:top]


def plot_decisions(graph: TrainingGraph, schedule: Schedule, ax=None):
    """Stacked bars: MiB kept / recomputed / offloaded per layer, in the decisions' `PALETTE` colours."""
    ax = ax or plt.subplots(figsize=(8, 3))[1]
    table = decisions_by_block(graph, schedule)
    labels = list(table)
    bottom = [0.0] * len(labels)
    for decision in Decision:
        values = [table[b][decision.value] / MIB for b in labels]
        ax.bar(labels, values, bottom=bottom, label=decision.value, color=PALETTE[decision.value])
        bottom = [a + b for a, b in zip(bottom, values)]
    ax.set_ylabel("MiB")
    ax.set_title(f"what the {schedule.policy} schedule does with each layer's forward tensors")
    ax.tick_params(axis="x", rotation=90)
    ax.legend()
    return ax


def plot_pareto(points, ax=None):
    """Predicted step time against predicted peak: the optimal frontier, `none` and `mebp` marked."""
    ax = ax or plt.subplots(figsize=(6, 4))[1]
    frontier = sorted((p for p in points if p.policy == "optimal"), key=lambda p: p.predicted_peak_bytes)
    ax.plot([p.predicted_peak_bytes / MIB for p in frontier], [p.predicted_time_s * 1e3 for p in frontier],
            "o-", color=PALETTE["optimal"], label="optimal schedules (budget sweep)")
    for p in points:
        if p.policy != "optimal":
            ax.plot(p.predicted_peak_bytes / MIB, p.predicted_time_s * 1e3, "s", markersize=9,
                    color=PALETTE.get(p.policy), label=f"{p.policy} schedule")
    ax.set_xlabel("predicted peak, whole step (MiB)")
    ax.set_ylabel("predicted step time (ms)")
    ax.grid(alpha=0.3)
    ax.legend()
    return ax


def save_memory_plot(profiles: Mapping[str, MemoryProfile], path, title: str = "", budget_bytes: int | None = None,
                     baselines: Mapping[str, int] | None = None):
    """`plot_memory` written to `path` as a PNG, atomically; returns the path."""
    from mebp_compiler.files import atomic_write

    fig, ax = plt.subplots(figsize=(8, 4.5))
    try:
        plot_memory(profiles, ax, budget_bytes=budget_bytes, baselines=baselines)
        ax.set_title(title or "memory over one training step")
        fig.tight_layout()
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    finally:
        plt.close(fig)
