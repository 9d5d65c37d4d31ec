"""List, then watch, the ``default/kubernetes`` EndpointSlices through one client.

``Reflector.follow`` is one discovery session's body: list, watch from the
list's resourceVersion, and list again at least every ``period``. Each list
and event goes into a ``SliceSet``; each change of the ready set goes to
``on_update``. Which upstream the client talks to, and what happens when a
session fails, is ``kap.discovery``'s.

A watch that ends without delivering an event ``quiet_watches_before_polling``
times in a row waits for the next scheduled list instead of spinning, and
every watch lives inside the cancel scope that ends at the next list (one
period), so a stalled watch costs at most one period.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import attrs
import trio
from lightkube import AsyncClient
from loguru import logger

from kap import apiclient
from kap.address import Address
from kap.apiclient import Gone, RequestError
from kap.slices import Applied, SliceSet

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
# A list slower than the period that repeats it is as good as failed; this
# floor keeps a sub-second --discover-period from failing every TLS handshake
# on a loaded node.
LIST_TIMEOUT_FLOOR = 1.0
# A watch that ends without delivering an event this many times in a row (410s,
# servers closing it at once) is not reopened before the next list: no spinning.
QUIET_WATCHES_BEFORE_POLLING = 2


@attrs.define
class Reflector:
    """The slices of one Service, kept up to date by list and watch.

    Args:
      namespace, service: whose slices (label ``kubernetes.io/service-name``).
      period: re-list at least this often (``--discover-period``).
      on_update: called with the new ready set whenever it changes.
      list_timeout_floor, quiet_watches_before_polling: see the constants.
    """

    namespace: str
    service: str
    period: float
    on_update: Callable[[list[Address]], None]
    list_timeout_floor: float = LIST_TIMEOUT_FLOOR
    quiet_watches_before_polling: int = QUIET_WATCHES_BEFORE_POLLING
    # -- state, shown by the watcher's status() --
    mode: str = "starting"
    resource_version: str | None = None
    lists_total: int = 0
    slices: SliceSet = attrs.field(factory=SliceSet)

    @property
    def labels(self) -> dict[str, str]:
        return {SERVICE_NAME_LABEL: self.service}

    async def follow(
        self, client: AsyncClient, target: Address, listed: Callable[[], bool]
    ) -> None:
        """List, watch until the period ends, list again; until ``listed()`` says stop.

        ``listed`` is called after every successful list; True ends the session.

        Raises:
          RequestError: a list or a watch failed.
        """
        quiet = 0
        while True:
            deadline = trio.current_time() + self.period
            self.mode = "list"
            rv = await self._list(client, target)
            if listed():
                return
            while trio.current_time() < deadline:
                self.mode = "watch"
                events = 0
                gone = False
                with trio.move_on_at(deadline) as period:
                    try:
                        rv, events = await self._watch(client, target, rv)
                    except Gone:
                        gone = True
                if period.cancelled_caught:
                    quiet = 0  # a watch that lasted the period: time to list
                    break
                quiet = 0 if events else quiet + 1
                if quiet >= self.quiet_watches_before_polling and trio.current_time() < deadline:
                    # Watches end as soon as they open (410 after 410, or a
                    # server closing them): wait for the next list.
                    self.mode = "poll"
                    await trio.sleep_until(deadline)
                if gone:
                    logger.bind(upstream=str(target)).debug("watch expired (410); re-listing")
                    break

    async def _list(self, client: AsyncClient, target: Address) -> str:
        """One list; applies it and returns its resourceVersion.

        Raises:
          RequestError: failed, timed out, or not a list.
        """
        timeout = max(self.list_timeout_floor, self.period)
        try:
            with trio.fail_after(timeout):
                items, rv = await apiclient.list_slices(client, self.namespace, self.labels)
        except trio.TooSlowError:
            raise RequestError(f"list timed out after {timeout:g}s") from None
        self.lists_total += 1
        self.resource_version = rv
        self._applied(self.slices.replace(items), target)
        return rv

    async def _watch(self, client: AsyncClient, target: Address, rv: str) -> tuple[str, int]:
        """Follow changes from ``rv`` until the server ends the watch.

        Returns the last resourceVersion seen and how many events came.

        Raises:
          Gone: 410, as an HTTP status or as an ERROR event.
          RequestError: anything else.
        """
        events = 0
        stream = apiclient.watch_slices(client, self.namespace, self.labels, rv)
        async with contextlib.aclosing(stream):
            async for kind, obj, obj_rv in stream:
                events += 1
                rv = obj_rv or rv
                self.resource_version = rv
                if kind not in ("ADDED", "MODIFIED", "DELETED", "BOOKMARK"):
                    logger.bind(upstream=str(target), event=kind).warning(
                        "skipping a watch event of unknown type"
                    )
                self._applied(self.slices.apply(kind, obj), target)
        return rv, events

    def _applied(self, applied: Applied, target: Address) -> None:
        """Log what a list or event skipped; report the new ready set, if any."""
        for why in applied.new_reasons:
            logger.bind(upstream=str(target), reason=why).warning(
                "skipping part of an EndpointSlice"
            )
        current = applied.ready
        if current is None:
            return
        log = logger.bind(
            upstream=str(target), addresses=[str(a) for a in current], slices=len(self.slices)
        )
        if current:
            log.info("discovered apiservers")
        elif applied.before:
            log.warning("discovery found no ready apiserver; keeping the last set")
        self.on_update(current)


__all__ = ["Reflector"]
