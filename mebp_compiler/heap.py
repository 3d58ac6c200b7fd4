"""Returning the C heap's freed pages to the OS between the step's segments.

glibc keeps freed heap chunks resident and fills later requests from them, so a process
whose tensors come and go (a compiled step, a schedule's recomputations) ends up with
resident pages that hold no live tensor: RSS above the bytes the step really holds.
`malloc_trim(0)` hands those pages back. On a C library without it this does nothing.
"""

from __future__ import annotations

import ctypes

import torch.fx as fx


def _find_malloc_trim():
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except OSError:
        return None


_MALLOC_TRIM = _find_malloc_trim()


@fx.node.has_side_effect  # no outputs: dead-code elimination must keep it
def release_freed_memory() -> None:
    """Graph op: return the C heap's free pages to the OS (glibc `malloc_trim(0)`; else a no-op)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
