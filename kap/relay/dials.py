"""Deadlines of the pump: dials that must connect, and first bytes that want an answer.

Both are heaps of ``[at, sequence, session]`` with one task each that sleeps
until the earliest entry and acts on those that passed it. An entry that is
over first (the dial connected, the upstream answered, the session ended) only
clears its session, so the heap holds no session alive and nothing is
searched: with a constant timeout the task wakes about once per timeout, not
once per connection.

- :class:`DialDeadlines`: the proxy hands the pump a connecting upstream
  socket with a deadline (``Relay.relay(..., connect_by=...)``); a dial past
  it ends with :data:`CONNECT_TIMEOUT`.
- :class:`AnswerDeadlines`: the passive first-byte check. The first time a
  client's bytes move to an upstream that has sent nothing back, the session
  waits for an answer within the budget (an apiserver answers a TLS
  ClientHello at once). Past it the session goes on untouched; an
  :class:`~kap.relay.outcome.Unanswered` is added to a batch that the
  proxy's task takes with ``Relay.unanswered()``.
"""

from __future__ import annotations

import abc
import heapq
import itertools
import math
import socket
from typing import Any, Final

import trio

from kap.relay.direction import Session
from kap.relay.outcome import DialFailed, DialFailure, Unanswered

# What a dial that passed its ``connect_by`` comes to.
CONNECT_TIMEOUT: Final = DialFailed(DialFailure.TIMEOUT, "connect timed out")

# Unanswered sessions held for the proxy at most: with nobody taking them
# (a relay used without a proxy), the batch must not grow without end. A
# batch is emptied every time the proxy's task runs, so this is never reached
# while it runs; one per connection is far more than it needs to act on.
UNANSWERED_HELD: Final = 1024


class Deadlines(abc.ABC):
    """A heap of ``[at, sequence, session]`` and the task that acts on passed ones.

    The sequence breaks ties, so sessions are never compared; :meth:`drop`
    sets the session to None and the entry is popped once it reaches the
    top. ``count`` is how many entries are live. Subclasses say what a passed
    entry means (:meth:`expire`) and which slot of the session holds the entry.
    """

    def __init__(self) -> None:
        self.count = 0
        self._heap: list[list[Any]] = []
        self._sequence = itertools.count()
        self._wake_at = math.inf  # when run() wakes next
        self._sleep: trio.CancelScope | None = None  # what it sleeps in

    def push(self, session: Session, at: float) -> list[Any]:
        """A live entry for ``session`` that passes at ``at``."""
        heap = self._heap
        while heap and heap[0][2] is None:
            heapq.heappop(heap)  # entries over since: keep the heap to live ones
        entry = [at, next(self._sequence), session]
        heapq.heappush(heap, entry)
        self.count += 1
        if at < self._wake_at:
            self._wake_at = at
            if self._sleep is not None:
                self._sleep.deadline = at
        return entry

    def drop(self, entry: list[Any]) -> None:
        """``entry`` is over before its time."""
        entry[2] = None  # breaks session -> entry -> session too
        self.count -= 1

    def clear(self) -> None:
        """Forget every entry (the pump stopped; its sessions are over)."""
        self._heap.clear()
        self.count = 0
        self._wake_at = math.inf

    @abc.abstractmethod
    def expire(self, session: Session, at: float, now: float) -> None:
        """``session``'s entry passed (``at``); it must drop it."""

    async def run(self) -> None:
        """Expire each entry that passed its time; beside the pump, until cancelled."""
        heap = self._heap
        while True:
            with trio.CancelScope(deadline=self._wake_at) as self._sleep:
                await trio.sleep_forever()
            self._sleep = None
            now = trio.current_time()
            while heap and (heap[0][2] is None or heap[0][0] <= now):
                at, _, session = heapq.heappop(heap)
                if session is not None:
                    self.expire(session, at, now)
            self._wake_at = heap[0][0] if heap else math.inf


class DialDeadlines(Deadlines):
    """The upstreams still connecting, by ``connect_by`` (``Session.dial``)."""

    def add(self, session: Session, connect_by: float) -> None:
        """``session``'s upstream is connecting and must be connected by ``connect_by``."""
        session.dial = self.push(session, connect_by)

    def discard(self, session: Session) -> None:
        """``session``'s dial is over (connected, failed or cancelled)."""
        entry = session.dial
        if entry is not None:
            self.drop(entry)
            session.dial = None

    def expire(self, session: Session, at: float, now: float) -> None:
        session.end(CONNECT_TIMEOUT)  # detaching it calls discard()


class AnswerDeadlines(Deadlines):
    """Sessions whose client spoke first and whose upstream has not answered yet.

    Args:
        budget: seconds an upstream has to send its first byte after the
            client's first bytes reached it.
    """

    def __init__(self, budget: float) -> None:
        super().__init__()
        self.budget = budget
        self.unanswered: list[Unanswered] = []  # the batch for the proxy
        self.dropped = 0  # past UNANSWERED_HELD, nobody taking them
        self._taken = trio.Event()  # set when the batch is not empty

    def add(self, session: Session, now: float) -> None:
        """``session``'s client sent its first bytes at ``now``; nothing came back yet."""
        session.answer = self.push(session, now + self.budget)

    def discard(self, session: Session) -> None:
        """``session``'s upstream answered, or the session ended."""
        entry = session.answer
        if entry is not None:
            self.drop(entry)
            session.answer = None

    def expire(self, session: Session, at: float, now: float) -> None:
        self.discard(session)
        session.down.watch = False  # once per connection
        if _has_answered(session.upstream):
            return  # its answer waits in the socket for the pump's next turn
        if len(self.unanswered) >= UNANSWERED_HELD:
            self.dropped += 1
            return
        self.unanswered.append(Unanswered(session.tag, now - at + self.budget))
        self._taken.set()

    async def take(self) -> list[Unanswered]:
        """Wait until the batch is not empty, then hand it over."""
        await self._taken.wait()
        batch, self.unanswered = self.unanswered, []
        self._taken = trio.Event()
        return batch


def _has_answered(upstream: socket.socket) -> bool:
    """Whether the upstream socket holds a byte, a FIN or an error the pump has not read yet.

    The deadline task and the pump are two trio tasks: on a busy loop the
    deadline may be looked at before the pump reads an answer that arrived in
    time. One peek (once per expired deadline, never per byte) settles it.
    """
    try:
        upstream.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    except OSError:
        return True  # an error ends the session by itself; the proxy judges that end
    return True
