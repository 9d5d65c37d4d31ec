"""The byte pump: one task relays the bytes of every proxied connection.

Why one shared pump instead of a task per direction (measured when the pump
was designed; bench/relay_micro.py compares designs of the pump): with a task
per direction every event pays a one-shot epoll re-arm, a pass through trio's
run loop, a task switch and a read that finds nothing, 90-120 us of CPU per
request/response, and every connection holds 10-14 KB of task state. Here one
task owns an edge-triggered epoll set for all relayed sockets, wakes when that
set's fd becomes readable, and drains events in batches: a socket is
registered once for its whole life and never re-armed, and an idle connection
costs its two socket fds plus about 1 KB of ``__slots__`` objects. Each
connection's own task (kap/proxy.py) keeps owning the connection's lifetime:
it sleeps in :meth:`Relay.relay` and closes both sockets when that returns or
is cancelled.

The rules that keep the pump honest:

1. Bytes move in order through at most one holding place per direction: a
   ``pending`` remainder that the peer could not take, or a pipe. A direction
   reads only when both are empty, so a slow reader stops its writer
   (backpressure) and user space never holds more than one read per direction.
2. Edge-triggered epoll reports a change once. A direction's ``edge`` is set by
   an event and cleared only by EAGAIN or by a short read (kap/relay/direction.py);
   a direction stopped by the budget keeps it and goes back on the ready list.
   EPOLLOUT is registered from the start and only looked at while the
   peer-bound direction holds bytes; a partial write is retried until EAGAIN,
   so the next edge is guaranteed.
3. The pump never closes a relayed socket; it forgets both and wakes the
   caller, who closes them (which takes them out of the epoll set; a cancelled
   session is unregistered at once). On an error it sets ``SO_LINGER(1, 0)`` on
   the other socket first so that close() sends RST and the reset reaches the
   other peer. When both ways have ended the last FIN is the caller's close().
   Which socket is whose, and registering and forgetting sessions, is the
   book kept in kap/relay/sessions.py.
4. A connecting upstream (``relay(..., connect_by=...)``) is registered alone;
   its first EPOLLOUT edge without ERR/HUP means connected, and only then is
   the client registered, so no byte is read before there is somewhere to send
   it. Dial deadlines wait in a heap (kap/relay/dials.py); one task sleeps
   until the earliest.
5. Work per turn is bounded (bytes and steps); past the budget the pump yields to
   trio so health probes with 100 ms timeouts keep their schedule.
6. The pump calls nobody back: what happened comes back to the caller as the
   return value of :meth:`Relay.relay` (kap/relay/outcome.py). The one thing
   worth knowing while a session goes on, an upstream that left a client's
   first bytes unanswered past the budget, waits in a batch for the caller's
   own task (:meth:`Relay.unanswered`).

Linux only: the pump is built on ``select.epoll``. Without ``os.splice`` every
direction uses ``recv_into``/``send``.
"""

from __future__ import annotations

import collections
import errno
import os
import select
import socket
from typing import Final

import trio
from loguru import logger

from kap.relay.direction import BUFFER_SIZE, SPLICE_AVAILABLE, Direction, Session
from kap.relay.outcome import (
    DialFailed,
    DialFailure,
    Ending,
    Outcome,
    RelayNotRunningError,
    Unanswered,
)
from kap.relay.pipes import PipePool
from kap.relay.sessions import Sessions
from kap.relay.states import DIALING, HANGUP, IDLE, OPEN, READABLE

# Fairness and latency budget: the pump yields to trio after TURN_BYTES or
# TURN_STEPS (events dispatched plus directions pumped; one direction moves at
# most direction.SLICE_BYTES per step). 8 MiB at the ~1.2 GB/s the pump
# reaches (9-10 Gbit/s, measured in bulk) is under 10 ms, and 512
# small-message steps at 10-20 us are about 5-10 ms: far below the 100 ms probe
# timeout, while a yield (~30 us) every few ms costs ~1%.
TURN_BYTES: Final = 8 * 1024 * 1024
TURN_STEPS: Final = 512

# Events taken from the kernel per epoll_wait; more wait there for the next call.
MAX_EVENTS: Final = 256

_READ_EVENTS: Final = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_HANGUP_EVENTS: Final = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_WRITE_EVENTS: Final = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR


def _socket_error(sock: socket.socket) -> int:
    """The pending error of ``sock`` (SO_ERROR), 0 for none."""
    try:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    except OSError as e:
        return e.errno or errno.EBADF


class Relay:
    """One shared byte pump for every relayed connection.

    Start :meth:`run` in the application's root nursery, then hand each
    connection's two sockets to :meth:`relay` from the connection's own task.
    ``bytes_up``/``bytes_down`` (totals since start), ``active`` (sessions
    registered) and ``dialing`` (of those, upstreams still connecting) are
    updated live for /metrics; ``pipes.in_use`` counts pipes held by
    directions with bytes in flight (idle sessions hold none) and
    ``bytes_spliced`` how many of all bytes went through a pipe.

    Args:
        splice: let bulk directions splice (the default where ``os.splice``
            exists); off, every byte is copied through the shared buffer.
        answer_budget: seconds an upstream has to send its first byte once
            the client's first bytes reached it (the passive first-byte
            check; see :meth:`unanswered`); None, no check.
    """

    def __init__(
        self, *, splice: bool = SPLICE_AVAILABLE, answer_budget: float | None = None
    ) -> None:
        self.bytes_up = 0
        self.bytes_down = 0
        self.bytes_spliced = 0
        self.splice = splice
        self.buffer = bytearray(BUFFER_SIZE)
        self.view = memoryview(self.buffer)
        self.pipes = PipePool(min_size=BUFFER_SIZE)
        self.ready: collections.deque[Direction] = collections.deque()
        self._epoll: select.epoll | None = None
        self._sessions = Sessions(self.ready, self.pipes, answer_budget)
        self._by_fd = self._sessions.by_fd  # fd -> the direction reading it
        self._answers = self._sessions.answers
        # Sessions are the pump's business; they see it as a direction.Host.
        self.expect_answer = self._sessions.expect_answer
        self.answered = self._sessions.answered
        self.detach = self._sessions.detach

    @property
    def active(self) -> int:
        return self._sessions.active

    @property
    def dialing(self) -> int:
        return self._sessions.dials.count

    @property
    def answer_budget(self) -> float | None:
        return None if self._answers is None else self._answers.budget

    @property
    def awaiting_answer(self) -> int:
        """Sessions whose client spoke and whose upstream has not answered, within the budget."""
        return 0 if self._answers is None else self._answers.count

    async def unanswered(self) -> list[Unanswered]:
        """Wait for sessions whose upstream left the client's first bytes unanswered.

        Returns every such session since the last call (at least one), each
        once, named by the ``tag`` given to :meth:`relay`. The sessions go on:
        only their caller ends them. One task should take these while
        :meth:`run` runs; the pump holds at most ``dials.UNANSWERED_HELD``.
        Without an ``answer_budget`` this waits forever.
        """
        if self._answers is None:
            await trio.sleep_forever()
        assert self._answers is not None
        return await self._answers.take()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Pump bytes until cancelled.

        Started by the application's root nursery; calls ``task_status.started()``
        once :meth:`relay` may be called.

        Cancellation: every session still open is unregistered and its
        :meth:`relay` call returns with ``Ending.STOPPED``; the pooled pipes
        and the epoll set are closed.
        """
        if self._epoll is not None:
            raise RuntimeError("Relay.run() is already running")
        epoll = select.epoll()
        self._epoll = self._sessions.epoll = epoll
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._sessions.dials.run)
                if self._answers is not None:
                    nursery.start_soon(self._answers.run)
                task_status.started()
                epfd = epoll.fileno()
                ready = self.ready
                while True:
                    if not ready:
                        await trio.lowlevel.wait_readable(epfd)
                    self._turn(epoll)
                    if ready:
                        # Budget spent with work left: let other tasks run first.
                        await trio.lowlevel.checkpoint()
        finally:
            self._stop()

    async def relay(
        self,
        client: socket.socket,
        upstream: socket.socket,
        *,
        connect_by: float | None = None,
        tag: object = None,
    ) -> Outcome:
        """Relay bytes between two connected sockets until the session is over.

        Args:
            client, upstream: connected stdlib stream sockets; made non-blocking
                if they are not. The caller keeps owning them and closes both
                after this returns or raises.
            connect_by: ``upstream`` is still connecting (a non-blocking
                ``connect()`` said EINPROGRESS): the pump waits for it in its
                own epoll set, so the caller sleeps once for the dial and the
                relay. If it has not connected by this time (trio's clock), or
                fails, the call returns :class:`DialFailed` with the client
                socket untouched, ready for the next upstream.
            tag: names the session in what :meth:`unanswered` returns.

        Returns:
            :class:`DialFailed`, or :class:`Relayed` with a ``RelayResult``.
            Half-close propagates: EOF from one side shuts down the other
            socket for writing while the other direction keeps flowing; the
            call returns when both directions have ended.

        Error handling:
            An error on either socket (reset, timeout, ...) ends the session at
            once: ``SO_LINGER(1, 0)`` is set on the other socket so the caller's
            close() resets that peer too, and the result names the failed side.
            If :meth:`run` stops, open sessions end with ``Ending.STOPPED``.

        Raises:
            RelayNotRunningError: :meth:`run` is not running.

        Cancellation:
            Both sockets are unregistered synchronously and any pipe is released
            before ``trio.Cancelled`` propagates; the sockets stay open for the
            caller to close.
        """
        if self._epoll is None:
            await trio.lowlevel.checkpoint()
            raise RelayNotRunningError("Relay.run() is not running")
        for sock in (client, upstream):
            if sock.gettimeout() != 0.0:
                sock.setblocking(False)
        session = Session(self, client, upstream, tag)
        self._sessions.add(session, connect_by)
        result: Outcome = await trio.lowlevel.wait_task_rescheduled(session.abort)
        return result

    # -- the pump ---------------------------------------------------------

    def _turn(self, epoll: select.epoll) -> None:
        """Take events and pump ready directions until idle or the budget is spent."""
        poll = epoll.poll
        dispatch = self._dispatch
        ready = self.ready
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
                d = ready.popleft()  # never of a finished session: see detach
                d.queued = False
                session = d.session
                try:
                    moved += d.pump(self)
                except Exception as e:
                    # A bug or a caller breaking the contract (e.g. closing a
                    # socket mid-session) ends that session, never the pump.
                    logger.opt(exception=e).error("relay session failed")
                    session.finish(Ending.BROKEN, None, f"relay error: {e!r}")
                steps += 1
                if steps >= TURN_STEPS or moved >= TURN_BYTES:
                    return

    def _dispatch(self, fd: int, mask: int) -> None:
        d = self._by_fd.get(fd)
        if d is None:
            return  # the session ended earlier in this batch
        if d.phase is DIALING and not self._on_connect(d, mask):
            return
        if mask & select.EPOLLERR:
            # An error with nobody reading or writing this socket (e.g. an RST
            # after the peer's FIN while the other side is idle) must still end
            # the session now, so look at it here.
            err = _socket_error(d.src)
            if err:
                d.session.fail(d.src_side, err)
                return
        if mask & _READ_EVENTS and d.phase is OPEN:
            if mask & _HANGUP_EVENTS:
                d.edge = HANGUP
            elif d.edge is IDLE:
                d.edge = READABLE
            if not d.queued:
                d.queued = True
                self.ready.append(d)
        if mask & _WRITE_EVENTS:
            p = d.peer  # the direction that writes to this fd
            if (p.pending is not None or p.in_pipe) and not p.queued:
                p.queued = True
                self.ready.append(p)

    def _on_connect(self, d: Direction, mask: int) -> bool:
        """An event on a connecting upstream: True once it is connected."""
        session = d.session
        if mask & (select.EPOLLERR | select.EPOLLHUP):
            # A failed connect reports ERR|HUP (never OUT: the kernel shuts
            # both ways of a reset socket); a clean OUT needs no SO_ERROR call.
            err = _socket_error(d.src)
            if err:
                session.end(DialFailed(DialFailure.ERROR, os.strerror(err)))
            else:
                session.end(DialFailed(DialFailure.CLOSED, "connection closed"))
            return False
        if not mask & select.EPOLLOUT:
            return False  # not connected yet
        d.phase = OPEN
        try:
            self._sessions.connected(d)
        except Exception as e:
            logger.opt(exception=e).error("relay session failed")
            session.finish(Ending.BROKEN, None, f"relay error: {e!r}")
            return False
        return True

    def _stop(self) -> None:
        self._sessions.stop()
        self.ready.clear()
        self.pipes.close()
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = self._sessions.epoll = None
