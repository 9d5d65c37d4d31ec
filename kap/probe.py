"""One health check of an upstream: HTTPS ``GET /readyz`` or an HTTP/2 PING.

``Prober`` keeps one connection per upstream alive between checks and does
one step at a time (open the connection, one request, one PING); it has no
deadlines of its own: ``kap.probe_schedule`` decides when each check runs
and puts each step under its own cancel scope. ``describe_error`` turns a
probe's (or discovery's) exception into one short line.

What the latency is: the time from sending the request to receiving the
response headers on the open connection: one round trip plus the apiserver's
own answer time (an apiserver 40 ms away shows about 40 ms). It leaves out
the TCP connect and the TLS handshake, and with them kap's CPU spent on a
handshake (6.4 ms of CPU per new TLS connection here), which on a busy node
would scatter upstreams over random tiers. Connections are kept alive between
probes, which also spares that CPU on every probe. A PING's latency is its
round trip alone (no handler time).
"""

from __future__ import annotations

import contextlib
import ssl

import attrs
import h11
import trio
from loguru import logger

from kap.address import Address
from kap.credentials import CredentialFiles
from kap.probe_connection import Http11Connection, ProbeProtocolError, open_tls
from kap.probe_h2 import ALPN_H2, GoAway, Http2Connection

READYZ_PATH = "/readyz"
# 401/403: the apiserver answered, so it is alive; only kap's credentials are
# refused (anonymous auth off, or RBAC). Counted as healthy, reported once.
AUTH_REFUSED = (401, 403)
# Closing a kept-alive probe connection is a TLS close_notify at most: 100 ms
# is plenty on loopback and bounds it when the peer is hung.
CLOSE_DEADLINE = 0.1

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
