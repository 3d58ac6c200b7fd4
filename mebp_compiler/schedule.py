"""The schedule is data: per tensor keep / recompute / offload, and the execution sequence.

A `Schedule` is produced by a policy or a solver, saved as JSON, plotted by notebooks,
asserted on by tests, and applied by `passes.rewrite`; nothing else decides.
"""

from __future__ import annotations

import enum
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from mebp_compiler.checksums import seal_json, unseal_json
from mebp_compiler.files import atomic_write_json

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


@dataclass
class Schedule:
    """Decisions for forward tensors plus the sequence that realises them.

    `decisions` covers the forward tensors a policy holds an opinion on; a forward tensor
    with no decision is dropped after its last forward use. `sequence` lists every step
    of the rewritten step in execution order. Frees are not listed: every value is
    dropped right after its last use in the sequence (see `passes.liveness`).
    `stats` carries solver facts (objective, bound, gap, seconds) for display.
    """

    policy: str
    decisions: dict[str, Decision]
    sequence: list[Step]
    stats: dict[str, float | int | str] = field(default_factory=dict)

    def tensors_with(self, decision: Decision) -> list[str]:
        return [name for name, d in self.decisions.items() if d == decision]

    def to_json(self) -> dict:
        return {
            "format_version": SCHEDULE_FORMAT_VERSION,
            "policy": self.policy,
            "decisions": {name: d.value for name, d in self.decisions.items()},
            "sequence": [[s.kind.value, s.tensor] for s in self.sequence],
            "stats": self.stats,
        }

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
