"""List once, then watch: the ``default/kubernetes`` EndpointSlices, as client-go's reflector.

``Reflector.follow`` is one discovery session's body. Each list and event
goes into a ``SliceSet``; each change of the ready set goes to ``on_update``.
Which upstream the client talks to, and what happens when a session fails,
is ``kap.discovery``'s. The rules, which the tests hold it to:

* Every LIST carries a resourceVersion, so the apiserver serves it from its
  watch cache: the first ``resourceVersion=0``, every later one the last
  version seen with ``resourceVersionMatch=NotOlderThan``. The one exception
  is the list right after a 410, a consistent read (the cache may not hold a
  version that new enough to continue from).
* One long-lived WATCH from the list's version, ``allowWatchBookmarks=true``,
  ``timeoutSeconds`` drawn in [``watch_timeout``, 2 x ``watch_timeout``]
  (client-go: 5-10 min) so the nodes' watches do not end together. While it
  is live nothing is re-listed: the watch is the refresh.
* A watch that ends (its timeout, the server closing it) after delivering
  something, or after lasting a ``period``, is reopened at once from the last
  version seen, without a list.
* A watch silent for ``stall_limit`` (no event, no bookmark) is stalled: it
  is closed, and kap re-lists (from the cache) and watches again.
* Watches that end at once without a line, ``quiet_watches_before_polling``
  times in a row, mean no watch can be kept here: kap re-lists from the cache
  every ``period`` (the original description's poll), trying a watch after
  each list.
* A 410 (the version is compacted; an HTTP status or an ERROR event) waits a
  full-jitter backoff (``backoff_delay``), then lists consistently.
"""

from __future__ import annotations

import contextlib
import enum
import random
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
# A watch that ends without delivering a line this many times in a row (410s,
# servers closing it at once) is not reopened before the next list: no spinning.
QUIET_WATCHES_BEFORE_POLLING = 2
# client-go's reflector: minWatchTimeout = 5 min, timeoutSeconds drawn in
# [5, 10) min.
WATCH_TIMEOUT = 300.0
# kube-apiserver's watch cache sends each watcher a bookmark about once a
# minute (bookmarkFrequency), but skips one when the watcher is busy or its
# buffer is full: a healthy quiet watch can be silent for two intervals. The
# margin (90 s) covers one missed bookmark with 30 s to spare, so a quiet
# healthy watch is not restarted every minute; a stalled one costs at most
# 150 s of blindness (the probes still see dead or hung apiservers meanwhile).
BOOKMARK_INTERVAL = 60.0
STALL_MARGIN = 90.0
STALL_LIMIT = BOOKMARK_INTERVAL + STALL_MARGIN
# client-go's reflector backs off from 800 ms, doubling up to 30 s.
BACKOFF_INITIAL = 0.8
BACKOFF_CAP = 30.0


def backoff_delay(failures: int, *, initial: float, cap: float, u: float) -> float:
    """Seconds to wait after ``failures`` consecutive failures (1 = the first).

    Doubling from ``initial`` up to ``cap``, then "full jitter": a uniform draw
    ``u`` in [0, 1) scales it into [0, all] of that, so the thousands of nodes
    that lost an apiserver together spread their retries over the whole
    interval instead of re-listing in the same second.
    """
    return u * min(cap, initial * 2.0 ** min(max(failures, 1) - 1, 32))


class _Lost(enum.Enum):
    """Why a run of watches ended and a list is due."""

    GONE = "gone"  # 410: back off, then a consistent list
    STALLED = "stalled"  # silent past the stall limit: re-list now
    QUIET = "quiet"  # watches end at once: re-list at the next period
    LEAVE = "leave"  # the session should end (switch upstreams)


@attrs.define
class Reflector:
    """The slices of one Service, kept up to date by list and watch.

    Args:
      namespace, service: whose slices (label ``kubernetes.io/service-name``).
      period: ``--discover-period``: the poll interval when no watch can be kept.
      on_update: called with the new ready set whenever it changes.
      rng: draws the watch timeouts and the backoff.
      watch_timeout, stall_limit, backoff_initial, backoff_cap, list_timeout_floor,
      quiet_watches_before_polling: see the constants (tests shorten them).
    """

    namespace: str
    service: str
    period: float
    on_update: Callable[[list[Address]], None]
    rng: random.Random = attrs.field(factory=random.Random)
    watch_timeout: float = WATCH_TIMEOUT
    stall_limit: float = STALL_LIMIT
    backoff_initial: float = BACKOFF_INITIAL
    backoff_cap: float = BACKOFF_CAP
    list_timeout_floor: float = LIST_TIMEOUT_FLOOR
    quiet_watches_before_polling: int = QUIET_WATCHES_BEFORE_POLLING
    # -- state, shown by the watcher's status() --
    mode: str = "starting"
    resource_version: str | None = None
    lists_total: int = 0
    watches_total: int = 0
    slices: SliceSet = attrs.field(factory=SliceSet)
    _consistent_next: bool = attrs.field(default=False, alias="_consistent_next")
    _gone_in_a_row: int = attrs.field(default=0, alias="_gone_in_a_row")

    @property
    def labels(self) -> dict[str, str]:
        return {SERVICE_NAME_LABEL: self.service}

    def backoff(self, failures: int) -> float:
        """A full-jitter delay; never longer than one period (an API back is followed soon)."""
        cap = max(self.backoff_initial, min(self.backoff_cap, self.period))
        return backoff_delay(failures, initial=self.backoff_initial, cap=cap, u=self.rng.random())

    async def follow(self, client: AsyncClient, target: Address, leave: Callable[[], bool]) -> None:
        """List, then watch while the watch is live; list again only when it is lost.

        ``leave`` is called after every list and every watch; True ends the
        session (to switch upstreams, or for new credentials).

        Raises:
          RequestError: a list or a watch failed.
        """
        while True:
            listed_at = trio.current_time()
            self.mode = "list"
            await self._list(client, target)
            if leave():
                return
            lost = await self._keep_watching(client, target, listed_at, leave)
            if lost is _Lost.LEAVE:
                return
            if lost is _Lost.GONE:
                self._gone_in_a_row += 1
                self._consistent_next = True
                logger.bind(upstream=str(target)).debug("watch expired (410); re-listing")
                self.mode = "backoff"
                await trio.sleep(self.backoff(self._gone_in_a_row))
            elif lost is _Lost.QUIET:
                self.mode = "poll"
                await trio.sleep_until(listed_at + self.period)

    async def _keep_watching(
        self, client: AsyncClient, target: Address, listed_at: float, leave: Callable[[], bool]
    ) -> _Lost:
        """Watch, reopening each watch that ends, until one is lost (see ``_Lost``)."""
        quiet = 0
        while True:
            self.mode = "watch"
            opened = trio.current_time()
            try:
                lines, stalled = await self._watch(client, target)
            except Gone:
                return _Lost.GONE
            if stalled:
                logger.bind(upstream=str(target), silent=self.stall_limit).info(
                    "discovery's watch went silent; re-listing"
                )
                return _Lost.STALLED
            self._gone_in_a_row = 0 if lines else self._gone_in_a_row
            kept = lines > 0 or trio.current_time() - opened >= self.period
            quiet = 0 if kept else quiet + 1
            if leave():
                return _Lost.LEAVE
            if quiet >= self.quiet_watches_before_polling:
                return _Lost.QUIET

    async def _list(self, client: AsyncClient, target: Address) -> None:
        """One list (from the cache unless right after a 410); applies it.

        Raises:
          RequestError: failed, timed out, or not a list.
        """
        if self._consistent_next:
            rv, match = None, None
        elif self.resource_version is None:
            rv, match = "0", None
        else:
            rv, match = self.resource_version, "NotOlderThan"
        timeout = max(self.list_timeout_floor, self.period)
        try:
            with trio.fail_after(timeout):
                items, listed = await apiclient.list_slices(
                    client, self.namespace, self.labels, rv, match
                )
        except trio.TooSlowError:
            raise RequestError(f"list timed out after {timeout:g}s") from None
        self.lists_total += 1
        self._consistent_next = False
        self.resource_version = listed
        self._applied(self.slices.replace(items), target)

    async def _watch(self, client: AsyncClient, target: Address) -> tuple[int, bool]:
        """One WATCH from the last version seen, until it ends or goes silent.

        Returns how many lines came (bookmarks included) and whether it stalled.

        Raises:
          Gone: 410, as an HTTP status or as an ERROR event.
          RequestError: anything else.
        """
        assert self.resource_version is not None  # a list came first
        lines = 0
        timeout = round(self.watch_timeout * (1.0 + self.rng.random()))
        self.watches_total += 1
        stream = apiclient.watch_slices(
            client, self.namespace, self.labels, self.resource_version, max(1, timeout)
        )
        with trio.move_on_after(self.stall_limit) as silence:
            async with contextlib.aclosing(stream):
                async for kind, obj, obj_rv in stream:
                    silence.deadline = trio.current_time() + self.stall_limit
                    lines += 1
                    self.resource_version = obj_rv or self.resource_version
                    if kind not in ("ADDED", "MODIFIED", "DELETED", "BOOKMARK"):
                        logger.bind(upstream=str(target), event=kind).warning(
                            "skipping a watch event of unknown type"
                        )
                    self._applied(self.slices.apply(kind, obj), target)
        return lines, silence.cancelled_caught

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


__all__ = ["Reflector", "backoff_delay"]
