"""The schedule is data: per tensor keep / recompute / offload, and the execution sequence.

A `Schedule` is produced by a policy or a solver, saved as JSON, plotted by notebooks,
asserted on by tests, and applied by `passes.rewrite`; nothing else decides.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mebp_compiler.checksums import seal_json, unseal_json
from mebp_compiler.files import atomic_write_json

if TYPE_CHECKING:
    from mebp_compiler.ir import TrainingGraph

#: Version of the JSON layout; 2 added the seal (`sha256`, see `checksums.seal_json`) of saved files.
SCHEDULE_FORMAT_VERSION = 2


class ScheduleError(ValueError):
    """A schedule that cannot be applied to a graph; the message names the step and tensor."""


class Decision(str, enum.Enum):
    """What happens to a forward tensor between its forward use and the backward."""

    KEEP = "keep"  # held in RAM until its last backward use
    RECOMPUTE = "recompute"  # dropped after the forward, computed again before the backward needs it
    OFFLOAD = "offload"  # written to a memory-mapped file after it is produced, read back for the backward


class StepKind(str, enum.Enum):
    COMPUTE = "compute"  # run the node as traced
    RECOMPUTE = "recompute"  # run a clone of a forward node during the backward
    OFFLOAD = "offload"  # write a tensor to disk (its RAM copy is dropped after its last forward use)
    RELOAD = "reload"  # read an offloaded tensor back


@dataclass(frozen=True)
class Step:
    kind: StepKind
    tensor: str  # node name in the captured graph


@dataclass(frozen=True)
class TensorOrigin:
    """Where a tensor of the step was computed, as the capture recorded it at trace time."""

    module: str  # the module's path in model.named_modules(), e.g. "...layers.3.self_attn.q_proj"; "" at the top
    layer: int | None  # the transformer block (layer) from 0; None outside the blocks (embedding, head, loss)

    def describe(self) -> str:
        where = "outside the layers" if self.layer is None else f"layer {self.layer}"
        return f"{where}, {self.module or 'the model itself'}"


@dataclass
class Schedule:
    """Decisions for forward tensors plus the sequence that realises them.

    `decisions` covers the forward tensors a policy holds an opinion on; a forward tensor
    with no decision is dropped after its last forward use. `sequence` lists every step
    of the rewritten step in execution order. Frees are not listed: every value is
    dropped right after its last use in the sequence (see `passes.liveness`).
    `stats` carries solver facts (objective, bound, gap, seconds) for display.
    `origins` names, by module path and layer, the tensors of `decisions` and `sequence`
    (keyed by graph node name, as they are), where the schedule was made from a captured
    graph (`with_origins`); it is for reading and plotting, and nothing decides by it.
    """

    policy: str
    decisions: dict[str, Decision]
    sequence: list[Step]
    stats: dict[str, float | int | str] = field(default_factory=dict)
    origins: dict[str, TensorOrigin] = field(default_factory=dict)

    def tensors_with(self, decision: Decision) -> list[str]:
        return [name for name, d in self.decisions.items() if d == decision]

    def to_json(self) -> dict:
        data = {
            "format_version": SCHEDULE_FORMAT_VERSION,
            "policy": self.policy,
            "decisions": {name: d.value for name, d in self.decisions.items()},
            "sequence": [[s.kind.value, s.tensor] for s in self.sequence],
            "stats": self.stats,
        }
        if self.origins:
            data["tensors"] = {name: {"module": o.module, "layer": o.layer} for name, o in self.origins.items()}
        return data

    @classmethod
    def from_json(cls, data: dict) -> Schedule:
        version = data.get("format_version")
        if version != SCHEDULE_FORMAT_VERSION:
            raise ScheduleError(
                f"schedule format version {version!r} is not {SCHEDULE_FORMAT_VERSION}; "
                "compile the plan again with this version of mebp-compiler"
            )
        try:
            return cls(
                policy=str(data["policy"]),
                decisions={name: Decision(d) for name, d in data["decisions"].items()},
                sequence=[Step(StepKind(kind), str(tensor)) for kind, tensor in data["sequence"]],
                stats=dict(data.get("stats", {})),
                origins={name: TensorOrigin(str(o["module"]), None if o["layer"] is None else int(o["layer"]))
                         for name, o in data.get("tensors", {}).items()},
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise ScheduleError(f"corrupt schedule: {exc!r}; compile the plan again") from exc

    def save(self, path: str | os.PathLike) -> None:
        """Write the schedule as JSON, atomically, sealed with the SHA-256 of its content."""
        atomic_write_json(path, seal_json(self.to_json()))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Schedule:
        """Read a file `save` wrote; ScheduleError if it is not valid JSON, of another version, or changed since."""
        try:
            data = json.loads(Path(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ScheduleError(f"{path} is not valid JSON ({exc}); compile the plan again") from exc
        if isinstance(data, dict) and data.get("format_version") == SCHEDULE_FORMAT_VERSION:
            unsealed = unseal_json(data)
            if unsealed is None:
                raise ScheduleError(f"{path} does not match its SHA-256 checksum (its bytes changed after it was "
                                    "written); compile the plan again")
            data = unsealed
        return cls.from_json(data)


def with_origins(schedule: Schedule, graph: TrainingGraph) -> Schedule:
    """`schedule` with the module path and layer of each tensor it names, from `graph` (the captured
    graph it was made for: every node's `TensorInfo.module` and `.block`, recorded at trace time)."""
    names = dict.fromkeys([*schedule.decisions, *(s.tensor for s in schedule.sequence)])

    def layer(block: int | None) -> int | None:  # blocks past the layers are LM head chunks (capture)
        return block if block is not None and block < graph.num_blocks else None

    origins = {name: TensorOrigin(graph.info[name].module, layer(graph.info[name].block))
               for name in names if name in graph.info}
    return dataclasses.replace(schedule, origins=origins)
