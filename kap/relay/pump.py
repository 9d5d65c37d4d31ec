"""The byte pump: one task relays the bytes of every proxied connection.

Why one shared pump instead of a task per direction (``../shared/perf-facts.md``):
with a task per direction every event pays a one-shot epoll re-arm, a pass
through trio's run loop, a task switch and a read that finds nothing, 90-120 us
of CPU per request/response, and every connection holds 10-14 KB of task state.
Here one task owns an edge-triggered epoll set for all relayed sockets, wakes
when that set's fd becomes readable, and drains events in batches: a socket is
registered once for its whole life and never re-armed, and an idle connection
costs its two socket fds plus about 1 KB of ``__slots__`` objects. Each
connection's own task (kap/proxy.py) keeps owning the connection's lifetime: it
sleeps in :meth:`Relay.relay` and closes both sockets when that returns or is
cancelled.

The rules that keep the pump honest:

1. Bytes move in order through at most one holding place per direction: a
   ``pending`` remainder that the peer could not take, or a pipe. A direction
   reads only when both are empty, so a slow reader stops its writer
   (backpressure) and user space never holds more than one read per direction.
2. Edge-triggered epoll reports a change once. A direction's ``readable`` flag
   is set by an event and cleared only by EAGAIN or by a short read (a TCP
   receive queue that gave less than asked is empty, and any byte or FIN that
   arrives later raises a new edge); a direction stopped by the budget keeps
   the flag and goes back on the ready list. EPOLLOUT is registered from the
   start and only looked at while the peer-bound direction holds bytes; a
   partial write is retried until EAGAIN, so the next edge is guaranteed.
3. The pump never closes a relayed socket; it forgets both and wakes the
   caller, who closes them (which takes them out of the epoll set; a cancelled
   session is unregistered at once). On an error it sets ``SO_LINGER(1, 0)`` on
   the other socket first so that close() sends RST and the reset reaches the
   other peer. When both ways have ended the last FIN is the caller's close().
5. A connecting upstream (``relay(..., connect_by=...)``) is registered alone;
   its first EPOLLOUT edge without ERR/HUP means connected, and only then is
   the client registered, so no byte is read before there is somewhere to send it.
4. Work per turn is bounded (bytes and steps); past the budget the pump yields to
   trio so health probes with 100 ms timeouts keep their schedule.

Linux only: the pump is built on ``select.epoll``. Without ``os.splice`` every
direction uses ``recv_into``/``send``.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import math
import os
import select
import socket
import struct
from collections.abc import Callable
from typing import Final

import attrs
import outcome
import trio
from loguru import logger

# 256 KiB: perf-facts.md, reads of 256 KiB or more make Python's per-call cost
# negligible for bulk transfers. A read that fills the whole buffer marks a
# direction as bulk, which switches it to splice.
BUFFER_SIZE: Final = 256 * 1024

# 1 MiB: perf-facts.md, splice through a pipe enlarged to 1 MiB halves the
# kernel's copying; the default 64 KiB pipe gives most of that gain away. It is
# also /proc/sys/fs/pipe-max-size's default, the most an unprivileged process
# may ask for.
PIPE_SIZE: Final = 1024 * 1024

# A spliced burst (bytes from taking a pipe until the socket ran dry) shorter
# than this ends bulk mode: the next read copies again, with the short-read
# shortcut that saves a read per message. bench/relay_micro.py bulk, 2 GiB:
# 256 KiB 0.23 CPU s/GB, 64 KiB 0.25, never leaving bulk 0.31 (every burst
# then ends in an EAGAIN and a pipe round trip).
BULK_EXIT_BURST: Final = BUFFER_SIZE

# Idle pipes kept for reuse. A pipe is held only while a bulk direction has
# bytes in flight, so a handful covers the bulk streams one node sees at once;
# more would only pin fds (2 each) and pipe buffers.
PIPE_POOL_MAX: Final = 8

# Fairness and latency budget. One direction moves at most SLICE_BYTES before
# it goes to the back of the ready list; the pump yields to trio after
# TURN_BYTES or TURN_STEPS (events dispatched plus directions pumped). 8 MiB at
# the ~1.2 GB/s the pump reaches (perf-facts.md, 9-10 Gbit/s) is under 10 ms, and
# 512 small-message steps at 10-20 us are about 5-10 ms: far below the 100 ms
# probe timeout, while a yield (~30 us) every few ms costs ~1%.
SLICE_BYTES: Final = 2 * 1024 * 1024
TURN_BYTES: Final = 8 * 1024 * 1024
TURN_STEPS: Final = 512

# Events taken from the kernel per epoll_wait; more wait there for the next call.
MAX_EVENTS: Final = 256

_EPOLL_MASK: Final = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
_READ_EVENTS: Final = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_HANGUP_EVENTS: Final = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_WRITE_EVENTS: Final = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR

# SO_LINGER on, timeout 0: close() discards unsent data and sends RST.
_LINGER_RESET: Final = struct.pack("ii", 1, 0)

_SPLICE_AVAILABLE: Final = hasattr(os, "splice")
_SPLICE_FLAGS: Final = (os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK) if _SPLICE_AVAILABLE else 0
# A socket type or kernel that cannot splice says so before taking any byte.
_SPLICE_UNSUPPORTED: Final = frozenset({errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS})

# How errnos read in RelayResult.error ("upstream reset"). EPIPE is a reset too:
# the kernel reports it for an RST received after the peer's FIN.
_REASONS: Final = {
    errno.ECONNRESET: "reset",
    errno.EPIPE: "reset",
    errno.ECONNABORTED: "reset",
    errno.ETIMEDOUT: "timed out",
    errno.ENOTCONN: "not connected",
    errno.EHOSTUNREACH: "unreachable",
    errno.ENETUNREACH: "unreachable",
}

CLIENT: Final = "client"
UPSTREAM: Final = "upstream"

# RelayResult.error of a connect that did not finish by its ``connect_by``.
CONNECT_TIMEOUT: Final = "connect timed out"


@attrs.frozen
class RelayResult:
    """How one relayed session ended.

    ``bytes_up``/``bytes_down`` count bytes handed to the other side's socket
    (client->upstream and upstream->client). ``error`` is None for a clean close
    both ways, else a short reason such as ``"upstream reset"``; ``errored_side``
    says which socket failed (None for a clean close or a stopped relay).
    ``dial_failed`` is true when the upstream never connected (``relay(...,
    connect_by=...)``): ``error`` is then the connect's reason (``"Connection
    refused"``, :data:`CONNECT_TIMEOUT`) and no byte was relayed.
    """

    bytes_up: int
    bytes_down: int
    error: str | None
    errored_side: str | None
    dial_failed: bool = False


class RelayNotRunningError(RuntimeError):
    """``Relay.relay()`` was called while ``Relay.run()`` is not running."""


def _describe(side: str, err: int | None) -> str:
    if err is None:
        return f"{side} error"
    reason = _REASONS.get(err)
    if reason is None:
        reason = os.strerror(err).lower()
    return f"{side} {reason}"


def _register(epoll: select.epoll, fd: int) -> None:
    """Add ``fd`` to the pump's set; a socket that ended a session without being
    closed (see ``Relay._detach``) is still in it, so modify that registration."""
    try:
        epoll.register(fd, _EPOLL_MASK)
    except FileExistsError:
        epoll.modify(fd, _EPOLL_MASK)


class _Direction:
    """One way of a session: reads ``src``, writes ``dst``."""

    __slots__ = (
        "bulk",
        "burst",
        "count",
        "dialing",
        "done",
        "dst",
        "dst_fd",
        "dst_side",
        "eof",
        "hup",
        "in_pipe",
        "peer",
        "pending",
        "pipe",
        "queued",
        "readable",
        "session",
        "src",
        "src_fd",
        "src_side",
        "up",
    )

    def __init__(
        self, session: _Session, src: socket.socket, dst: socket.socket, fds: tuple[int, int]
    ) -> None:
        self.session = session
        self.src = src
        self.dst = dst
        self.src_fd, self.dst_fd = fds
        up = src is session.client
        self.up = up
        self.src_side = CLIENT if up else UPSTREAM
        self.dst_side = UPSTREAM if up else CLIENT
        self.peer: _Direction = self
        self.readable = False  # an edge said so and no EAGAIN/short read since
        self.hup = False  # a FIN/HUP/ERR edge was seen: read until 0 or EAGAIN
        self.queued = False  # on the pump's ready list
        self.pending: memoryview | None = None  # bytes the peer could not take yet
        self.pipe: tuple[int, int, int] | None = None  # (read fd, write fd, size)
        self.in_pipe = 0  # bytes in the pipe, not yet written to dst
        self.bulk = False  # the last read filled the buffer: splice from now on
        self.burst = 0  # bytes spliced since the pipe was taken
        self.eof = False  # src gave EOF; dst is shut down once the held bytes are out
        self.done = False  # dst has been shut down for writing
        self.count = 0  # bytes written to dst
        self.dialing = False  # src is an upstream still connecting (down only)


class _Session:
    """The pump's state for one relayed connection: about 1 KB with its directions."""

    __slots__ = ("client", "down", "finished", "on_connected", "relay", "task", "up", "upstream")

    def __init__(self, relay: Relay, client: socket.socket, upstream: socket.socket) -> None:
        self.relay = relay
        self.client = client
        self.upstream = upstream
        self.task = trio.lowlevel.current_task()
        self.finished = False
        self.on_connected: Callable[[], object] | None = None
        fds = (client.fileno(), upstream.fileno())
        self.up = _Direction(self, client, upstream, fds)
        self.down = _Direction(self, upstream, client, (fds[1], fds[0]))
        self.up.peer = self.down
        self.down.peer = self.up

    def abort(self, _: object) -> trio.lowlevel.Abort:
        """The caller was cancelled: forget the session before Cancelled is raised.

        A bound method rather than a closure per call: fewer bytes per session.
        """
        self.relay._detach(self, unregister=True)
        return trio.lowlevel.Abort.SUCCEEDED


class Relay:
    """One shared byte pump for every relayed connection.

    Start :meth:`run` in the application's root nursery, then hand each
    connection's two sockets to :meth:`relay` from the connection's own task.
    ``bytes_up``/``bytes_down`` (totals since start) and ``active`` (sessions
    registered) are updated live for /metrics; ``pipes_in_use`` counts pipes
    held by directions with bytes in flight (idle sessions hold none) and
    ``bytes_spliced`` how many of all bytes went through a pipe.
    """

    def __init__(self) -> None:
        self.bytes_up = 0
        self.bytes_down = 0
        self.active = 0
        self.pipes_in_use = 0
        self.bytes_spliced = 0
        self._epoll: select.epoll | None = None
        self._buffer = bytearray(BUFFER_SIZE)
        self._view = memoryview(self._buffer)
        self._by_fd: dict[int, _Direction] = {}  # fd -> the direction reading it
        self._ready: collections.deque[_Direction] = collections.deque()
        self._pipes: list[tuple[int, int, int]] = []
        self._splice = _SPLICE_AVAILABLE
        # Sessions whose upstream is still connecting -> their connect_by.
        self._dialing: dict[_Session, float] = {}
        self._expiry_at = math.inf  # when _expire_dials wakes next
        self._expiry: trio.CancelScope | None = None  # what it sleeps in

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Pump bytes until cancelled.

        Started by the application's root nursery; calls ``task_status.started()``
        once :meth:`relay` may be called.

        Cancellation: every session still open is unregistered and its
        :meth:`relay` call returns a result with ``error="relay stopped"``; the
        pooled pipes and the epoll set are closed.
        """
        if self._epoll is not None:
            raise RuntimeError("Relay.run() is already running")
        epoll = select.epoll()
        self._epoll = epoll
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._expire_dials)
                task_status.started()
                epfd = epoll.fileno()
                ready = self._ready
                while True:
                    if not ready:
                        await trio.lowlevel.wait_readable(epfd)
                    self._turn(epoll)
                    if ready:
                        # Budget spent with work left: let other tasks run first.
                        await trio.lowlevel.checkpoint()
        finally:
            self._stop()

    async def _expire_dials(self) -> None:
        """End the connects that passed their ``connect_by``.

        Sleeps until the earliest deadline it knows of; a dial that finishes
        first is not looked for, so with a constant dial timeout this task wakes
        about once per timeout, not once per connection.
        """
        while True:
            with trio.CancelScope(deadline=self._expiry_at) as self._expiry:
                await trio.sleep_forever()
            self._expiry = None
            now = trio.current_time()
            earliest = math.inf
            for session, deadline in list(self._dialing.items()):
                if deadline <= now:
                    self._finish(session, CONNECT_TIMEOUT, UPSTREAM, dial_failed=True)
                elif deadline < earliest:
                    earliest = deadline
            self._expiry_at = earliest

    async def relay(
        self,
        client: socket.socket,
        upstream: socket.socket,
        *,
        connect_by: float | None = None,
        on_connected: Callable[[], object] | None = None,
    ) -> RelayResult:
        """Relay bytes between two connected sockets until the session is over.

        Args:
            client, upstream: connected stdlib stream sockets; made non-blocking
                if they are not. The caller keeps owning them and closes both
                after this returns or raises.
            connect_by: ``upstream`` is still connecting (a non-blocking
                ``connect()`` said EINPROGRESS): the pump waits for it in its
                own epoll set, so the caller sleeps once for the dial and the
                relay. If it has not connected by this time (trio's clock), or
                fails, the call returns with ``dial_failed`` set and the
                client socket untouched, ready for the next upstream.
            on_connected: called (by the pump) once ``upstream`` is connected,
                before any byte moves; at once without ``connect_by``.

        Returns:
            A :class:`RelayResult`. Half-close propagates: EOF from one side
            shuts down the other socket for writing while the other direction
            keeps flowing; the call returns when both directions have ended.

        Error handling:
            An error on either socket (reset, timeout, ...) ends the session at
            once: ``SO_LINGER(1, 0)`` is set on the other socket so the caller's
            close() resets that peer too, and the result names the failed side.
            If :meth:`run` stops, open sessions return ``error="relay stopped"``.

        Raises:
            RelayNotRunningError: :meth:`run` is not running.

        Cancellation:
            Both sockets are unregistered synchronously and any pipe is released
            before ``trio.Cancelled`` propagates; the sockets stay open for the
            caller to close.
        """
        epoll = self._epoll
        if epoll is None:
            await trio.lowlevel.checkpoint()
            raise RelayNotRunningError("Relay.run() is not running")
        for sock in (client, upstream):
            if sock.gettimeout() != 0.0:
                sock.setblocking(False)
        session = _Session(self, client, upstream)
        up, down = session.up, session.down
        if connect_by is not None:
            # Only the upstream until it connects: its EPOLLOUT edge says so
            # (_on_connect), and the client is registered then.
            _register(epoll, down.src_fd)
            down.dialing = True
            session.on_connected = on_connected
            on_connected = None  # this frame sleeps as long as the session: hold nothing
            self._by_fd[down.src_fd] = down
            self._dialing[session] = connect_by
            if connect_by < self._expiry_at:
                self._expiry_at = connect_by
                if self._expiry is not None:
                    self._expiry.deadline = connect_by
        else:
            if on_connected is not None:
                on_connected()
            _register(epoll, up.src_fd)
            try:
                _register(epoll, down.src_fd)
            except BaseException:
                epoll.unregister(up.src_fd)
                raise
            # Registration reports whatever is already readable (edge-triggered
            # epoll checks readiness on EPOLL_CTL_ADD), so nothing is pumped here.
            self._by_fd[up.src_fd] = up
            self._by_fd[down.src_fd] = down
        self.active += 1
        result: RelayResult = await trio.lowlevel.wait_task_rescheduled(session.abort)
        return result

    # -- the pump ---------------------------------------------------------

    def _turn(self, epoll: select.epoll) -> None:
        """Take events and pump ready directions until idle or the budget is spent."""
        poll = epoll.poll
        dispatch = self._dispatch
        pump = self._pump
        ready = self._ready
        steps = 0
        moved = 0
        while True:
            events = poll(0, MAX_EVENTS)
            for fd, mask in events:
                dispatch(fd, mask)
            steps += len(events)
            if not ready:
                if not events:
                    return
                if steps >= TURN_STEPS:
                    return
                continue
            while ready:
                d = ready.popleft()  # never of a finished session: see _detach
                d.queued = False
                session = d.session
                try:
                    moved += pump(d)
                except Exception as e:
                    # A bug or a caller breaking the contract (e.g. closing a
                    # socket mid-session) ends that session, never the pump.
                    logger.opt(exception=e).error("relay session failed")
                    self._finish(session, f"relay error: {e!r}", None)
                steps += 1
                if steps >= TURN_STEPS or moved >= TURN_BYTES:
                    return

    def _dispatch(self, fd: int, mask: int) -> None:
        d = self._by_fd.get(fd)
        if d is None:
            return  # the session ended earlier in this batch
        if d.dialing and not self._on_connect(d, mask):
            return
        if mask & select.EPOLLERR:
            # An error with nobody reading or writing this socket (e.g. an RST
            # after the peer's FIN while the other side is idle) must still end
            # the session now, so look at it here.
            err: int | None
            try:
                err = d.src.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            except OSError as e:
                err = e.errno or errno.EBADF
            if err:
                self._fail(d.session, d.src_side, err)
                return
        if mask & _READ_EVENTS and not d.eof:
            if mask & _HANGUP_EVENTS:
                d.hup = True
            d.readable = True
            if not d.queued:
                d.queued = True
                self._ready.append(d)
        if mask & _WRITE_EVENTS:
            p = d.peer  # the direction that writes to this fd
            if (p.pending is not None or p.in_pipe) and not p.queued:
                p.queued = True
                self._ready.append(p)

    def _on_connect(self, d: _Direction, mask: int) -> bool:
        """An event on a connecting upstream: True once it is connected."""
        session = d.session
        if mask & (select.EPOLLERR | select.EPOLLHUP):
            # A failed connect reports ERR|HUP (never OUT: the kernel shuts
            # both ways of a reset socket); a clean OUT needs no SO_ERROR call.
            try:
                err = d.src.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            except OSError as e:
                err = e.errno or errno.EBADF
            why = os.strerror(err) if err else "connection closed"
            self._finish(session, why, UPSTREAM, dial_failed=True)
            return False
        if not mask & select.EPOLLOUT:
            return False  # not connected yet
        d.dialing = False
        del self._dialing[session]
        on_connected, session.on_connected = session.on_connected, None
        try:
            if on_connected is not None:
                on_connected()
            _register(self._epoll, d.dst_fd)  # type: ignore[arg-type]
        except Exception as e:
            logger.opt(exception=e).error("relay session failed")
            self._finish(session, f"relay error: {e!r}", None)
            return False
        self._by_fd[d.dst_fd] = d.peer
        return True

    def _pump(self, d: _Direction) -> int:
        """Move bytes for one direction; returns how many were read."""
        moved = 0
        dst = d.dst
        while True:
            # 1. Deliver what is held; read nothing more until it is out.
            pending = d.pending
            if pending is not None:
                try:
                    n = dst.send(pending)
                except BlockingIOError:
                    return moved  # EPOLLOUT on dst re-queues us
                except InterruptedError:
                    continue
                except OSError as e:
                    self._fail(d.session, d.dst_side, e.errno)
                    return moved
                self._count(d, n)
                # Retry a partial send until EAGAIN: only EAGAIN guarantees an edge.
                d.pending = pending[n:] if n < len(pending) else None
                continue
            if d.in_pipe:
                assert d.pipe is not None
                try:
                    n = os.splice(d.pipe[0], d.dst_fd, d.in_pipe, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    return moved
                except InterruptedError:
                    continue
                except OSError as e:
                    self._fail(d.session, d.dst_side, e.errno)
                    return moved
                d.in_pipe -= n
                self._count(d, n)
                continue

            # 2. Nothing held: end the direction, stop, or read.
            if d.eof:
                self._release_pipe(d)
                if d.peer.done:
                    # Both ways ended: the caller's close() sends this FIN
                    # (nothing is left unread), one shutdown() call fewer.
                    d.done = True
                    self._finish(d.session, None, None)
                    return moved
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError as e:
                    self._fail(d.session, d.dst_side, e.errno)
                    return moved
                d.done = True
                return moved
            if not d.readable:
                if d.pipe is not None:
                    self._release_pipe(d)
                return moved
            if moved >= SLICE_BYTES:
                d.queued = True
                self._ready.append(d)
                return moved

            # 3. Read.
            if d.bulk:
                if d.pipe is None:
                    d.pipe = self._acquire_pipe()
                    d.burst = 0
                    if d.pipe is None:
                        d.bulk = False  # no pipe to be had: copy instead
                        continue
                try:
                    n = os.splice(d.src_fd, d.pipe[1], d.pipe[2], flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    d.readable = False
                    if d.burst < BULK_EXIT_BURST:
                        d.bulk = False  # a short burst: back to recv_into
                    continue
                except InterruptedError:
                    continue
                except OSError as e:
                    if e.errno in _SPLICE_UNSUPPORTED:
                        # Nothing was taken from the socket: copy from now on.
                        self._splice = d.bulk = False
                        continue
                    self._fail(d.session, d.src_side, e.errno)
                    return moved
                if n == 0:
                    d.eof = True
                    d.readable = False
                    continue
                d.in_pipe = n
                d.burst += n
                moved += n
                self.bytes_spliced += n
                continue

            try:
                n = d.src.recv_into(self._buffer)
            except BlockingIOError:
                d.readable = False
                continue
            except InterruptedError:
                continue
            except OSError as e:
                self._fail(d.session, d.src_side, e.errno)
                return moved
            if n == 0:
                d.eof = True
                d.readable = False
                continue
            moved += n
            data = self._view[:n] if n < BUFFER_SIZE else self._view
            try:
                sent = dst.send(data)
            except BlockingIOError:
                sent = 0
            except InterruptedError:
                sent = 0
            except OSError as e:
                self._fail(d.session, d.dst_side, e.errno)
                return moved
            # _count() inlined: this is the per-message path.
            d.count += sent
            if d.up:
                self.bytes_up += sent
            else:
                self.bytes_down += sent
            if sent < n:
                # Copy out only the remainder; the shared buffer is reused next read.
                d.pending = memoryview(self._buffer[sent:n])
                continue
            if n == BUFFER_SIZE:
                d.bulk = self._splice
            elif not d.hup:
                d.readable = False  # short read: the receive queue is empty

    def _count(self, d: _Direction, n: int) -> None:
        d.count += n
        if d.up:
            self.bytes_up += n
        else:
            self.bytes_down += n

    # -- pipes --------------------------------------------------------------

    def _acquire_pipe(self) -> tuple[int, int, int] | None:
        if self._pipes:
            pipe = self._pipes.pop()
        else:
            try:
                r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                return None  # out of fds: the direction copies instead
            try:
                size = fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                # EPERM once this user's pipe pages (fs/pipe-user-pages-soft)
                # are used up: keep the default size ...
                size = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
            if size < BUFFER_SIZE:
                # ... unless that is below one read (past the soft limit new
                # pipes get 2 pages): then splicing costs more calls than copying.
                os.close(r)
                os.close(w)
                return None
            pipe = (r, w, size)
        self.pipes_in_use += 1
        return pipe

    def _release_pipe(self, d: _Direction) -> None:
        pipe = d.pipe
        if pipe is None:
            return
        d.pipe = None
        self.pipes_in_use -= 1
        if d.in_pipe or len(self._pipes) >= PIPE_POOL_MAX:
            # Undelivered bytes die with the pipe; a full pool needs no more.
            d.in_pipe = 0
            os.close(pipe[0])
            os.close(pipe[1])
        else:
            self._pipes.append(pipe)

    # -- session ends -------------------------------------------------------

    def _fail(self, session: _Session, side: str, err: int | None) -> None:
        other = session.upstream if side == CLIENT else session.client
        # The other socket may itself be dead already; then there is nobody
        # left to reset and the caller's close() is all that is needed.
        with contextlib.suppress(OSError):
            other.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        self._finish(session, _describe(side, err), side)

    def _finish(
        self, session: _Session, error: str | None, side: str | None, *, dial_failed: bool = False
    ) -> None:
        if session.finished:
            return
        self._detach(session, unregister=False)
        result = RelayResult(session.up.count, session.down.count, error, side, dial_failed)
        trio.lowlevel.reschedule(session.task, outcome.Value(result))

    def _detach(self, session: _Session, *, unregister: bool) -> None:
        """Forget a session and give back its pipes; ``unregister`` its sockets too.

        A session that ended by itself leaves its sockets in the epoll set:
        the caller closes them next, and closing a socket removes it (two
        epoll_ctl calls fewer per connection); events until then find no
        session in ``_by_fd`` and are dropped. A cancelled session is
        unregistered at once, since its caller may keep the sockets a while.
        """
        if session.finished:
            return
        session.finished = True
        self.active -= 1
        epoll = self._epoll if unregister else None
        down = session.down
        if down.dialing:
            del self._dialing[session]
        # A session still connecting has only the upstream registered.
        for d in (down,) if down.dialing else (session.up, down):
            self._by_fd.pop(d.src_fd, None)
            if epoll is not None:
                # ENOENT/EBADF if the caller closed a socket while relaying:
                # its registration is gone with it.
                with contextlib.suppress(OSError):
                    epoll.unregister(d.src_fd)
        for d in (session.up, down):
            self._release_pipe(d)
            d.pending = None
            if d.queued:
                d.queued = False
                self._ready.remove(d)
            # Break the session <-> direction cycles, so the session, its
            # sockets and the caller's objects go by reference counting rather
            # than by the cyclic GC (measured: ~10 objects per connection).
            d.session = d.peer = None  # type: ignore[assignment]

    def _stop(self) -> None:
        sessions = {d.session for d in self._by_fd.values()}
        for session in sessions:
            self._finish(session, "relay stopped", None)
        self._ready.clear()
        for r, w, _ in self._pipes:
            os.close(r)
            os.close(w)
        self._pipes.clear()
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
