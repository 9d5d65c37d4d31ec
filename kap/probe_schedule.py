"""When each upstream is checked: one task per upstream, concurrently, with jitter.

``ProbeScheduler`` owns one task per upstream in its nursery, each checking
at start and then every ``interval * (1 + jitter * U(-1, 1))``; a
``kap.probe.Prober`` does each check. One task per upstream (not rounds)
means a black-holed upstream costs its own timeout and delays nobody else.
``next_check``, ``next_delay`` and ``open_budget`` are the pure rules.

A probe has two deadlines, each bounding what it measures:

* Opening the connection (TCP connect and TLS handshake) has the *open
  budget* (``open_budget``: a fifth of the interval, or two timeouts when
  that is longer, never more than one interval). It is needed only when
  there is no kept-alive connection (the first probe, after a failure, after
  the credentials change or the apiserver closed it); a connection not open
  within it is a failed probe, so a hung or black-holed apiserver still
  fails on time.
* ``--health-timeout`` bounds one ``GET /readyz`` on the open connection.
  A request that times out closes the connection; the next probe opens a new
  one first, under the open budget, so a timeout never dooms the next probe.

When the probe connection speaks HTTP/2 and ``readiness_interval`` is
longer than the interval (``--readiness-interval``, the fleet setting), the
checks between two ``/readyz`` are HTTP/2 PINGs on it (``next_check``
decides); a PING has the timeout as its deadline, and its round trip is the
latency. Anything that asks for a closer look (a missed PING, a failure, a
poke, a GOAWAY) makes the next check a ``/readyz`` at once.
"""

from __future__ import annotations

import random

import attrs
import trio
from loguru import logger

from kap.address import Address
from kap.events import MEMBERSHIP, Change, ChangeFeed, ChangeKind
from kap.pool import Pool
from kap.probe import Prober, ProbeResult
from kap.probe_h2 import ALPN_H2
from kap.probe_results import classify, classify_ping

# A probe timeout noticed this much (or half the timeout) after its deadline
# means kap's own loop was stalled, not that the upstream was slow: 20 ms is
# far beyond the pump's bounded turn (a few ms) yet well under any timeout
# worth setting.
LOOP_LAG_TOLERANCE = 0.02
# The open budget is at least this share of the interval. A hung apiserver's
# three fast confirmations are each a connection that never opens: after the
# first timed-out request they take 3 x interval/5 (3 x 200 ms with the
# defaults), which keeps it out of rotation within interval + 3 x timeout +
# interval whenever the timeout is at most a fifth of the interval.
OPEN_BUDGET_SHARE = 0.2
# ... and at least this many timeouts: an apiserver near enough to answer a
# request within the timeout is one round trip away at most, and TCP plus a
# TLS 1.3 handshake (what kube-apiserver speaks) take two.
OPEN_BUDGET_TIMEOUTS = 2
# A new upstream that has not passed a probe this many intervals after it was
# added is worth a warning (once); its earlier failures are only debug lines,
# since apiservers and kap often start together.
NEVER_HEALTHY_INTERVALS = 5
READYZ = "readyz"
PING = "ping"


def next_check(
    *,
    protocol: str | None,
    readyz_due: bool,
    since_readyz: float | None,
    interval: float,
    readiness_interval: float,
) -> str:
    """What the next health check of an upstream is: ``READYZ`` or ``PING``.

    A PING only when the upstream's open probe connection speaks HTTP/2, the
    last ``/readyz`` passed and is younger than the readiness interval (less
    half an interval, so that jittered ticks still give one ``/readyz`` per
    readiness interval, not one every other), and nothing asked for a
    ``/readyz`` (``readyz_due``: a failed or missed check, a failed dial, a
    passive failure, a GOAWAY, a changed slice).
    """
    if readiness_interval <= interval or readyz_due or protocol != ALPN_H2:
        return READYZ
    if since_readyz is None or since_readyz >= readiness_interval - interval / 2:
        return READYZ
    return PING


def next_delay(interval: float, jitter: float, u: float) -> float:
    """Seconds until the next probe; ``u`` is drawn from U(-1, 1)."""
    return max(0.0, interval * (1.0 + jitter * u))


def open_budget(interval: float, timeout: float) -> float:
    """Seconds a probe may spend opening its connection (TCP connect + TLS handshake).

    Its own budget, not ``--health-timeout``: an apiserver 40 ms away needs
    about 80 ms to open a connection and 40 ms more for the request, so one
    100 ms deadline over both would never pass. At most one interval, so the
    probes of a hung or black-holed apiserver still fail at their pace; see
    ``OPEN_BUDGET_SHARE`` and ``OPEN_BUDGET_TIMEOUTS`` for the two floors.
    """
    return min(interval, max(interval * OPEN_BUDGET_SHARE, timeout * OPEN_BUDGET_TIMEOUTS))


@attrs.define
class ProbeScheduler:
    """Owns one probing task per upstream; publishes what the probes change (and NEVER_HEALTHY).

    Subscribes to ``ADDED``/``REMOVED`` (start, stop probe tasks), ``SUSPECT``
    (a client's dial just failed) and ``DISCOVERED`` (it is in discovery's new
    set): both mean a ``/readyz`` of that upstream now (``poke``).
    """

    pool: Pool
    prober: Prober
    interval: float
    timeout: float
    jitter: float
    changes: ChangeFeed
    rng: random.Random = attrs.field(factory=random.Random)
    # Seconds between two /readyz of an upstream whose probe connection speaks
    # HTTP/2; the checks in between are PINGs (None: every check is a /readyz).
    readiness_interval: float | None = None
    _readyz_at: dict[Address, float] = attrs.field(factory=dict, alias="_readyz_at")
    _readyz_due: set[Address] = attrs.field(factory=set, alias="_readyz_due")
    _tasks: dict[Address, trio.CancelScope] = attrs.field(factory=dict, alias="_tasks")
    _naps: dict[Address, trio.CancelScope] = attrs.field(factory=dict, alias="_naps")
    inconclusive_total: int = 0
    _nursery: trio.Nursery | None = attrs.field(default=None, alias="_nursery")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.sync()
            task_status.started()
            try:
                kinds = (*MEMBERSHIP, ChangeKind.SUSPECT, ChangeKind.DISCOVERED)
                with self.changes.subscribe(self._on_change, *kinds):
                    await trio.sleep_forever()
            finally:
                self._nursery = None
                with trio.CancelScope(shield=True):
                    await self.prober.aclose()

    def _on_change(self, change: Change) -> None:
        if change.kind in (ChangeKind.SUSPECT, ChangeKind.DISCOVERED):
            self.poke(change.address)
        else:
            self.sync()

    def sync(self) -> None:
        """Start probing new upstreams, stop probing removed ones."""
        if self._nursery is None:
            return
        current = set(self.pool.addresses())
        for address in list(self._tasks):
            if address not in current:
                self._tasks.pop(address).cancel()
                self._readyz_at.pop(address, None)
                self._readyz_due.discard(address)
                self._nursery.start_soon(self.prober.forget, address)
        for address in current:
            if address not in self._tasks:
                scope = trio.CancelScope()
                self._tasks[address] = scope
                self._nursery.start_soon(self._loop, address, scope)

    async def _loop(self, address: Address, scope: trio.CancelScope) -> None:
        with scope:
            added = trio.current_time()
            warned = False
            retried = False
            while True:
                result = await self.check_once(address, may_retry=not retried)
                retried = result.retry
                waited = trio.current_time() - added
                warned = warned or self._warn_never_healthy(address, waited)
                with trio.move_on_after(self._next_delay(address, result)) as nap:
                    self._naps[address] = nap
                    await self.prober.idle(address)
                    # The connection ended (GOAWAY, or closed): /readyz at once.
                    self._readyz_due.add(address)
                self._naps.pop(address, None)

    def _next_delay(self, address: Address, result: ProbeResult) -> float:
        """Seconds to the next check: soon when kap was busy or a failure wants confirming."""
        if result.retry or result.ping_missed:
            return 0.0  # a new connection, or the wait for the ack was the pause
        soon = self.pool.confirm_delay(
            address,
            failed=not result.ok,
            waited=result.open_timed_out,
            inconclusive=result.inconclusive,
            interval=self.interval,
            timeout=self.timeout,
        )
        if soon is not None:
            return soon
        return next_delay(self.interval, self.jitter, self.rng.uniform(-1, 1))

    def _warn_never_healthy(self, address: Address, waited: float) -> bool:
        """Publish ``NEVER_HEALTHY`` once a new upstream has failed for long; True once done."""
        up = self.pool.get(address)
        if up is None or up.probed_ok or waited < NEVER_HEALTHY_INTERVALS * self.interval:
            return up is not None and up.probed_ok
        why = f"not healthy {waited:.0f}s after it was added: {up.last_error}"
        self.changes.publish([Change(address, ChangeKind.NEVER_HEALTHY, why)])
        return True

    def poke(self, address: Address) -> None:
        """``/readyz`` of ``address`` now (a failed dial, a changed slice): wakes its task."""
        if address in self._tasks:
            self._readyz_due.add(address)
        nap = self._naps.get(address)
        if nap is not None:
            nap.cancel()

    async def check_once(self, address: Address, *, may_retry: bool = True) -> ProbeResult:
        """The next check of ``address``: a ``/readyz`` or a PING, as ``next_check`` says."""
        readyz_at = self._readyz_at.get(address)
        kind = next_check(
            protocol=self.prober.open_protocol(address),
            readyz_due=address in self._readyz_due,
            since_readyz=None if readyz_at is None else trio.current_time() - readyz_at,
            interval=self.interval,
            readiness_interval=self.readiness_interval or self.interval,
        )
        if kind == PING:
            return await self.ping_once(address, may_retry=may_retry)
        return await self.probe_once(address, may_retry=may_retry)

    async def ping_once(self, address: Address, *, may_retry: bool = True) -> ProbeResult:
        """PING ``address``'s HTTP/2 probe connection within the timeout; apply the result.

        A PING not acked in time is a failed check, and closes the
        connection; a ``/readyz`` on a new one follows at once.
        """
        start = trio.current_time()
        result: ProbeResult | None = None
        deadline = start + self.timeout
        with trio.move_on_at(deadline):
            result = await self.prober.ping(address)
        if result is None:
            result = await self._timed_out(
                address, deadline, start, f"no PING ack within {self.timeout * 1e3:g}ms"
            )
            result = attrs.evolve(result, ping_missed=not result.inconclusive)
        return self._apply(address, result, start, may_retry=may_retry, readyz=False)

    async def probe_once(self, address: Address, *, may_retry: bool = True) -> ProbeResult:
        """Probe ``address`` and apply the result to the pool.

        Two steps, two deadlines: open the connection (when there is no
        kept-alive one) within the open budget, then ``GET /readyz`` within
        the timeout. Either deadline passing is a failed probe and closes the
        connection; the next probe opens a new one before its request.

        A deadline noticed late, because kap's own loop was busy past it, says
        nothing about the upstream: the probe is *inconclusive*, not recorded,
        and repeated soon (an upstream must never be marked down because kap
        was busy).
        """
        start = trio.current_time()
        result: ProbeResult | None = None
        opened = False
        budget = open_budget(self.interval, self.timeout)
        open_deadline = start + budget
        with trio.move_on_at(open_deadline):
            result = await self.prober.open(address)
            opened = True
        if not opened:
            budget_ms = budget * 1e3
            result = await self._timed_out(
                address, open_deadline, start, f"connection not open within {budget_ms:g}ms"
            )
            result = attrs.evolve(result, open_timed_out=not result.inconclusive)
        elif result is None:
            deadline = trio.current_time() + self.timeout
            with trio.move_on_at(deadline):
                result = await self.prober.request(address)
            if result is None:
                result = await self._timed_out(
                    address, deadline, start, f"timeout after {self.timeout * 1e3:g}ms"
                )
        return self._apply(address, result, start, may_retry=may_retry, readyz=True)

    def _apply(
        self, address: Address, result: ProbeResult, start: float, *, may_retry: bool, readyz: bool
    ) -> ProbeResult:
        """Record a check's result in the pool, and whether a ``/readyz`` is due next.

        A GOAWAY(NO_ERROR) before the answer is not recorded (``retry``),
        unless the check before was one too (``may_retry`` false): an
        apiserver that sends nothing else fails its checks.
        """
        if result.retry and not may_retry:
            result = attrs.evolve(result, retry=False, error=f"{result.error} twice in a row")
        if result.inconclusive or result.retry:
            self._readyz_due.add(address)
            return result
        if result.ok and readyz:
            self._readyz_at[address] = start
            self._readyz_due.discard(address)
        elif not result.ok and address in self._tasks:
            self._readyz_due.add(address)
        log = logger.bind(upstream=str(address), check=READYZ if readyz else PING)
        if result.ok:
            latency_ms = None if result.latency is None else round(result.latency * 1e3, 3)
            log.debug("probe ok", status=result.status, latency_ms=latency_ms)
        else:
            log.debug("probe failed", error=result.error)
        changes = self.pool.record_probe(
            address,
            ok=result.ok,
            now=trio.current_time(),
            latency=result.latency,
            duration=trio.current_time() - start,
            error=result.error,
            auth_refused=result.auth_refused,
            answered=result.status is not None,
        )
        if (up := self.pool.get(address)) is not None and readyz:
            auth = not result.presented_none
            up.stats.probe_results[
                classify(status=result.status, timed_out=result.timed_out, authenticated=auth)
            ] += 1
        elif up is not None:
            up.stats.ping_results[classify_ping(ok=result.ok, timed_out=result.timed_out)] += 1
        self.changes.publish(changes)
        return result

    async def _timed_out(
        self, address: Address, deadline: float, start: float, error: str
    ) -> ProbeResult:
        """The result of a step that ran out of time: failed, or inconclusive if kap was late."""
        late = trio.current_time() - deadline
        await self.prober.forget(address)
        if late > max(LOOP_LAG_TOLERANCE, self.timeout / 2):
            self.inconclusive_total += 1
            logger.bind(upstream=str(address), late_ms=round(late * 1e3, 1)).debug(
                "probe timed out while kap's loop was busy; not counted"
            )
            return ProbeResult(ok=False, inconclusive=True, error="kap's loop was busy")
        return ProbeResult(
            ok=False, duration=trio.current_time() - start, error=error, timed_out=True
        )
