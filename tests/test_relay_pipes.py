"""The pool of splice pipes (kap/relay/pipes.py): sizes, reuse, and what is closed when."""

from __future__ import annotations

import fcntl
import os

from kap.relay.pipes import PipePool

KiB = 1024


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_pipe_is_enlarged_and_reused_once_released() -> None:
    pool = PipePool(min_size=64 * KiB, size=256 * KiB, keep=2)
    before = fd_count()
    pipe = pool.acquire()
    assert pipe is not None
    _, w, size = pipe
    assert size == fcntl.fcntl(w, fcntl.F_GETPIPE_SZ) == 256 * KiB
    assert (pool.in_use, pool.idle, fd_count() - before) == (1, 0, 2)
    pool.release(pipe, holding=False)
    assert (pool.in_use, pool.idle, fd_count() - before) == (0, 1, 2)
    assert pool.acquire() == pipe  # the same fds, no new pipe
    pool.release(pipe, holding=False)
    pool.close()
    assert (pool.idle, fd_count()) == (0, before)


def test_a_pipe_with_bytes_in_it_is_closed_not_pooled() -> None:
    pool = PipePool(min_size=64 * KiB, size=256 * KiB, keep=2)
    before = fd_count()
    pipe = pool.acquire()
    assert pipe is not None
    os.write(pipe[1], b"undelivered")
    pool.release(pipe, holding=True)
    assert (pool.in_use, pool.idle, fd_count()) == (0, 0, before)


def test_the_pool_keeps_at_most_keep_idle_pipes() -> None:
    pool = PipePool(min_size=64 * KiB, size=256 * KiB, keep=2)
    before = fd_count()
    pipes = [pool.acquire() for _ in range(4)]
    assert pool.in_use == 4 and fd_count() - before == 8
    for pipe in pipes:
        assert pipe is not None
        pool.release(pipe, holding=False)
    assert (pool.in_use, pool.idle, fd_count() - before) == (0, 2, 4)
    pool.close()
    assert fd_count() == before


def test_a_pipe_smaller_than_one_read_is_refused() -> None:
    """Splicing through a pipe smaller than one read costs more calls than copying."""
    pool = PipePool(min_size=2 * 1024 * KiB, size=64 * KiB)
    before = fd_count()
    assert pool.acquire() is None
    assert (pool.in_use, pool.idle, fd_count()) == (0, 0, before)
