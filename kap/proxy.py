"""The data path: accept clients, pick and dial an upstream, hand both sockets to the relay.

``Proxy.run`` owns the listener and the *forwarding nursery*. Every client
connection is one task in that nursery with a cancel scope of its own
(``Connection.scope``): it picks, dials with failover, waits on the relay, and
closes both sockets however it ends. Cancelling the scope (drain of an
upstream, removal, shutdown) ends exactly that connection. A nursery per
connection would hold exactly one child here; the task's own scope gives the
same ownership without the cost.

Error handling: a connection's failure ends that connection only and is
counted; accept() survives running out of file descriptors (log, back off
100 ms, retry, as trio's serve_listeners does).
"""

from __future__ import annotations

import random
import socket
from collections.abc import Callable

import attrs
import trio
from loguru import logger

from kap.address import Address
from kap.pool import Change, Pool
from kap.relay import Relay
from kap.sockets import (
    ACCEPT_CAPACITY_ERRORS,
    ACCEPT_SKIP_ERRORS,
    DialError,
    TcpOptions,
    bind_listener,
    dial,
    local_address,
)

# How long accept() sleeps after running out of fds: trio's serve_listeners.
ACCEPT_BACKOFF = 0.1
# Connections accepted per wake-up before yielding to other tasks (probes).
ACCEPT_BATCH = 64


@attrs.define(eq=False)
class Connection:
    """One client connection's lifetime: its cancel scope and where it went."""

    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    upstream: Address | None = None
    opened_at: float = 0.0


@attrs.define
class ProxyStats:
    accepted_total: int = 0
    no_upstream_total: int = 0
    failovers_total: int = 0
    accept_errors_total: int = 0


@attrs.define
class Proxy:
    """Listener plus forwarding nursery; see the module docstring."""

    host: str
    port: int
    pool: Pool
    relay: Relay
    options: TcpOptions
    dial_timeout: float
    on_changes: Callable[[list[Change]], None]
    rng: random.Random = attrs.field(factory=random.Random)
    stats: ProxyStats = attrs.field(factory=ProxyStats)
    _by_upstream: dict[Address, set[Connection]] = attrs.field(factory=dict, alias="_by_upstream")
    _accepting: trio.CancelScope = attrs.field(factory=trio.CancelScope, alias="_accepting")
    _nursery: trio.Nursery | None = attrs.field(default=None, alias="_nursery")

    async def run(
        self, *, task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen, accept until ``stop_accepting()``, then wait for open connections."""
        listener = bind_listener(self.host, self.port)
        try:
            bound = local_address(listener)
            async with trio.open_nursery() as forwarding:
                self._nursery = forwarding
                task_status.started(bound)
                with self._accepting:
                    await self._accept_loop(listener, forwarding)
                listener.close()  # refuse new clients at once; open ones go on
                logger.bind(address=str(bound)).info("stopped accepting")
        finally:
            self._nursery = None
            listener.close()

    def stop_accepting(self, grace: float) -> None:
        """Close the listener now; give open connections ``grace`` seconds, then cut them."""
        self._accepting.cancel()
        if self._nursery is not None:
            self._nursery.cancel_scope.deadline = trio.current_time() + grace

    @property
    def active(self) -> int:
        return sum(len(c) for c in self._by_upstream.values())

    async def _accept_loop(self, listener: socket.socket, forwarding: trio.Nursery) -> None:
        while True:
            await trio.lowlevel.wait_readable(listener)
            for _ in range(ACCEPT_BATCH):
                try:
                    client, _peer = listener.accept()
                except BlockingIOError:
                    break
                except OSError as e:
                    self.stats.accept_errors_total += 1
                    if e.errno in ACCEPT_CAPACITY_ERRORS:
                        logger.bind(error=e.strerror).error(
                            "accept failed: out of resources; backing off"
                        )
                        await trio.sleep(ACCEPT_BACKOFF)
                        break
                    if e.errno in ACCEPT_SKIP_ERRORS:
                        continue
                    raise
                self.stats.accepted_total += 1
                forwarding.start_soon(self._serve, client)
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def _serve(self, client: socket.socket) -> None:
        conn = Connection(opened_at=trio.current_time())
        upstream_sock: socket.socket | None = None
        try:
            with conn.scope:
                client.setblocking(False)
                self.options.apply(client)
                upstream_sock = await self._dial_any(conn)
                if upstream_sock is None:
                    return
                assert conn.upstream is not None
                self._track(conn)
                try:
                    result = await self.relay.relay(client, upstream_sock)
                finally:
                    self._untrack(conn)
                logger.bind(upstream=str(conn.upstream)).debug(
                    "connection closed",
                    bytes_up=result.bytes_up,
                    bytes_down=result.bytes_down,
                    error=result.error,
                )
        except OSError as e:
            # A socket of this connection failed outside the relay (setsockopt
            # on a client that already left): this connection only.
            logger.bind(error=str(e)).debug("connection failed")
        finally:
            if upstream_sock is not None:
                upstream_sock.close()
            client.close()

    async def _dial_any(self, conn: Connection) -> socket.socket | None:
        """Dial the candidates in order until one answers; count the failures."""
        candidates = self.pool.candidates()
        for attempt, address in enumerate(candidates):
            try:
                with trio.fail_after(self.dial_timeout):
                    sock = await dial(address, self.options)
            except (DialError, OSError, trio.TooSlowError) as e:
                why = _dial_reason(e, self.dial_timeout)
                logger.bind(upstream=str(address), error=why).debug("dial failed")
                changes = self.pool.record_dial_failure(address, now=trio.current_time(), error=why)
                if changes:
                    self.on_changes(changes)
                continue
            if attempt:
                self.stats.failovers_total += 1
            conn.upstream = address
            return sock
        self.stats.no_upstream_total += 1
        logger.bind(tried=len(candidates)).warning("no upstream answered; closing the client")
        return None

    def _track(self, conn: Connection) -> None:
        assert conn.upstream is not None
        self._by_upstream.setdefault(conn.upstream, set()).add(conn)
        self.pool.connection_opened(conn.upstream)

    def _untrack(self, conn: Connection) -> None:
        assert conn.upstream is not None
        conns = self._by_upstream.get(conn.upstream)
        if conns is not None:
            conns.discard(conn)
            if not conns:
                del self._by_upstream[conn.upstream]
        self.pool.connection_closed(conn.upstream)

    def connections_to(self, address: Address) -> list[Connection]:
        return list(self._by_upstream.get(address, ()))

    async def close_connections(self, address: Address, *, spread: float = 0.0) -> int:
        """Close every open client connection of ``address``, spread over ``spread`` seconds.

        Spreading with jitter keeps a node's clients from reconnecting in one
        burst (watches of kubelet, kube-proxy, CNI agents all at once).
        """
        conns = self.connections_to(address)
        if not conns:
            return 0
        if spread <= 0:
            for c in conns:
                c.scope.cancel()
            return len(conns)
        times = sorted(self.rng.uniform(0, spread) for _ in conns)
        start = trio.current_time()
        for when, c in zip(times, conns, strict=True):
            await trio.sleep_until(start + when)
            c.scope.cancel()
        return len(conns)


def _dial_reason(e: BaseException, timeout: float) -> str:
    if isinstance(e, trio.TooSlowError):
        return f"timeout after {timeout:g}s"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__
