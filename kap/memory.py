"""Giving memory back to the node after a burst of connections.

CPython frees the objects of closed connections, but glibc keeps the freed
heap for reuse, so kap's RSS would stay at its high-water mark (measured: 46
MiB idle, 64 MiB with 5,000 connections, still 64 MiB after they closed).
On a node where kap runs inside a 64 MiB request, that matters; ``malloc_trim``
hands the free pages back. It costs a few milliseconds, so kap calls it only
after the number of open connections has dropped a lot (see ``TrimPolicy``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable

import attrs

# Trim once the open connections fell below half their peak, and only when the
# peak was large enough to matter (1,000 connections are about 4 MiB) ...
TRIM_MIN_PEAK = 1000
# ... or after this many connections came and went (churn fragments the heap
# too; a trim costs a few milliseconds, so at most one per 20,000 connections
# while busy), or once nothing is open after at least TRIM_MIN_PEAK came and went.
TRIM_EVERY_ACCEPTED = 20_000


@attrs.define
class TrimPolicy:
    """Pure: decides when a trim is worth it, from the connection counters."""

    peak: int = 0
    accepted_at_trim: int = 0

    def observe(self, active: int, accepted_total: int = 0) -> bool:
        """Feed the current counts; True when memory should be trimmed now."""
        self.peak = max(self.peak, active)
        dropped = self.peak >= TRIM_MIN_PEAK and active * 2 < self.peak
        since = accepted_total - self.accepted_at_trim
        churned = since >= TRIM_EVERY_ACCEPTED and active * 2 < TRIM_MIN_PEAK
        settled = since >= TRIM_MIN_PEAK and active == 0  # a burst of work just ended
        if dropped or churned or settled:
            self.peak = active
            self.accepted_at_trim = accepted_total
            return True
        return False


def release_free_memory() -> bool:
    """Return free heap pages to the OS (glibc only); False where that is not possible."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, looked up once.

    ``ctypes.util.find_library`` forks ``ldconfig -p`` (and more) on each call:
    on the event loop at every trim that would cost far more than the trim.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim
