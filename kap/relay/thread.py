"""The pump's own thread: ``Relay(threaded=True)`` pumps off trio's run loop.

Why (issue 13): with the pump as a trio task, every wake-up goes through
trio's epoll_wait, a reschedule of the pump task and the pump's own
``epoll.poll`` before a byte moves; a plain epoll loop adds a fraction of that
to a quiet connection's round trip. Here a thread blocks in ``epoll_wait`` on
the pump's own set (the GIL is released there) and pumps as soon as the kernel
says so; trio only accepts, dials and owns the connections' tasks.

The rules between the two threads:

1. Only the pump thread touches a session once it is handed over: trio posts
   what it wants done (open a session, cancel it, expire its dial) to
   ``inbox`` and writes the wake-up eventfd if the thread sleeps; the thread
   takes the inbox at the start of each turn. So the thread never sees a
   session change under it, and trio never waits for the thread.
2. What ended goes back through ``outbox``: after each turn with anything in
   it, the thread asks trio for one call of :meth:`PumpThread.deliver`
   (``TrioToken.run_sync_soon``), which reschedules every waiting task in
   the batch: one wake-up of trio per turn, not one per connection.
3. A cancelled caller cannot be answered synchronously (its session may be
   mid-pump): its abort returns ``Abort.FAILED`` and posts a cancel; the
   thread unregisters the session, and the task is rescheduled with its
   ``Cancelled`` through the outbox, so the sockets are out of the epoll set
   before ``Cancelled`` propagates, as with the task pump.
4. The thread is started and stopped from :meth:`PumpThread.run`, in the
   pump's place in the nursery tree: cancelling it sets ``stopping`` and
   writes the eventfd; ``run`` returns once the thread has left its loop, and
   only then does trio finish what is left (``running`` is False from then,
   and every wake-up is a direct reschedule again).

``sleeping``, ``stopping`` and ``scheduled`` are plain attributes: each is
written by one side and read by the other, and the GIL orders those reads and
writes (a flag is set before the queue it guards is checked).
"""

from __future__ import annotations

import collections
import os
import select
from collections.abc import Callable
from typing import Any, Final

import outcome
import trio

from kap.relay.direction import Session

# What trio posts to the thread.
OPEN: Final = 0  # register a new session's sockets
CANCEL: Final = 1  # the caller was cancelled: unregister, answer Cancelled
EXPIRE: Final = 2  # the dial passed its deadline

# One item of the inbox: (what, session, raise_cancel for CANCEL else None).
Request = tuple[int, Session, Any]

# Events taken from the kernel per epoll_wait (the task pump's MAX_EVENTS).
_MAX_EVENTS: Final = 256


class PumpThread:
    """The hand-over between trio and the pump's thread; see the module docstring.

    ``handbacks`` counts the wake-ups asked of trio (one per turn that ended
    sessions at most), for tests and the bench.
    """

    def __init__(self) -> None:
        self.inbox: collections.deque[Request] = collections.deque()
        self.outbox: collections.deque[tuple[trio.lowlevel.Task, Any, Any]] = collections.deque()
        self.running = False  # the thread's loop runs: hand over, do not touch
        self.sleeping = False  # the thread is (about to be) in epoll_wait(-1)
        self.stopping = False
        self.scheduled = False  # a deliver() is queued in trio
        self.handbacks = 0
        self.wake_fd = -1
        self._token: trio.lowlevel.TrioToken | None = None

    # -- trio's side ----------------------------------------------------------

    def post(self, request: Request) -> None:
        """Hand ``request`` to the thread; wake it if it sleeps."""
        self.inbox.append(request)
        if self.sleeping:
            os.eventfd_write(self.wake_fd, 1)

    def deliver(self) -> None:
        """Reschedule every task whose session ended (runs in trio, once per batch)."""
        self.scheduled = False  # first: a result posted from now on asks again
        outbox = self.outbox
        while outbox:
            task, result, raise_cancel = outbox.popleft()
            if raise_cancel is None:
                trio.lowlevel.reschedule(task, outcome.Value(result))
            else:
                trio.lowlevel.reschedule(task, outcome.capture(raise_cancel))

    async def run(
        self,
        epoll: select.epoll,
        take: Callable[[Request], None],
        turn: Callable[[list[tuple[int, int]]], None],
        has_work: Callable[[], bool],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run the pump in a thread of its own until cancelled.

        Args:
            epoll: the pump's set; the wake-up eventfd joins it.
            take: carry out one request of the inbox (in the thread).
            turn: one turn of the pump over the events given (in the thread).
            has_work: the pump has directions ready (it must not sleep).

        Cancellation: the thread is told to stop and this returns once it
        has left its loop (the requests still in the inbox are left to the
        caller, who carries them out in trio).
        """
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._token = trio.lowlevel.current_trio_token()
        self.stopping = False
        try:
            # Edge-triggered: every write raises an edge, so it is never read.
            epoll.register(self.wake_fd, select.EPOLLIN | select.EPOLLET)
            self.running = True
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._stop_when_cancelled)
                task_status.started()
                await trio.to_thread.run_sync(
                    self._loop, epoll, take, turn, has_work, abandon_on_cancel=False
                )
                nursery.cancel_scope.cancel()  # only reached if the thread left by itself
        finally:
            self.running = False
            os.close(self.wake_fd)  # also leaves the epoll set
            self.wake_fd = -1

    async def _stop_when_cancelled(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            self.stopping = True
            os.eventfd_write(self.wake_fd, 1)

    # -- the thread ---------------------------------------------------------------

    def _loop(
        self,
        epoll: select.epoll,
        take: Callable[[Request], None],
        turn: Callable[[list[tuple[int, int]]], None],
        has_work: Callable[[], bool],
    ) -> None:
        poll = epoll.poll
        inbox = self.inbox
        while not self.stopping:
            if has_work() or inbox:
                events = poll(0, _MAX_EVENTS)
            else:
                self.sleeping = True  # first: a post from now on writes the eventfd
                wait = 0 if inbox or self.stopping else -1
                events = poll(wait, _MAX_EVENTS)  # the GIL is released here
                self.sleeping = False
            while inbox:
                take(inbox.popleft())
            turn(events)
            if self.outbox and not self.scheduled:
                self.scheduled = True
                self.handbacks += 1
                assert self._token is not None
                self._token.run_sync_soon(self.deliver)

    def answer(self, task: trio.lowlevel.Task, result: Any, raise_cancel: Any = None) -> None:
        """Queue ``task``'s answer for the next :meth:`deliver` (in the thread)."""
        self.outbox.append((task, result, raise_cancel))
