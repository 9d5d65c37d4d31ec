"""Active health: HTTPS ``GET /readyz`` of every upstream, concurrently, with jitter.

``Prober`` does one probe; ``ProbeScheduler`` owns one task per upstream in
its nursery, each probing at start and then every
``interval * (1 + jitter * U(-1, 1))``. One task per upstream (not rounds)
means a black-holed upstream costs its own timeout and delays nobody else.

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

What the latency is: the time from sending the request to receiving the
response headers on the open connection: one round trip plus the apiserver's
own answer time (an apiserver 40 ms away shows about 40 ms). It leaves out
the TCP connect and the TLS handshake, and with them kap's CPU spent on a
handshake (6.4 ms of CPU per new TLS connection here), which on a busy node
would scatter upstreams over random tiers. Connections are kept alive between
probes, which also spares that CPU on every probe.
"""

from __future__ import annotations

import contextlib
import random
import ssl

import attrs
import h11
import trio
from loguru import logger

from kap.address import Address
from kap.credentials import CredentialFiles
from kap.events import MEMBERSHIP, Change, ChangeFeed, ChangeKind
from kap.pool import Pool
from kap.probe_connection import Http11Connection, ProbeProtocolError, open_tls
from kap.probe_h2 import ALPN_H2, GoAway, Http2Connection
from kap.probe_results import classify, classify_ping

READYZ_PATH = "/readyz"
# 401/403: the apiserver answered, so it is alive; only kap's credentials are
# refused (anonymous auth off, or RBAC). Counted as healthy, reported once.
AUTH_REFUSED = (401, 403)
# A probe timeout noticed this much (or half the timeout) after its deadline
# means kap's own loop was stalled, not that the upstream was slow: 20 ms is
# far beyond the pump's bounded turn (a few ms) yet well under any timeout
# worth setting.
LOOP_LAG_TOLERANCE = 0.02
# Closing a kept-alive probe connection is a TLS close_notify at most: 100 ms
# is plenty on loopback and bounds it when the peer is hung.
CLOSE_DEADLINE = 0.1
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
# Errors of a probe connection: connect errors (OSError), TLS and resets
# (trio.BrokenResourceError, caused by the ssl.SSLError or OSError), and
# answers that are not HTTP.
PROBE_ERRORS = (
    OSError,
    ssl.SSLError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    h11.LocalProtocolError,
    ProbeProtocolError,
)
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


@attrs.frozen
class ProbeResult:
    ok: bool
    status: int | None = None
    latency: float | None = None
    duration: float | None = None
    error: str | None = None
    auth_refused: bool = False
    inconclusive: bool = False  # kap itself was too busy to tell; not recorded
    open_timed_out: bool = False  # the connection did not open within the open budget
    timed_out: bool = False  # either step ran out of time
    presented_none: bool = False  # kap sent no credentials on purpose (kap.probe_results)
    ping_missed: bool = False  # a PING got no ack within the timeout
    # GOAWAY(NO_ERROR) before the answer: an apiserver closing the connection
    # on purpose; not recorded, the check is repeated at once on a new one.
    retry: bool = False


def describe_error(exc: BaseException) -> str:
    """One short line for an exception from a probe, for logs and /upstreams.

    Wrappers (trio's BrokenResourceError around a TLS error, httpx's errors in
    discovery) often have empty messages; the first non-empty one in the chain
    wins. A certificate that does not verify says "certificate verify failed"
    and why, as OpenSSL and kubectl put it.
    """
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in chain and len(chain) < 10:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    for e in chain:
        if isinstance(e, ssl.SSLCertVerificationError):
            return f"certificate verify failed: {e.verify_message}"
    for e in chain:
        if isinstance(e, OSError) and e.strerror:
            return " ".join(e.strerror.split())[:200]
        text = str(e)
        if text and text != "None":
            return " ".join(text.split())[:200]
    return type(exc).__name__


@attrs.define
class Prober:
    """HTTPS probes of upstreams, over one kept-alive connection per upstream.

    A probe is two steps, each without a deadline of its own (the scheduler
    puts each under its own cancel scope): ``open`` makes sure the upstream
    has an open connection, ``request`` sends one ``GET /readyz`` on it.
    """

    credentials: CredentialFiles
    server_name: str
    _connections: dict[Address, Http11Connection | Http2Connection] = attrs.field(
        factory=dict, alias="_connections"
    )
    # The protocol each upstream's last probe connection negotiated.
    _protocols: dict[Address, str] = attrs.field(factory=dict, alias="_protocols")

    def protocol(self, address: Address) -> str | None:
        """``h2`` or ``http/1.1``: what the upstream's probe connection speaks (None: unknown)."""
        return self._protocols.get(address)

    def open_protocol(self, address: Address) -> str | None:
        """The protocol of the upstream's connection if it is open and reusable, else None."""
        conn = self._connections.get(address)
        return conn.protocol if conn is not None and conn.reusable else None

    async def open(self, address: Address) -> ProbeResult | None:
        """Reuse the upstream's connection, or open a new one.

        A connection is reused while it is idle, still open and made with the
        current credentials (a rotated CA or client certificate reopens it).

        Returns:
          None when the connection is open, else the failed probe.
        """
        context = self.credentials.probe_ssl_context()  # first: it may bump the generation
        conn = self._connections.get(address)
        if isinstance(conn, Http2Connection):
            await conn.catch_up()
        if conn is not None:
            if conn.generation == self.credentials.generation and conn.reusable:
                return None
            await self.forget(address)
            if isinstance(conn, Http2Connection) and conn.goaway:  # an error code
                return ProbeResult(ok=False, error=str(GoAway(conn.goaway)))
        generation = self.credentials.generation
        new: Http11Connection | Http2Connection
        try:
            tls = await open_tls(address, context, self.server_name)
            host = self.server_name or str(address)
            if tls.selected_alpn_protocol() == ALPN_H2:
                new = Http2Connection(tls, host=host, generation=generation)
                self._connections[address] = new  # forget() closes it if start fails
                await new.start()
            else:
                new = Http11Connection(tls, host=host, generation=generation)
        except PROBE_ERRORS as e:
            await self.forget(address)
            return ProbeResult(ok=False, error=describe_error(e))
        self._connections[address] = new
        if self._protocols.get(address) != new.protocol:
            self._protocols[address] = new.protocol
            logger.bind(upstream=str(address), protocol=new.protocol).info(
                "probe connection speaks " + new.protocol
            )
        return None

    async def request(self, address: Address) -> ProbeResult:
        """One ``GET /readyz`` on the connection ``open`` made."""
        conn = self._connections.get(address)
        if conn is None:
            return ProbeResult(ok=False, error="no open connection")
        headers = list(self.credentials.headers().items())
        start = trio.current_time()
        try:
            answer = await conn.get(READYZ_PATH, headers)
        except GoAway as e:
            await self.forget(address)
            return ProbeResult(ok=False, error=str(e), retry=e.graceful)
        except PROBE_ERRORS as e:
            await self.forget(address)
            return ProbeResult(ok=False, error=describe_error(e))
        duration = trio.current_time() - start
        if not conn.reusable:
            await self.forget(address)  # "Connection: close", or closed right after
        status, latency = answer.status, answer.latency
        if status == 200:
            return ProbeResult(ok=True, status=status, latency=latency, duration=duration)
        if status in AUTH_REFUSED:
            return ProbeResult(
                ok=True,
                status=status,
                latency=latency,
                duration=duration,
                auth_refused=True,
                presented_none=not self.credentials.authenticated,
                error=f"HTTP {status}: kap's credentials are refused",
            )
        body = " ".join(answer.body.decode("utf-8", "replace").split())[:120]
        return ProbeResult(
            ok=False,
            status=status,
            duration=duration,
            error=f"HTTP {status}" + (f": {body}" if body else ""),
        )

    async def ping(self, address: Address) -> ProbeResult:
        """One HTTP/2 PING on the connection ``open`` made; its round trip is the latency."""
        conn = self._connections.get(address)
        if not isinstance(conn, Http2Connection):
            return ProbeResult(ok=False, error="no open HTTP/2 connection")
        try:
            rtt = await conn.ping()
        except GoAway as e:
            await self.forget(address)
            return ProbeResult(ok=False, error=str(e), retry=e.graceful)
        except PROBE_ERRORS as e:
            await self.forget(address)
            return ProbeResult(ok=False, error=describe_error(e))
        return ProbeResult(ok=True, latency=rtt, duration=rtt)

    async def idle(self, address: Address) -> None:
        """Wait while the upstream's connection stays open; return when it ends.

        An HTTP/2 connection is read meanwhile (``Http2Connection.idle``), so
        a GOAWAY ends the wait when it comes; an HTTP/1.1 connection or none
        waits forever (the caller's cancel scope ends it).
        """
        conn = self._connections.get(address)
        if isinstance(conn, Http2Connection):
            await conn.idle()
            if not conn.reusable:
                return
        await trio.sleep_forever()

    async def forget(self, address: Address) -> None:
        """Close the kept-alive connection of an upstream (after a failure or its removal).

        Cancellation: shielded, with a short deadline of its own, so a
        cancelled probe still releases its socket.
        """
        conn = self._connections.pop(address, None)
        if conn is None:
            return
        # The socket is closed whatever happens (trio's SSLStream.aclose,
        # cancelled or not); a broken connection has nothing left to tell.
        with (
            trio.CancelScope(shield=True, deadline=trio.current_time() + CLOSE_DEADLINE),
            contextlib.suppress(*PROBE_ERRORS),
        ):
            await conn.aclose()

    async def aclose(self) -> None:
        for address in list(self._connections):
            await self.forget(address)


@attrs.define
class ProbeScheduler:
    """Owns one probing task per upstream; publishes what the probes change (and NEVER_HEALTHY).

    Subscribes to ``ADDED``/``REMOVED`` (start, stop probe tasks) and ``SUSPECT``
    (a client's dial just failed: probe that upstream now).
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
                with self.changes.subscribe(self._on_change, *MEMBERSHIP, ChangeKind.SUSPECT):
                    await trio.sleep_forever()
            finally:
                self._nursery = None
                with trio.CancelScope(shield=True):
                    await self.prober.aclose()

    def _on_change(self, change: Change) -> None:
        if change.kind is ChangeKind.SUSPECT:
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
        """``/readyz`` of ``address`` now (a client's dial to it just failed): wakes its task."""
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
