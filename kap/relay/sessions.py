"""The pump's book of sessions: which socket is whose, and where a session waits.

The pump (kap/relay/pump.py) moves bytes; this keeps its books. A session
enters when its caller calls ``Relay.relay`` and leaves when it ends or is
cancelled; in between it is:

- registered in the pump's epoll set, one registration per socket for the
  session's whole life (never re-armed), and listed in ``by_fd``, where the
  pump looks up the direction an event is for;
- while its upstream connects, registered alone (the client joins once the
  upstream is connected, so no byte is read before there is somewhere to send
  it) and waiting in the heap of dial deadlines (kap/relay/dials.py);
- while its client waits for the upstream's first byte, in the heap of answer
  deadlines (the passive first-byte check).

Leaving (:meth:`Sessions.detach`) gives back its pipes and takes it off the
ready list and every heap, so nothing the pump holds keeps a session alive.
"""

from __future__ import annotations

import collections
import contextlib
import select
from typing import Final

import trio

from kap.relay.dials import AnswerDeadlines, DialDeadlines
from kap.relay.direction import Direction, Session
from kap.relay.outcome import Ending
from kap.relay.pipes import PipePool
from kap.relay.states import DIALING

_EPOLL_MASK: Final = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET


def _register(epoll: select.epoll, fd: int) -> None:
    """Add ``fd`` to the pump's set; a socket that ended a session without being
    closed (see :meth:`Sessions.detach`) is still in it, so modify that registration."""
    try:
        epoll.register(fd, _EPOLL_MASK)
    except FileExistsError:
        epoll.modify(fd, _EPOLL_MASK)


class Sessions:
    """The sessions one pump relays.

    ``epoll`` is the pump's set while it runs (None otherwise); ``by_fd`` maps
    each registered fd to the direction reading it; ``active`` counts the
    sessions registered, ``dials`` and ``answers`` (None without an answer
    budget) are the deadline heaps whose tasks the pump runs. ``ready`` and
    ``pipes`` are the pump's, shared: a leaving session is taken off the one
    and gives back to the other.
    """

    def __init__(
        self,
        ready: collections.deque[Direction],
        pipes: PipePool,
        answer_budget: float | None,
    ) -> None:
        self.epoll: select.epoll | None = None
        self.by_fd: dict[int, Direction] = {}
        self.active = 0
        self.dials = DialDeadlines()
        self.answers = None if answer_budget is None else AnswerDeadlines(answer_budget)
        self._ready = ready
        self._pipes = pipes

    def add(self, session: Session, connect_by: float | None) -> None:
        """Register a new session; one ``connect_by`` is still connecting its upstream."""
        epoll = self.epoll
        assert epoll is not None
        up, down = session.up, session.down
        if self.answers is not None:
            up.watch = down.watch = True
        if connect_by is not None:
            # Only the upstream until it connects: its EPOLLOUT edge says so
            # (connected()), and the client is registered then.
            _register(epoll, down.src_fd)
            down.phase = DIALING
            self.by_fd[down.src_fd] = down
            self.dials.add(session, connect_by)
        else:
            session.connected_at = trio.current_time()
            _register(epoll, up.src_fd)
            try:
                _register(epoll, down.src_fd)
            except BaseException:
                epoll.unregister(up.src_fd)
                raise
            # Registration reports whatever is already readable (edge-triggered
            # epoll checks readiness on EPOLL_CTL_ADD), so nothing is pumped here.
            self.by_fd[up.src_fd] = up
            self.by_fd[down.src_fd] = down
        self.active += 1

    def connected(self, d: Direction) -> None:
        """``d``'s source, a connecting upstream, has connected: register the client.

        Raises:
            OSError: the client could not be registered (the caller ends the session).
        """
        session = d.session
        self.dials.discard(session)
        session.connected_at = trio.current_time()
        _register(self.epoll, d.dst_fd)  # type: ignore[arg-type]
        self.by_fd[d.dst_fd] = d.peer

    def expect_answer(self, session: Session) -> None:
        assert self.answers is not None
        self.answers.add(session, trio.current_time())

    def answered(self, session: Session) -> None:
        if self.answers is not None:
            self.answers.discard(session)

    def detach(self, session: Session, *, unregister: bool) -> None:
        """Forget a session and give back its pipes; ``unregister`` its sockets too.

        A session that ended by itself leaves its sockets in the epoll set:
        the caller closes them next, and closing a socket removes it (two
        epoll_ctl calls fewer per connection); events until then find no
        session in ``by_fd`` and are dropped. A cancelled session is
        unregistered at once, since its caller may keep the sockets a while.
        """
        if session.finished:
            return
        session.finished = True
        self.active -= 1
        epoll = self.epoll if unregister else None
        up, down = session.up, session.down
        # A session still connecting has only the upstream registered.
        dialing = down.phase is DIALING
        if dialing:
            self.dials.discard(session)
        if session.answer is not None and self.answers is not None:
            self.answers.discard(session)
        for d in (down,) if dialing else (up, down):
            self.by_fd.pop(d.src_fd, None)
            if epoll is not None:
                # ENOENT/EBADF if the caller closed a socket while relaying:
                # its registration is gone with it.
                with contextlib.suppress(OSError):
                    epoll.unregister(d.src_fd)
        for d in (up, down):
            d.release_pipe(self._pipes)
            d.pending = None
            if d.queued:
                d.queued = False
                self._ready.remove(d)
            # Break the session <-> direction cycles, so the session, its
            # sockets and the caller's objects go by reference counting rather
            # than by the cyclic GC (measured: ~10 objects per connection).
            d.session = d.peer = None  # type: ignore[assignment]

    def stop(self) -> None:
        """The pump stops: every open session ends with ``Ending.STOPPED``."""
        for session in {d.session for d in self.by_fd.values()}:
            session.finish(Ending.STOPPED, None, "relay stopped")
        self.dials.clear()
        if self.answers is not None:
            self.answers.clear()
