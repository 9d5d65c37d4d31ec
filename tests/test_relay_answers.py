"""The passive first-byte check: an upstream that leaves a client's first bytes unanswered.

The relay times the upstream's first byte from the client's first bytes and
reports sessions past the budget (``Relay.unanswered``) without ending them;
the proxy counts each against its upstream. Real sockets on 127.0.0.1, real
TLS to the fake apiserver.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator

import trio
from fakeapi import PkiFiles
from kaptest import StartFake, wait_until
from relaytest import Wire, make_wire, relayed

from kap.address import Address
from kap.events import Change, ChangeKind
from kap.pool import Pool
from kap.proxy import Proxy
from kap.relay import Relay, RelayResult, Unanswered
from kap.sockets import TcpOptions

# Short enough for a test on the real clock; a missing answer on loopback is
# a silent upstream, never a slow one, so the budget may be small there.
BUDGET = 0.05
# Where a test shows that nothing is reported: answered or idle sessions keep
# no deadline, so any wait shows it; this one is several budgets long.
QUIET = 4 * BUDGET


@contextlib.asynccontextmanager
async def relay_with_budget(budget: float = BUDGET) -> AsyncIterator[Relay]:
    relay = Relay(answer_budget=budget)
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.run)
        yield relay
        nursery.cancel_scope.cancel()


async def serve_tagged(relay: Relay, wire: Wire, tag: object, into: list[RelayResult]) -> None:
    try:
        into.append(relayed(await relay.relay(wire.csock, wire.usock, tag=tag)))
    finally:
        wire.csock.close()
        wire.usock.close()


async def nothing_reported(relay: Relay) -> bool:
    with trio.move_on_after(QUIET):
        await relay.unanswered()
        return False
    return True


async def test_silent_upstream_is_reported_once_and_the_session_goes_on() -> None:
    with trio.fail_after(10):
        async with relay_with_budget() as relay, trio.open_nursery() as n:
            w = make_wire()
            results: list[RelayResult] = []
            n.start_soon(serve_tagged, relay, w, "silent", results)
            await w.client.send_all(b"\x16hello")
            assert await w.upstream.receive_some(100) == b"\x16hello"  # read, not answered
            [event] = await relay.unanswered()
            assert event.tag == "silent" and event.waited >= BUDGET
            assert isinstance(event, Unanswered)
            assert relay.awaiting_answer == 0 and relay.active == 1
            # Not closed: a late answer still reaches the client, and is not reported.
            await w.upstream.send_all(b"late")
            assert await w.client.receive_some(100) == b"late"
            await w.client.send_all(b"more")
            assert await w.upstream.receive_some(100) == b"more"
            assert await nothing_reported(relay)
            await w.aclose_ends()
        assert results[0].bytes_down == 4


async def test_answered_idle_and_server_first_sessions_are_never_reported() -> None:
    with trio.fail_after(10):
        async with relay_with_budget() as relay, trio.open_nursery() as n:
            results: list[RelayResult] = []
            answered, idle, server_first = make_wire(), make_wire(), make_wire()
            for tag, w in (("answered", answered), ("idle", idle), ("first", server_first)):
                n.start_soon(serve_tagged, relay, w, tag, results)
            await server_first.upstream.send_all(b"banner")
            assert await server_first.client.receive_some(100) == b"banner"
            await answered.client.send_all(b"ping")
            assert await answered.upstream.receive_some(100) == b"ping"
            await answered.upstream.send_all(b"pong")
            assert await answered.client.receive_some(100) == b"pong"
            await server_first.client.send_all(b"hi")
            assert await server_first.upstream.receive_some(100) == b"hi"
            assert relay.awaiting_answer == 0  # no deadline is left to pass
            assert await nothing_reported(relay)
            for w in (answered, idle, server_first):
                await w.aclose_ends()


async def test_a_session_that_ends_while_waiting_leaves_no_deadline() -> None:
    with trio.fail_after(10):
        async with relay_with_budget(budget=3600.0) as relay, trio.open_nursery() as n:
            results: list[RelayResult] = []
            ended, cancelled = make_wire(), make_wire()
            scope = trio.CancelScope()

            async def cancellable() -> None:
                with scope:
                    await serve_tagged(relay, cancelled, "cancelled", results)

            n.start_soon(serve_tagged, relay, ended, "ended", results)
            n.start_soon(cancellable)
            for w in (ended, cancelled):
                await w.client.send_all(b"x")
                assert await w.upstream.receive_some(10) == b"x"
            assert relay.awaiting_answer == 2
            await ended.aclose_ends()  # both ways end: the session is over
            await wait_until(lambda: relay.awaiting_answer == 1)
            scope.cancel()
            await wait_until(lambda: relay.active == 0)
            assert relay.awaiting_answer == 0
            await cancelled.aclose_ends()


async def test_without_a_budget_nothing_is_timed() -> None:
    with trio.fail_after(10):
        relay = Relay()
        async with trio.open_nursery() as n:
            await n.start(relay.run)
            w = make_wire()
            results: list[RelayResult] = []
            n.start_soon(serve_tagged, relay, w, "x", results)
            await w.client.send_all(b"x")
            assert await w.upstream.receive_some(10) == b"x"
            assert (relay.answer_budget, relay.awaiting_answer) == (None, 0)
            await w.aclose_ends()
            await wait_until(lambda: relay.active == 0)
            n.cancel_scope.cancel()


async def silent_upstream(nursery: trio.Nursery) -> Address:
    """An upstream that accepts and reads but never writes; closes after the client's FIN."""
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(16)

    async def serve() -> None:
        with listener:
            while True:
                conn, _ = await listener.accept()
                nursery.start_soon(drain, conn)

    async def drain(conn: trio.socket.SocketType) -> None:
        with conn:
            while await conn.recv(4096):
                pass

    nursery.start_soon(serve)
    return Address("127.0.0.1", int(listener.getsockname()[1]))


def proxy_to(address: Address, relay: Relay, changes: list[Change]) -> tuple[Pool, Proxy]:
    pool = Pool()
    pool.set_source("flag", [address], now=trio.current_time())
    pool.record_probe(address, ok=True, latency=1e-4, now=trio.current_time())
    proxy = Proxy("127.0.0.1", 0, pool, relay, TcpOptions(), 5.0, on_changes=changes.extend)
    return pool, proxy


async def test_proxy_makes_a_silent_upstream_suspect_and_keeps_the_connection() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            silent = await silent_upstream(nursery)
            relay = Relay(answer_budget=BUDGET)
            changes: list[Change] = []
            pool, proxy = proxy_to(silent, relay, changes)
            await nursery.start(relay.run)
            bound = await nursery.start(proxy.run)
            client = await trio.open_tcp_stream(bound.host, bound.port)
            await client.send_all(b"\x16\x03\x01hello")
            await wait_until(lambda: any(c.kind is ChangeKind.SUSPECT for c in changes))
            [suspect] = [c for c in changes if c.kind is ChangeKind.SUSPECT]
            assert suspect.address == silent
            assert suspect.reason == "no answer within 50ms of the client's first bytes"
            up = pool.get(silent)
            assert up is not None and up.suspect
            assert proxy.stats.passive_failures_total == 1
            assert proxy.active == 1  # left open: the client's timeout decides
            # The client gives up; the upstream then closes unanswered within a
            # second, which the end-of-connection judgement would count too: once.
            await client.aclose()
            await wait_until(lambda: proxy.active == 0)
            assert proxy.stats.passive_failures_total == 1
            assert relay.awaiting_answer == 0
            nursery.cancel_scope.cancel()


async def test_raw_and_tls_clients_of_a_fake_apiserver_never_trigger_it(
    nursery: trio.Nursery, start_fake: StartFake, pki: PkiFiles
) -> None:
    fake = await start_fake("a")
    relay = Relay(answer_budget=BUDGET)
    changes: list[Change] = []
    _pool, proxy = proxy_to(Address(fake.address[0], fake.address[1]), relay, changes)
    await nursery.start(relay.run)
    bound = await nursery.start(proxy.run)
    with trio.fail_after(10):
        raw = await trio.open_tcp_stream(bound.host, bound.port)
        await raw.send_all(b"WHO\n")
        assert await raw.receive_some(100) == b"a\n"
        context = ssl.create_default_context(cafile=str(pki.ca_file))
        tls = trio.SSLStream(
            await trio.open_tcp_stream(bound.host, bound.port),
            context,
            server_hostname="localhost",
        )
        await tls.do_handshake()
        assert relay.awaiting_answer == 0  # both answered: no deadline left to pass
        await trio.sleep(QUIET)  # the proxy's task takes what the relay reports
        assert proxy.stats.passive_failures_total == 0
        assert not [c for c in changes if c.kind is ChangeKind.SUSPECT]
        await raw.aclose()
        await tls.aclose()
