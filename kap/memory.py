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

import attrs

# Trim once the open connections fell below half their peak, and only when the
# peak was large enough to matter (1,000 connections are about 4 MiB).
TRIM_MIN_PEAK = 1000


@attrs.define
class TrimPolicy:
    """Pure: decides when a trim is worth it, from the open-connection count."""

    peak: int = 0

    def observe(self, active: int) -> bool:
        """Feed the current count; True when memory should be trimmed now."""
        self.peak = max(self.peak, active)
        if self.peak >= TRIM_MIN_PEAK and active * 2 < self.peak:
            self.peak = active
            return True
        return False


def release_free_memory() -> bool:
    """Return free heap pages to the OS (glibc only); False where that is not possible."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    trim(0)
    return True
