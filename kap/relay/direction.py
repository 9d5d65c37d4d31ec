"""One relayed session and its two directions: how bytes move one way.

A :class:`Session` is the pump's state for one connection; its two
:class:`Direction` objects each read one socket and write the other. This
module moves bytes and ends sessions; it knows the pump that runs it only as a
:class:`Host` (the shared buffer, the pipe pool, the counters, the ready list
and ``detach``), so it does not import kap/relay/pump.py.

A direction's state is three named values, ``phase``, ``edge`` and ``mode``
(kap/relay/states.py holds them and the rules they keep).
Besides those, ``queued`` says the direction is on the pump's ready list, and
``pending``/``pipe``/``in_pipe`` hold what the destination could not take yet.
``watch`` is the passive first-byte check's one flag on the read path (set
only when the pump has an answer budget): on the up direction, "the client's
first read starts the wait for an answer"; on the down direction, "the first
read is the answer". A direction's first read is always a copy, so the splice
path needs no check.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
from collections import deque
from typing import Any, Final, Protocol

import outcome
import trio

from kap.relay.outcome import (
    Ending,
    Outcome,
    Relayed,
    RelayResult,
    Side,
    describe,
)
from kap.relay.pipes import Pipe, PipePool
from kap.relay.states import (
    COPY,
    DONE,
    EOF,
    IDLE,
    OPEN,
    READABLE,
    SPLICE,
    Edge,
    Mode,
    Phase,
)

# 256 KiB: reads of 256 KiB or more make Python's per-call cost negligible for
# bulk transfers (measured when the pump was designed). A read that fills the
# whole buffer marks a direction as bulk, which switches it to splice.
BUFFER_SIZE: Final = 256 * 1024

# A spliced burst (bytes from taking a pipe until the socket ran dry) shorter
# than this ends bulk mode: the next read copies again, with the short-read
# shortcut that saves a read per message. bench/relay_micro.py bulk, 2 GiB:
# 256 KiB 0.23 CPU s/GB, 64 KiB 0.25, never leaving bulk 0.31 (every burst
# then ends in an EAGAIN and a pipe round trip).
BULK_EXIT_BURST: Final = BUFFER_SIZE

# One direction moves at most this many bytes before it goes to the back of the
# pump's ready list (fairness between bulk streams; see pump.TURN_BYTES).
SLICE_BYTES: Final = 2 * 1024 * 1024

SPLICE_AVAILABLE: Final = hasattr(os, "splice")
_SPLICE_FLAGS: Final = (os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK) if SPLICE_AVAILABLE else 0
# A socket type or kernel that cannot splice says so before taking any byte.
_SPLICE_UNSUPPORTED: Final = frozenset({errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS})

# SO_LINGER on, timeout 0: close() discards unsent data and sends RST.
_LINGER_RESET: Final = struct.pack("ii", 1, 0)


# Which system call a step of Direction.pump made, for its one error handler;
# the reads of src come last (op >= _RECV).
_SEND: Final = 0  # a write of held bytes (pending or pipe) to dst
_SEND_READ: Final = 1  # the write of what was just read into the shared buffer
_SHUTDOWN: Final = 2  # passing a FIN on to dst
_RECV: Final = 3  # a read from src into the shared buffer
_SPLICE_IN: Final = 4  # a splice from src into the direction's pipe


class Host(Protocol):
    """What a session needs of the pump that runs it."""

    buffer: bytearray  # the one read buffer, BUFFER_SIZE bytes
    view: memoryview  # of ``buffer``
    pipes: PipePool
    splice: bool  # bulk directions may splice
    bytes_up: int
    bytes_down: int
    bytes_spliced: int
    ready: deque[Direction]  # directions with work, pumped in order

    def detach(self, session: Session, *, unregister: bool) -> None:
        """Forget ``session`` (see ``Sessions.detach``, kap/relay/sessions.py)."""

    def expect_answer(self, session: Session) -> None:
        """``session``'s client sent its first bytes; its upstream has sent nothing."""

    def answered(self, session: Session) -> None:
        """``session``'s upstream sent its first bytes."""


class Direction:
    """One way of a session: reads ``src``, writes ``dst``."""

    __slots__ = (
        "burst",
        "count",
        "dst",
        "dst_fd",
        "edge",
        "in_pipe",
        "mode",
        "peer",
        "pending",
        "phase",
        "pipe",
        "queued",
        "session",
        "src",
        "src_fd",
        "up",
        "watch",
    )

    def __init__(
        self, session: Session, src: socket.socket, dst: socket.socket, fds: tuple[int, int]
    ) -> None:
        self.session = session
        self.src = src
        self.dst = dst
        self.src_fd, self.dst_fd = fds
        self.up = src is session.client  # client -> upstream
        self.peer: Direction = self
        self.phase: Phase = OPEN
        self.edge: Edge = IDLE
        self.mode: Mode = COPY
        self.queued = False  # on the pump's ready list
        self.pending: memoryview | None = None  # bytes dst could not take yet
        self.pipe: Pipe | None = None
        self.in_pipe = 0  # bytes in the pipe, not yet written to dst
        self.burst = 0  # bytes spliced since the pipe was taken
        self.count = 0  # bytes written to dst
        self.watch = False  # the first read matters to the first-byte check

    @property
    def src_side(self) -> Side:
        return Side.CLIENT if self.up else Side.UPSTREAM

    @property
    def dst_side(self) -> Side:
        return Side.UPSTREAM if self.up else Side.CLIENT

    def pump(self, host: Host) -> int:
        """Move bytes until this direction must wait; returns how many were read.

        Three steps, in a loop: deliver what is held; with nothing held, end,
        stop or go on; read (copy or splice). Every system call of a step runs
        inside one ``try`` whose one handler reads the kernel's answer, told by
        ``op`` which call it was: EAGAIN ends a write (the next EPOLLOUT edge
        re-queues the direction) or clears ``edge`` after a read; any other
        error fails the session on the side that call touched. EINTR never
        shows: Python retries an interrupted call itself (PEP 475).

        Longer than most functions on purpose: it is the per-message path,
        and every call it does not make is CPU the relay does not spend (a
        helper function per system call measured 5-10% more CPU per small
        request, bench/relay_micro.py rr).
        """
        moved = 0
        n = 0
        op = _SEND
        dst = self.dst
        while True:
            try:
                # 1. Deliver what is held; read nothing more until it is out.
                pending = self.pending
                if pending is not None:
                    op = _SEND
                    n = dst.send(pending)
                    self._count(host, n)
                    # Retry a partial send until EAGAIN: only EAGAIN guarantees an edge.
                    self.pending = pending[n:] if n < len(pending) else None
                    continue
                if self.in_pipe:
                    assert self.pipe is not None
                    op = _SEND
                    n = os.splice(self.pipe[0], self.dst_fd, self.in_pipe, flags=_SPLICE_FLAGS)
                    self.in_pipe -= n
                    self._count(host, n)
                    continue

                # 2. Nothing held: end the direction, stop, or read.
                if self.phase is not OPEN:
                    self.release_pipe(host.pipes)
                    if self.peer.phase is DONE:
                        # Both ways ended: the caller's close() sends this FIN
                        # (nothing is left unread), one shutdown() call fewer.
                        self.phase = DONE
                        self.session.finish()
                        return moved
                    op = _SHUTDOWN
                    dst.shutdown(socket.SHUT_WR)
                    self.phase = DONE
                    return moved
                if self.edge is IDLE:
                    if self.pipe is not None:
                        self.release_pipe(host.pipes)
                    return moved
                if moved >= SLICE_BYTES:
                    self.queued = True
                    host.ready.append(self)
                    return moved

                # 3. Read.
                if self.mode is SPLICE:
                    pipe = self.pipe
                    if pipe is None:
                        pipe = self.pipe = host.pipes.acquire()
                        self.burst = 0
                        if pipe is None:
                            self.mode = COPY  # no pipe to be had: copy instead
                            continue
                    op = _SPLICE_IN
                    n = os.splice(self.src_fd, pipe[1], pipe[2], flags=_SPLICE_FLAGS)
                    if n == 0:
                        self.phase = EOF
                        self.edge = IDLE
                        continue
                    self.in_pipe = n
                    self.burst += n
                    moved += n
                    host.bytes_spliced += n
                    continue

                op = _RECV
                n = self.src.recv_into(host.buffer)
                if n == 0:
                    self.phase = EOF
                    self.edge = IDLE
                    continue
                moved += n
                if self.watch:
                    self.session.first_read(self.up)
                op = _SEND_READ
                sent = dst.send(host.view[:n] if n < BUFFER_SIZE else host.view)
                # _count() inlined: this is the per-message path.
                self.count += sent
                if self.up:
                    host.bytes_up += sent
                else:
                    host.bytes_down += sent
                if sent < n:
                    # Copy out only the remainder; the shared buffer is reused next read.
                    self.pending = memoryview(host.buffer[sent:n])
                    continue
                if n == BUFFER_SIZE:
                    if host.splice:
                        self.mode = SPLICE
                elif self.edge is READABLE:
                    self.edge = IDLE  # short read: the receive queue is empty
            except BlockingIOError:
                if op == _SEND:
                    return moved  # EPOLLOUT on dst re-queues us
                if op == _SEND_READ:
                    # Nothing of this read went out: hold all of it.
                    self.pending = memoryview(host.buffer[:n])
                    continue
                self.edge = IDLE
                if op == _SPLICE_IN and self.burst < BULK_EXIT_BURST:
                    self.mode = COPY  # a short burst: back to recv_into
            except OSError as e:
                if op == _SPLICE_IN and e.errno in _SPLICE_UNSUPPORTED:
                    # Nothing was taken from the socket: copy from now on.
                    host.splice = False
                    self.mode = COPY
                    continue
                side = self.src_side if op >= _RECV else self.dst_side  # reads are last
                self.session.fail(side, e.errno)
                return moved

    def _count(self, host: Host, n: int) -> None:
        self.count += n
        if self.up:
            host.bytes_up += n
        else:
            host.bytes_down += n

    def release_pipe(self, pipes: PipePool) -> None:
        """Give the pipe back; bytes still in it are dropped with it."""
        pipe = self.pipe
        if pipe is None:
            return
        self.pipe = None
        pipes.release(pipe, holding=self.in_pipe > 0)
        self.in_pipe = 0


class Session:
    """The pump's state for one relayed connection: about 1 KB with its directions.

    ``dial`` is the session's entry in the pump's heap of dial deadlines while
    its upstream connects (``[deadline, sequence, session]``; the pump clears
    the last item when the dial is over, so the heap keeps no session alive);
    ``connected_at`` is when the upstream connected. ``answer`` is its entry
    in the heap of answer deadlines while the client waits for the upstream's
    first byte, ``tag`` what the caller gave ``Relay.relay`` to name it by.
    """

    __slots__ = (
        "answer",
        "client",
        "connected_at",
        "dial",
        "down",
        "finished",
        "host",
        "tag",
        "task",
        "up",
        "upstream",
    )

    def __init__(
        self, host: Host, client: socket.socket, upstream: socket.socket, tag: object = None
    ) -> None:
        self.host = host
        self.tag = tag
        self.client = client
        self.upstream = upstream
        self.task = trio.lowlevel.current_task()
        self.finished = False
        self.dial: list[Any] | None = None
        self.answer: list[Any] | None = None
        self.connected_at: float | None = None
        fds = (client.fileno(), upstream.fileno())
        self.up = Direction(self, client, upstream, fds)
        self.down = Direction(self, upstream, client, (fds[1], fds[0]))
        self.up.peer = self.down
        self.down.peer = self.up

    def abort(self, _: object) -> trio.lowlevel.Abort:
        """The caller was cancelled: forget the session before Cancelled is raised.

        A bound method rather than a closure per call: fewer bytes per session.
        """
        self.host.detach(self, unregister=True)
        return trio.lowlevel.Abort.SUCCEEDED

    def first_read(self, up: bool) -> None:
        """A watched direction read its first bytes (see ``Direction.watch``)."""
        if up:
            self.up.watch = False
            self.host.expect_answer(self)
        else:
            self.up.watch = self.down.watch = False
            self.host.answered(self)

    def fail(self, side: Side, err: int | None) -> None:
        """``side``'s socket failed: reset the other peer too, and end."""
        other = self.upstream if side is Side.CLIENT else self.client
        # The other socket may itself be dead already; then there is nobody
        # left to reset and the caller's close() is all that is needed.
        with contextlib.suppress(OSError):
            other.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        self.finish(Ending.FAILED, side, describe(side, err))

    def finish(
        self, ending: Ending = Ending.CLOSED, side: Side | None = None, error: str | None = None
    ) -> None:
        """End a session that reached the relay; wake its caller with the result."""
        result = RelayResult(self.up.count, self.down.count, ending, side, error)
        self.end(Relayed(result, self.connected_at))

    def end(self, result: Outcome) -> None:
        """Detach the session and wake its caller with ``result`` (once)."""
        if self.finished:
            return
        self.host.detach(self, unregister=False)
        trio.lowlevel.reschedule(self.task, outcome.Value(result))
