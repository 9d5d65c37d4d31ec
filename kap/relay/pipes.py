"""The pool of pipes that bulk directions splice through.

A direction holds a pipe only while it has spliced bytes in flight, so an idle
session holds none; a released, empty pipe goes back to the pool for the next
bulk burst (creating one costs three system calls: pipe2 and two fcntl).
"""

from __future__ import annotations

import fcntl
import os
from typing import Final, TypeAlias

# 1 MiB: splice through a pipe enlarged to 1 MiB halves the kernel's copying
# (measured when the pump was designed); the default 64 KiB pipe gives most of that gain
# away. It is also /proc/sys/fs/pipe-max-size's default, the most an
# unprivileged process may ask for.
PIPE_SIZE: Final = 1024 * 1024

# Idle pipes kept for reuse. A pipe is held only while a bulk direction has
# bytes in flight, so a handful covers the bulk streams one node sees at once;
# more would only pin fds (2 each) and pipe buffers.
PIPE_POOL_MAX: Final = 8

# (read fd, write fd, capacity in bytes)
Pipe: TypeAlias = tuple[int, int, int]


class PipePool:
    """Pipes for splice, created on demand and kept (up to ``keep``) for reuse.

    Args:
        min_size: a pipe smaller than this (one read of the pump) is not worth
            splicing through: :meth:`acquire` then returns None.
        size: the capacity asked for each new pipe.
        keep: idle pipes kept open at most.

    ``in_use`` counts pipes handed out and not yet released (for /metrics and
    tests); ``idle`` how many wait in the pool.
    """

    def __init__(self, *, min_size: int, size: int = PIPE_SIZE, keep: int = PIPE_POOL_MAX) -> None:
        self.in_use = 0
        self._min_size = min_size
        self._size = size
        self._keep = keep
        self._idle: list[Pipe] = []

    @property
    def idle(self) -> int:
        return len(self._idle)

    def acquire(self) -> Pipe | None:
        """A pipe, or None when none can be had (out of fds, or only small pipes)."""
        if self._idle:
            pipe = self._idle.pop()
        else:
            try:
                r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                return None  # out of fds: the direction copies instead
            try:
                size = fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, self._size)
            except OSError:
                # EPERM once this user's pipe pages (fs/pipe-user-pages-soft)
                # are used up: keep the default size ...
                size = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
            if size < self._min_size:
                # ... unless that is below one read (past the soft limit new
                # pipes get 2 pages): then splicing costs more calls than copying.
                os.close(r)
                os.close(w)
                return None
            pipe = (r, w, size)
        self.in_use += 1
        return pipe

    def release(self, pipe: Pipe, *, holding: bool) -> None:
        """Give ``pipe`` back; ``holding``: it still has undelivered bytes.

        Undelivered bytes die with their pipe (the session is over); a full
        pool needs no more, so that pipe is closed too.
        """
        self.in_use -= 1
        if holding or len(self._idle) >= self._keep:
            os.close(pipe[0])
            os.close(pipe[1])
        else:
            self._idle.append(pipe)

    def close(self) -> None:
        """Close every idle pipe (the pump stops)."""
        for r, w, _ in self._idle:
            os.close(r)
            os.close(w)
        self._idle.clear()
