"""The data path: accept clients, pick and dial an upstream, hand both sockets to the relay.

``Proxy.run`` owns the listener and the *forwarding nursery*. Every client
connection is one task in that nursery with a cancel scope of its own
(``Connection.scope``): it picks, dials with failover, waits on the relay, and
closes both sockets however it ends. The dial's wait is the relay's: the task
begins a non-blocking connect and hands the connecting socket to the pump,
which watches it in its own epoll set, enforces the dial deadline and starts
relaying once it connects, so the task sleeps once per upstream it tries. What
happened comes back as the relay's typed outcome (kap/relay/outcome.py): the
pump calls nobody back, so the task counts the connection as its upstream's
from the start of each dial (``Proxy.connections_to``, the pool's counts).
Cancelling the scope (drain of an upstream, removal, shutdown) ends exactly
that connection. A nursery per connection would hold exactly one child
here; the task's own scope gives the same ownership without the cost.

One thing is learnt while a connection goes on: an upstream that sent
nothing within the relay's answer budget after the client's first bytes (the
passive first-byte check). The relay batches those (``Relay.unanswered``,
each named by its ``Connection``) and one task of ``Proxy.run`` counts each
against its upstream, as a failed dial is; the connection itself is left to
the client's own timeout and to drains.

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
from kap.pool import Change, Pool, Upstream
from kap.relay import DialFailed, DialFailure, Ending, Relay, Relayed, RelayResult, Side
from kap.sockets import (
    ACCEPT_CAPACITY_ERRORS,
    ACCEPT_SKIP_ERRORS,
    LocalResourceError,
    TcpOptions,
    bind_listener,
    ip_target,
    local_address,
    resolve,
    start_connect,
)

# How long accept() sleeps after running out of fds: trio's serve_listeners.
ACCEPT_BACKOFF = 0.1
# A connection that the upstream closes this soon without answering counts
# against it: a TLS handshake with a live apiserver answers in milliseconds.
SHORT_LIVED = 1.0
# Connections accepted per wake-up before yielding to other tasks (probes).
ACCEPT_BATCH = 64


@attrs.define(eq=False)
class Connection:
    """One client connection's lifetime: its cancel scope and where it goes.

    ``upstream`` is the upstream being dialed or relayed to. The connection is
    tracked (``Proxy.connections_to``, the pool's connection counts) from the
    start of each dial, so draining or removing an upstream also cancels the
    clients still connecting to it, and the relay never calls back.
    """

    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    upstream: Address | None = None
    failed_dials: int = 0
    unanswered: bool = False  # counted against its upstream while relaying


@attrs.define
class ProxyStats:
    accepted_total: int = 0
    no_upstream_total: int = 0
    passive_failures_total: int = 0
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
        listener = bind_listener(self.host, self.port, options=self.options)
        try:
            bound = local_address(listener)
            async with trio.open_nursery() as own:
                if self.relay.answer_budget is not None:
                    own.start_soon(self._count_unanswered, self.relay.answer_budget)
                async with trio.open_nursery() as forwarding:
                    self._nursery = forwarding
                    task_status.started(bound)
                    with self._accepting:
                        await self._accept_loop(listener, forwarding)
                    # Take over what already sits in the accept queue, then close:
                    # closing a listener resets its queued connections (unless the
                    # kernel migrates them to a sibling SO_REUSEPORT listener,
                    # net.ipv4.tcp_migrate_req=1). New clients are refused from now.
                    self._accept_pending(listener, forwarding)
                    listener.close()
                    logger.bind(address=str(bound)).info("stopped accepting")
                own.cancel_scope.cancel()
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
            else:
                # A full batch: more may be queued; let the others run first.
                # (A drained queue needs no extra yield: wait_readable is one.)
                await trio.lowlevel.cancel_shielded_checkpoint()

    def _accept_pending(self, listener: socket.socket, forwarding: trio.Nursery) -> None:
        while True:
            try:
                client, _peer = listener.accept()
            except OSError:
                return
            self.stats.accepted_total += 1
            forwarding.start_soon(self._serve, client)

    async def _serve(self, client: socket.socket) -> None:
        """One client: dial the candidates in order until one connects, relay, judge.

        The pick comes first; the rest of the candidate list (other usable
        upstreams, the default Service, every other upstream) is asked of the
        pool only after the first failed dial, without the pick. One coroutine
        frame on purpose: this task sleeps for the connection's whole life, and
        every nested frame costs an idle connection a few hundred bytes.
        """
        conn = Connection()
        later: list[Address] | None = None  # the rest of the candidates, reversed
        try:
            with conn.scope:
                # The TCP options came with the socket from the listener (bind_listener).
                client.setblocking(False)
                address = _address_of(self.pool.pick())
                if address is None:
                    later = self.pool.candidates()[::-1]  # nothing usable: Service, the rest
                    address = later.pop() if later else None
                while address is not None:
                    sock: socket.socket | None = None
                    try:
                        sock = start_connect(
                            ip_target(address) or await resolve(address), self.options
                        )
                        self._track(conn, address)
                        result = await self.relay.relay(
                            client,
                            sock,
                            connect_by=trio.current_time() + self.dial_timeout,
                            tag=conn,
                        )
                    except LocalResourceError as e:
                        # Out of fds here: no upstream is to blame; this client
                        # waits for nothing better, so close it (counted, logged).
                        self.stats.accept_errors_total += 1
                        logger.bind(error=e.strerror).error("cannot dial: out of resources")
                        return
                    except OSError as e:  # DialError included: refused at once, unresolved
                        result = DialFailed(DialFailure.ERROR, _dial_reason(e))
                    finally:
                        if conn.upstream is not None:
                            self._untrack(conn)
                        if sock is not None:
                            sock.close()
                    if isinstance(result, Relayed):
                        self._finished(conn, address, result)
                        return
                    self._dial_failed(conn, address, result)
                    if later is None:  # the first failure: the pick is the one tried
                        later = [a for a in self.pool.candidates() if a != address][::-1]
                    address = later.pop() if later else None
                self.stats.no_upstream_total += 1
                logger.bind(tried=conn.failed_dials).warning(
                    "no upstream answered; closing the client"
                )
        except OSError as e:
            # A socket of this connection failed outside the relay (setsockopt
            # on a client that already left): this connection only.
            logger.bind(error=str(e)).debug("connection failed")
        finally:
            client.close()

    def _dial_failed(self, conn: Connection, address: Address, failed: DialFailed) -> None:
        """Every failed dial counts against its upstream (passive health)."""
        if failed.reason is DialFailure.TIMEOUT:
            why = f"timeout after {self.dial_timeout:g}s"
        else:
            why = failed.error
        logger.bind(upstream=str(address), error=why).debug("dial failed")
        conn.failed_dials += 1
        changes = self.pool.record_dial_failure(address, now=trio.current_time(), error=why)
        if changes:
            self.on_changes(changes)

    def _finished(self, conn: Connection, address: Address, relayed: Relayed) -> None:
        result = relayed.result
        if relayed.connected_at is not None:
            if conn.failed_dials:
                self.stats.failovers_total += 1
            if not conn.unanswered:  # else counted against its upstream already
                self._judge(address, result, trio.current_time() - relayed.connected_at)
        # Keyword fields, not bind(): loguru drops a debug record before
        # building anything, bind() would build a logger per connection.
        logger.debug(
            "connection closed",
            upstream=address,
            bytes_up=result.bytes_up,
            bytes_down=result.bytes_down,
            error=result.error,
        )

    def _judge(self, address: Address, result: RelayResult, lifetime: float) -> None:
        """Passive health: what a finished connection says about its upstream.

        An upstream that reset the connection, or that took a client's bytes and
        closed within ``SHORT_LIVED`` seconds without a byte back (an apiserver
        dying or refusing at the TLS layer), is counted like a failed dial.
        A client's own reset or early close is not the upstream's fault.
        """
        if result.errored_side is Side.UPSTREAM:
            why = result.error or "upstream error"
        elif (
            result.ending is Ending.CLOSED
            and result.bytes_down == 0
            and result.bytes_up > 0
            and lifetime < SHORT_LIVED
        ):
            why = "upstream closed without answering"
        else:
            return
        self.stats.passive_failures_total += 1
        changes = self.pool.record_passive_failure(address, now=trio.current_time(), error=why)
        if changes:
            self.on_changes(changes)

    async def _count_unanswered(self, budget: float) -> None:
        """Passive health while connections go on: the relay's unanswered first bytes.

        An apiserver answers a TLS ClientHello at once, so a client's first
        bytes left without a byte back for ``budget`` seconds say the
        upstream is hung (SIGSTOPped, black-holed past the handshake,
        overloaded): it turns suspect, as after a failed dial, and the
        suspect change makes the probe scheduler probe it at once. Counted
        once per connection; the connection is not closed.
        """
        why = f"no answer within {budget * 1000:g}ms of the client's first bytes"
        while True:
            batch = await self.relay.unanswered()
            now = trio.current_time()
            changes: list[Change] = []
            for event in batch:
                conn = event.tag
                # Untracked: the connection ended meanwhile and was judged then.
                if not isinstance(conn, Connection) or conn.upstream is None:
                    continue
                conn.unanswered = True
                self.stats.passive_failures_total += 1
                logger.debug("upstream did not answer", upstream=conn.upstream, waited=event.waited)
                changes += self.pool.record_passive_failure(conn.upstream, now=now, error=why)
            if changes:
                self.on_changes(changes)

    def _track(self, conn: Connection, address: Address) -> None:
        """``conn`` starts dialing ``address``: it counts as that upstream's from now."""
        conn.upstream = address
        self._by_upstream.setdefault(address, set()).add(conn)
        self.pool.connection_opened(address)

    def _untrack(self, conn: Connection) -> None:
        assert conn.upstream is not None
        conns = self._by_upstream.get(conn.upstream)
        if conns is not None:
            conns.discard(conn)
            if not conns:
                del self._by_upstream[conn.upstream]
        self.pool.connection_closed(conn.upstream)
        conn.upstream = None

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


def _address_of(upstream: Upstream | None) -> Address | None:
    return None if upstream is None else upstream.address


def _dial_reason(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__
