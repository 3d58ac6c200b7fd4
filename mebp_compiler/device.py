"""Device profiles: turn FLOPs and bytes into seconds, and say how much memory there is.

A profile is a few numbers in a JSON file; `iphone15promax` and `cpu-local` ship in
`mebp_compiler/devices/`, and any other file path works too.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40}


def parse_size(size: str | int | float) -> int:
    """Bytes from a human size: 300MB = 300e6, 1GiB = 2**30, a bare number is bytes."""
    if isinstance(size, (int, float)):
        return int(size)
    match = _SIZE.match(size)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {size!r} as a size; write e.g. 300MB, 1.5GiB or 500000000")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


#: The op classes a profile may give rates for (`passes.cost.op_class` sorts ops into them).
OP_CLASSES = ("matmul", "reduction", "movement", "elementwise", "view")


@dataclass(frozen=True)
class OpClassRates:
    """The roofline of one op class: attainable FLOP/s and bytes moved per second."""

    flops_per_s: float
    bytes_per_s: float


@dataclass(frozen=True)
class DeviceProfile:
    """Memory and speed of a target device.

    `flops_per_s` is the attainable arithmetic rate, `memory_bytes_per_s` the DRAM
    bandwidth (element-wise ops are bound by it), flash rates are for offloaded tensors.
    `io_overlap` is the fraction of the step's compute time during which flash I/O can
    run concurrently (1.0: fully asynchronous, 0.0: I/O stalls compute). `op_overhead_s`
    is the fixed cost of launching one op (so recomputing a view or a tiny op is not
    free) and `io_latency_s` the fixed cost of one flash write + read round trip.
    `decompress_bytes_per_s` is the rate at which INT4 weight bytes are decompressed; a
    decompression also reads its INT4 bytes from the memory-mapped file at
    `flash_read_bytes_per_s` (counted every time: under memory pressure the OS drops those
    clean pages, which is the point of mapping them).
    `op_classes` gives an op class (`OP_CLASSES`) its own roofline; a class it leaves out
    uses `flops_per_s` and `memory_bytes_per_s`. A view op costs `op_overhead_s` only.
    """

    name: str
    memory_cap_bytes: int
    flops_per_s: float
    memory_bytes_per_s: float
    flash_read_bytes_per_s: float
    flash_write_bytes_per_s: float
    io_overlap: float = 1.0
    op_overhead_s: float = 5e-6
    io_latency_s: float = 1e-4
    decompress_bytes_per_s: float = 5e9
    op_classes: Mapping[str, OpClassRates] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.op_classes) - set(OP_CLASSES))
        if unknown:
            raise ValueError(f"device profile {self.name!r}: unknown op classes {unknown}; use {list(OP_CLASSES)}")

    def compute_s(self, flops: float, bytes_moved: float, op_class: str | None = None) -> float:
        """Seconds for one op: bound by arithmetic or by memory traffic, whichever is slower,
        at the rates of `op_class` where the profile has them."""
        rates = self.op_classes.get(op_class) if op_class else None
        if rates is None:
            return max(flops / self.flops_per_s, bytes_moved / self.memory_bytes_per_s)
        return max(flops / rates.flops_per_s, bytes_moved / rates.bytes_per_s)

    def offload_s(self, nbytes: float) -> float:
        """Seconds to write `nbytes` to flash and read them back."""
        return self.io_latency_s + nbytes / self.flash_write_bytes_per_s + nbytes / self.flash_read_bytes_per_s

    def decompress_s(self, int4_bytes: float) -> float:
        """Seconds to read `int4_bytes` of INT4 weights from flash and decompress them."""
        return int4_bytes / self.flash_read_bytes_per_s + int4_bytes / self.decompress_bytes_per_s

    @classmethod
    def load(cls, name_or_path: str | os.PathLike) -> DeviceProfile:
        """A shipped profile by name (`iphone15promax`, `cpu-local`) or a JSON file."""
        path = Path(name_or_path)
        if not path.suffix:
            path = Path(str(resources.files("mebp_compiler") / "devices" / f"{name_or_path}.json"))
        if not path.is_file():
            shipped = sorted(p.stem for p in Path(str(resources.files("mebp_compiler") / "devices")).glob("*.json"))
            raise ValueError(f"no device profile {str(name_or_path)!r}; use one of {shipped} or a JSON file path")
        data = json.loads(path.read_text())
        fields = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in data.items() if k in fields}
        try:
            values["op_classes"] = {k: OpClassRates(**v) for k, v in values.get("op_classes", {}).items()}
            return cls(**values)
        except TypeError as exc:
            raise ValueError(f"device profile {path} is incomplete: {exc}") from exc

    def to_json(self) -> dict:
        """The profile as the JSON object `load` reads."""
        return asdict(self)
