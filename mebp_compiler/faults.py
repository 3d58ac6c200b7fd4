"""Crash injection for the fault suite (`tests/test_faults.py`).

`MEBP_FAULT_AT=<point>[:<n>]` makes the process kill itself with SIGKILL the n-th time
(default: the first) it reaches a write point whose name matches `<point>`, an fnmatch
pattern. A write point is named after what it writes: a file's name (`history.json`,
`*.bin` for offloaded tensors, `*.onnx`), or a directory swap, `<dir>/aside` (the old
directory moved aside, the new one not yet in place) and `<dir>/swapped` (the new one in
place, the old one not yet removed). Unset, `fault_point` costs one comparison.
"""

from __future__ import annotations

import fnmatch
import os
import signal

_armed: tuple[str, int] | None = None
_hits = 0


def arm(spec: str | None) -> None:
    """Kill at the write point `spec` (`<point>[:<n>]`), or at none when `spec` is None or empty."""
    global _armed, _hits
    _hits = 0
    if not spec:
        _armed = None
        return
    point, _, count = spec.rpartition(":") if spec.rpartition(":")[2].isdigit() else (spec, "", "1")
    _armed = (point, int(count))


def fault_point(name: str) -> None:
    """A write point: the process dies here when `MEBP_FAULT_AT` names it."""
    global _hits
    if _armed is None:
        return
    point, count = _armed
    if fnmatch.fnmatchcase(name, point):
        _hits += 1
        if _hits == count:
            os.kill(os.getpid(), signal.SIGKILL)


arm(os.environ.get("MEBP_FAULT_AT"))
