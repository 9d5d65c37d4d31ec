"""Dial deadlines: the upstreams still connecting, in a heap by ``connect_by``.

The proxy hands the pump a connecting upstream socket with a deadline
(``Relay.relay(..., connect_by=...)``); one task sleeps until the earliest
deadline and ends the dials that passed it. A dial that finishes first only
clears its entry, so the heap holds no session alive and nothing is searched:
with a constant dial timeout the task wakes about once per timeout, not once
per connection.
"""

from __future__ import annotations

import heapq
import itertools
import math
from typing import Any, Final

import trio

from kap.relay.direction import Session
from kap.relay.outcome import DialFailed, DialFailure

# What a dial that passed its ``connect_by`` comes to.
CONNECT_TIMEOUT: Final = DialFailed(DialFailure.TIMEOUT, "connect timed out")


class DialDeadlines:
    """The heap of dial deadlines and the task that enforces them.

    Entries are ``[connect_by, sequence, session]`` (the sequence breaks ties,
    so sessions are never compared); :meth:`discard` sets the session to None
    and the entry is dropped once it reaches the top. ``count`` is how many
    dials are in flight.
    """

    def __init__(self) -> None:
        self.count = 0
        self._heap: list[list[Any]] = []
        self._sequence = itertools.count()
        self._wake_at = math.inf  # when run() wakes next
        self._sleep: trio.CancelScope | None = None  # what it sleeps in

    def add(self, session: Session, connect_by: float) -> None:
        """``session``'s upstream is connecting and must be connected by ``connect_by``."""
        heap = self._heap
        while heap and heap[0][2] is None:
            heapq.heappop(heap)  # dials over since: keep the heap to those in flight
        entry = [connect_by, next(self._sequence), session]
        heapq.heappush(heap, entry)
        session.dial = entry
        self.count += 1
        if connect_by < self._wake_at:
            self._wake_at = connect_by
            if self._sleep is not None:
                self._sleep.deadline = connect_by

    def discard(self, session: Session) -> None:
        """``session``'s dial is over (connected, failed or cancelled)."""
        entry = session.dial
        if entry is not None:
            entry[2] = None  # breaks session -> entry -> session too
            session.dial = None
            self.count -= 1

    def clear(self) -> None:
        """Forget every entry (the pump stopped; its sessions are over)."""
        self._heap.clear()
        self._wake_at = math.inf

    async def run(self) -> None:
        """End each dial that passed its deadline with :data:`CONNECT_TIMEOUT`.

        Runs beside the pump, in the pump's nursery, until cancelled.
        """
        heap = self._heap
        while True:
            with trio.CancelScope(deadline=self._wake_at) as self._sleep:
                await trio.sleep_forever()
            self._sleep = None
            now = trio.current_time()
            while heap and (heap[0][2] is None or heap[0][0] <= now):
                session: Session | None = heapq.heappop(heap)[2]
                if session is not None:
                    session.end(CONNECT_TIMEOUT)  # detaching it calls discard()
            self._wake_at = heap[0][0] if heap else math.inf
