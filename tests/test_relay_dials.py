"""Dialing through the pump: ``Relay.relay(..., connect_by=...)`` and its deadlines.

The connecting upstream socket waits in the pump's epoll set; its deadline
waits in a heap (kap/relay/dials.py). A listener whose accept queue is full
drops further SYNs, so a dial to it hangs.
"""

from __future__ import annotations

import os
import socket
import weakref

import pytest
import trio
import trio.lowlevel
import trio.testing
from relaytest import (
    Wire,
    connecting_socket,
    epoll_registrations,
    fill_accept_queue,
    make_wire,
    relayed,
    running_relay,
    serve,
    tcp_pair,
    wait_for,
)

from kap.relay import (
    DialFailed,
    DialFailure,
    Outcome,
    Relay,
    Relayed,
    RelayResult,
)


async def test_dial_through_the_pump_connects_then_relays_both_ways() -> None:
    client_end, csock = tcp_pair()
    csock.setblocking(False)
    client = trio.SocketStream(trio.socket.from_stdlib_socket(client_end))
    with socket.create_server(("127.0.0.1", 0)) as listener, trio.fail_after(10):
        async with running_relay() as relay, trio.open_nursery() as n:
            await client.send_all(b"sent before the upstream answered")
            usock = connecting_socket(listener.getsockname())
            results: list[Outcome] = []

            async def caller() -> None:
                try:
                    results.append(
                        await relay.relay(csock, usock, connect_by=trio.current_time() + 5)
                    )
                finally:
                    csock.close()
                    usock.close()

            n.start_soon(caller)
            await wait_for(lambda: relay.dialing == 0)
            end, _ = listener.accept()
            upstream = trio.SocketStream(trio.socket.from_stdlib_socket(end))
            assert await upstream.receive_some(100) == b"sent before the upstream answered"
            await upstream.send_all(b"answer")
            assert await client.receive_some(100) == b"answer"
            await client.send_eof()
            assert await upstream.receive_some(100) == b""
            await upstream.aclose()
            assert await client.receive_some(100) == b""
            await client.aclose()
        assert [relayed(r) for r in results] == [RelayResult(33, 6)]
        assert isinstance(results[0], Relayed) and results[0].connected_at is not None
        assert relay.dialing == 0 and relay._by_fd == {}


async def test_refused_dial_through_the_pump_leaves_the_client_for_the_next_try() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        refused = s.getsockname()  # bound, not listening
        w = make_wire()
        with trio.fail_after(10):
            async with running_relay() as relay:
                await w.client.send_all(b"kept for the next upstream")
                dead = connecting_socket(refused)
                try:
                    result = await relay.relay(w.csock, dead, connect_by=trio.current_time() + 5)
                finally:
                    dead.close()
                assert result == DialFailed(DialFailure.ERROR, "Connection refused")
                assert relay.active == 0 and relay.dialing == 0
                assert epoll_registrations(relay) == 0
                # The client socket is untouched: the next upstream gets its bytes.
                assert await serve_and_check(relay, w) == RelayResult(26, 0)


async def serve_and_check(relay: Relay, w: Wire) -> RelayResult:
    async with trio.open_nursery() as n:
        results: list[RelayResult] = []

        async def run() -> None:
            results.append(await serve(relay, w))

        n.start_soon(run)
        assert await w.upstream.receive_some(100) == b"kept for the next upstream"
        await w.upstream.send_eof()
        await w.client.send_eof()
        assert await w.client.receive_some(100) == b""
        assert await w.upstream.receive_some(100) == b""
    await w.aclose_ends()
    return results[0]


async def test_dial_through_the_pump_times_out_at_connect_by() -> None:
    # A listener whose accept queue is full drops further SYNs: a connect hangs.
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        queued = fill_accept_queue(full)
        w = make_wire()
        with trio.fail_after(10):
            async with running_relay() as relay:
                hanging = [connecting_socket(full.getsockname()) for _ in range(3)]
                results: dict[int, Outcome] = {}
                started = trio.current_time()

                async def dial(i: int, after: float) -> None:
                    results[i] = await relay.relay(
                        socket.socket(fileno=os.dup(w.csock.fileno())) if i else w.csock,
                        hanging[i],
                        connect_by=started + after,
                    )
                    assert trio.current_time() - started == pytest.approx(after, abs=0.15)

                async with trio.open_nursery() as n:
                    # Later deadlines first: the expiry task must wake for the earliest.
                    for i, after in ((0, 0.6), (1, 0.4), (2, 0.2)):
                        n.start_soon(dial, i, after)
                for sock in hanging:
                    sock.close()
                assert set(results.values()) == {
                    DialFailed(DialFailure.TIMEOUT, "connect timed out")
                }
                assert relay.active == 0 and relay.dialing == 0
        for s in queued:
            s.close()
        w.csock.close()
        w.usock.close()
        await w.aclose_ends()


async def test_cancelled_dial_through_the_pump_unregisters_the_upstream() -> None:
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        queued = fill_accept_queue(full)
        w = make_wire()
        with trio.fail_after(10):
            async with running_relay() as relay:
                hanging = connecting_socket(full.getsockname())
                with trio.move_on_after(0.2) as scope:
                    await relay.relay(w.csock, hanging, connect_by=trio.current_time() + 5)
                assert scope.cancelled_caught
                assert relay.active == 0 and relay.dialing == 0
                assert epoll_registrations(relay) == 0
                hanging.close()
        for s in queued:
            s.close()
        w.csock.close()
        w.usock.close()
        await w.aclose_ends()


async def test_a_dial_that_connected_leaves_no_session_alive_in_the_deadline_heap() -> None:
    """Its deadline is far off, so its heap entry stays; the session must not stay with it."""
    with socket.create_server(("127.0.0.1", 0)) as listener, trio.fail_after(10):
        async with running_relay() as relay:
            w = make_wire()
            usock = connecting_socket(listener.getsockname())
            gone = weakref.ref(usock)
            async with trio.open_nursery() as n:
                results: list[Outcome] = []

                async def caller(usock: socket.socket = usock) -> None:
                    try:
                        results.append(
                            await relay.relay(w.csock, usock, connect_by=trio.current_time() + 60)
                        )
                    finally:
                        usock.close()

                n.start_soon(caller)
                del usock
                end, _ = await trio.socket.from_stdlib_socket(listener).accept()
                upstream = trio.SocketStream(end)
                await w.client.send_eof()
                assert await upstream.receive_some(10) == b""
                await upstream.aclose()
            assert relayed(results[0]) == RelayResult(0, 0)
            assert relay.dialing == 0
            del n, caller
            assert gone() is None
            w.csock.close()
            w.usock.close()
            await w.aclose_ends()
