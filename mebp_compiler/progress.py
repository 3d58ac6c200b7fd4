"""Phase lines: what the compiler is doing and how long it took, on the `mebp_compiler` logger.

The library only logs (level INFO); the command line shows them on stderr, and an
application shows them with `logging.basicConfig(level=logging.INFO)` or its own handler.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

logger = logging.getLogger("mebp_compiler")


@contextlib.contextmanager
def phase(what: str) -> Iterator[None]:
    """Log "`what` ..." when the phase starts and "`what`: done in S s" when it ends (not when it raises)."""
    logger.info("%s ...", what)
    start = time.perf_counter()
    yield
    logger.info("%s: done in %.1f s", what, time.perf_counter() - start)
