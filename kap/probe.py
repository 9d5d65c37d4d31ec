"""Active health: HTTPS ``GET /readyz`` of every upstream, concurrently, with jitter.

``Prober`` does one probe; ``ProbeScheduler`` owns one task per upstream in
its nursery, each probing at start and then every
``interval * (1 + jitter * U(-1, 1))``. One task per upstream (not rounds)
means a black-holed upstream costs its own timeout and delays nobody else.

What the latency is: the time from sending the request headers to receiving
the response headers, taken from httpcore's trace hooks. It excludes the TCP
connect and the TLS handshake, so it measures the network round trip plus the
apiserver's own answer time, and not kap's CPU spent on a handshake (6.4 ms of
CPU per new TLS connection here, perf-facts.md), which on a busy node would
scatter upstreams over random tiers. Connections are kept alive between
probes, which also makes a probe cost about 1.8 ms of CPU instead of 6.4 ms.
"""

from __future__ import annotations

import random
import ssl
from collections.abc import Callable
from typing import Any

import attrs
import httpx2
import trio
from loguru import logger

from kap.address import Address
from kap.credentials import CredentialFiles
from kap.pool import Change, Pool

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


def next_delay(interval: float, jitter: float, u: float) -> float:
    """Seconds until the next probe; ``u`` is drawn from U(-1, 1)."""
    return max(0.0, interval * (1.0 + jitter * u))


@attrs.frozen
class ProbeResult:
    ok: bool
    status: int | None = None
    latency: float | None = None
    duration: float | None = None
    error: str | None = None
    auth_refused: bool = False
    inconclusive: bool = False  # kap itself was too busy to tell; not recorded


def describe_error(exc: BaseException) -> str:
    """One short line for an exception from a probe, for logs and /upstreams.

    httpx wraps the interesting error (refused, TLS verification, reset) in
    exceptions with empty messages; the first non-empty one in the chain wins.
    """
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in chain and len(chain) < 10:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    for e in chain:
        if isinstance(e, ssl.SSLCertVerificationError):
            return f"TLS verification failed: {e.verify_message}"
    for e in chain:
        if isinstance(e, OSError) and e.strerror:
            return " ".join(e.strerror.split())[:200]
        text = str(e)
        if text and text != "None":
            return " ".join(text.split())[:200]
    return type(exc).__name__


@attrs.define
class Prober:
    """One HTTPS probe of one upstream, over a kept-alive connection per upstream."""

    credentials: CredentialFiles
    server_name: str
    _clients: dict[Address, tuple[int, httpx2.AsyncClient]] = attrs.field(
        factory=dict, alias="_clients"
    )
    _stale: list[httpx2.AsyncClient] = attrs.field(factory=list, alias="_stale")

    def _client(self, address: Address) -> httpx2.AsyncClient:
        ctx = self.credentials.ssl_context()
        entry = self._clients.get(address)
        if entry is not None and entry[0] == self.credentials.generation:
            return entry[1]
        client = httpx2.AsyncClient(
            verify=ctx,
            trust_env=False,  # no proxies or netrc from the environment
            http2=False,
            limits=httpx2.Limits(max_connections=1, max_keepalive_connections=1),
            timeout=None,  # the caller's cancel scope is the deadline
            follow_redirects=False,
        )
        self._clients[address] = (self.credentials.generation, client)
        if entry is not None:
            self._stale.append(entry[1])
        return client

    async def forget(self, address: Address) -> None:
        """Close the kept-alive connection of an upstream (after a failure or its removal).

        Cancellation: shielded, with a short deadline of its own, so a
        cancelled probe still releases its socket.
        """
        entry = self._clients.pop(address, None)
        if entry is not None:
            self._stale.append(entry[1])
        await self._close_stale()

    async def _close_stale(self) -> None:
        with trio.CancelScope(shield=True, deadline=trio.current_time() + CLOSE_DEADLINE):
            while self._stale:
                await self._stale.pop().aclose()

    async def probe(self, address: Address) -> ProbeResult:
        """One ``GET /readyz``. No deadline of its own: the caller's cancel scope is it."""
        client = self._client(address)
        marks: dict[str, float] = {}

        async def trace(name: str, info: dict[str, Any]) -> None:
            marks[name] = trio.current_time()

        extensions: dict[str, Any] = {"trace": trace}
        if self.server_name:
            extensions["sni_hostname"] = self.server_name
        start = trio.current_time()
        try:
            response = await client.get(
                f"https://{address}{READYZ_PATH}",
                headers=self.credentials.headers(),
                extensions=extensions,
            )
        except (httpx2.HTTPError, ssl.SSLError, OSError) as e:
            await self.forget(address)
            return ProbeResult(
                ok=False, error=describe_error(e), duration=trio.current_time() - start
            )
        duration = trio.current_time() - start
        sent = marks.get("http11.send_request_headers.started")
        got = marks.get("http11.receive_response_headers.complete")
        latency = got - sent if sent is not None and got is not None else duration
        status = response.status_code
        if status == 200:
            return ProbeResult(ok=True, status=status, latency=latency, duration=duration)
        if status in AUTH_REFUSED:
            return ProbeResult(
                ok=True,
                status=status,
                latency=latency,
                duration=duration,
                auth_refused=True,
                error=f"HTTP {status}: kap's credentials are refused",
            )
        body = " ".join(response.text.split())[:120]
        return ProbeResult(
            ok=False,
            status=status,
            duration=duration,
            error=f"HTTP {status}" + (f": {body}" if body else ""),
        )

    async def aclose(self) -> None:
        for address in list(self._clients):
            await self.forget(address)


@attrs.define
class ProbeScheduler:
    """Owns one probing task per upstream; ``sync()`` follows the pool's membership."""

    pool: Pool
    prober: Prober
    interval: float
    timeout: float
    jitter: float
    on_changes: Callable[[list[Change]], None]
    rng: random.Random = attrs.field(factory=random.Random)
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
                await trio.sleep_forever()
            finally:
                self._nursery = None
                with trio.CancelScope(shield=True):
                    await self.prober.aclose()

    def sync(self) -> None:
        """Start probing new upstreams, stop probing removed ones."""
        if self._nursery is None:
            return
        current = set(self.pool.addresses())
        for address in list(self._tasks):
            if address not in current:
                self._tasks.pop(address).cancel()
                self._nursery.start_soon(self.prober.forget, address)
        for address in current:
            if address not in self._tasks:
                scope = trio.CancelScope()
                self._tasks[address] = scope
                self._nursery.start_soon(self._loop, address, scope)

    async def _loop(self, address: Address, scope: trio.CancelScope) -> None:
        with scope:
            while True:
                result = await self.probe_once(address)
                up = self.pool.get(address)
                if result.inconclusive or (
                    not result.ok and up is not None and up.score >= 0 and up.probed_ok
                ):
                    # On its way down: confirm quickly (HAProxy's fastinter), so
                    # a hung apiserver leaves rotation within about
                    # interval + 4 x (timeout + fast delay), not 4 intervals.
                    delay = self.fast_delay
                else:
                    delay = next_delay(self.interval, self.jitter, self.rng.uniform(-1, 1))
                with trio.move_on_after(delay) as nap:
                    self._naps[address] = nap
                    await trio.sleep_forever()
                self._naps.pop(address, None)

    @property
    def fast_delay(self) -> float:
        """Pause between confirming probes of a failing upstream."""
        return min(self.interval / 4, self.timeout)

    def poke(self, address: Address) -> None:
        """Probe ``address`` now (a client's dial to it just failed): wakes its task."""
        nap = self._naps.get(address)
        if nap is not None:
            nap.cancel()

    async def probe_once(self, address: Address) -> ProbeResult:
        """Probe ``address`` under the timeout and apply the result to the pool.

        A timeout noticed late, because kap's own loop was busy past the
        deadline, says nothing about the upstream: it is *inconclusive*, not
        recorded, and the probe is repeated soon (an upstream must never be
        marked down because kap was busy).
        """
        start = trio.current_time()
        deadline = start + self.timeout
        result: ProbeResult | None = None
        with trio.move_on_at(deadline):
            result = await self.prober.probe(address)
        if result is None:
            late = trio.current_time() - deadline
            await self.prober.forget(address)
            if late > max(LOOP_LAG_TOLERANCE, self.timeout / 2):
                self.inconclusive_total += 1
                logger.bind(upstream=str(address), late_ms=round(late * 1e3, 1)).debug(
                    "probe timed out while kap's loop was busy; not counted"
                )
                return ProbeResult(ok=False, inconclusive=True, error="kap's loop was busy")
            result = ProbeResult(
                ok=False,
                duration=trio.current_time() - start,
                error=f"timeout after {self.timeout * 1e3:g}ms",
            )
        log = logger.bind(upstream=str(address))
        if result.ok:
            log.debug("probe ok", status=result.status, latency_ms=_ms(result.latency))
        else:
            log.debug("probe failed", error=result.error)
        changes = self.pool.record_probe(
            address,
            ok=result.ok,
            now=trio.current_time(),
            latency=result.latency,
            duration=result.duration,
            error=result.error,
            auth_refused=result.auth_refused,
            answered=result.status is not None,
        )
        if changes:
            self.on_changes(changes)
        return result


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 3)
