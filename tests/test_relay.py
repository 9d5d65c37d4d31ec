"""The byte pump (kap/relay/pump.py, direction.py), through real sockets on 127.0.0.1.

Each session is four sockets (see tests/relaytest.py); the test plays the
caller (kap/proxy.py): it hands the two relayed sockets to ``Relay.relay`` and
closes them afterwards. Dialing through the pump: tests/test_relay_dials.py.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import threading
from collections.abc import Callable

import attrs
import pytest
import trio
import trio.lowlevel
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from relaytest import (
    MiB,
    Wire,
    chunks,
    digest_until_eof,
    epoll_registrations,
    fd_count,
    make_wire,
    running_relay,
    send_then_eof,
    serve,
    sha,
    tcp_pair,
)

from kap.relay import (
    BUFFER_SIZE,
    PIPE_POOL_MAX,
    Ending,
    Relay,
    RelayNotRunningError,
    RelayResult,
    Side,
)

# -- bytes arrive intact -------------------------------------------------------


async def test_random_data_arrives_intact_both_ways_through_concurrent_sessions() -> None:
    rng = random.Random(1)
    sessions = 24
    with trio.fail_after(30):
        async with running_relay() as relay:
            wires = [make_wire() for _ in range(sessions)]
            ups = [
                rng.randbytes(rng.choice([0, 1, 100, 70_000, rng.randint(0, MiB)])) for _ in wires
            ]
            downs = [
                rng.randbytes(rng.choice([0, 5, 3000, rng.randint(0, 2 * MiB)])) for _ in wires
            ]
            results: list[RelayResult] = []
            got_up: list[list[str]] = [[] for _ in wires]
            got_down: list[list[str]] = [[] for _ in wires]

            async def one(i: int) -> None:
                w = wires[i]
                async with trio.open_nursery() as n:

                    async def relayed() -> None:
                        results.append(await serve(relay, w))

                    n.start_soon(relayed)
                    n.start_soon(send_then_eof, w.client, chunks(ups[i], rng, 100_000))
                    n.start_soon(send_then_eof, w.upstream, chunks(downs[i], rng, 300_000))
                    n.start_soon(digest_until_eof, w.upstream, got_up[i])
                    n.start_soon(digest_until_eof, w.client, got_down[i])
                await w.aclose_ends()

            async with trio.open_nursery() as n:
                for i in range(sessions):
                    n.start_soon(one, i)

            assert [g[0] for g in got_up] == [sha(d) for d in ups]
            assert [g[0] for g in got_down] == [sha(d) for d in downs]
            assert all(r.error is None and r.errored_side is None for r in results)
            assert all(r.ending is Ending.CLOSED for r in results)
            assert sorted(r.bytes_up for r in results) == sorted(len(d) for d in ups)
            assert sorted(r.bytes_down for r in results) == sorted(len(d) for d in downs)
            assert relay.bytes_up == sum(map(len, ups))
            assert relay.bytes_down == sum(map(len, downs))
            assert relay.active == 0


async def test_request_response_rounds_arrive_in_order() -> None:
    """Many small messages: the short-read shortcut must never strand a byte."""
    rng = random.Random(2)
    with trio.fail_after(30):
        async with running_relay() as relay, trio.open_nursery() as n:
            for _ in range(16):
                w = make_wire()
                n.start_soon(serve, relay, w)

                async def pingpong(w: Wire = w) -> None:
                    for _ in range(150):
                        msg = rng.randbytes(rng.randint(1, 4000))
                        await w.client.send_all(msg)
                        got = b""
                        while len(got) < len(msg):
                            got += await w.upstream.receive_some(65536)
                        assert got == msg
                        await w.upstream.send_all(msg[::-1])
                        got = b""
                        while len(got) < len(msg):
                            got += await w.client.receive_some(65536)
                        assert got == msg[::-1]
                    await w.aclose_ends()

                n.start_soon(pingpong)


@pytest.mark.parametrize("first", ["client", "upstream"])
async def test_half_close_lets_the_other_direction_finish(first: str) -> None:
    rng = random.Random(3)
    with trio.fail_after(20):
        async with running_relay() as relay:
            w = make_wire()
            closer, talker = (w.client, w.upstream) if first == "client" else (w.upstream, w.client)
            request, response = rng.randbytes(10_000), rng.randbytes(3 * MiB)
            got_request: list[str] = []
            got_response: list[str] = []
            results: list[RelayResult] = []
            async with trio.open_nursery() as n:

                async def relayed() -> None:
                    results.append(await serve(relay, w))

                n.start_soon(relayed)
                await send_then_eof(closer, [request])
                # The closed direction is finished on the far side ...
                await digest_until_eof(talker, got_request)
                assert got_request == [sha(request)]
                # ... and the other direction still flows, long after.
                await trio.sleep(0.05)
                n.start_soon(send_then_eof, talker, chunks(response, rng, 200_000))
                await digest_until_eof(closer, got_response)
            assert got_response == [sha(response)]
            assert results[0].error is None
            await w.aclose_ends()


@attrs.frozen
class Scenario:
    up: list[int]  # chunk sizes, client -> upstream
    down: list[int]
    pause_up: float
    pause_down: float
    read_limit: int  # receivers take at most this many bytes per read
    splice: bool


scenarios = st.builds(
    Scenario,
    up=st.lists(st.integers(1, 600_000), max_size=8),
    down=st.lists(st.integers(1, 600_000), max_size=8),
    pause_up=st.sampled_from([0, 0, 0.001, 0.003]),
    pause_down=st.sampled_from([0, 0, 0.001, 0.003]),
    read_limit=st.sampled_from([1, 7, 4096, MiB]),
    splice=st.booleans(),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario=scenarios, seed=st.integers(0, 2**32))
def test_any_chunking_timing_and_half_close_order_is_lossless(
    scenario: Scenario, seed: int
) -> None:
    rng = random.Random(seed)
    up = [rng.randbytes(n) for n in scenario.up]
    down = [rng.randbytes(n) for n in scenario.down]
    # A 1-byte reader of 4.8 MB would take minutes; let tiny readers read little.
    if scenario.read_limit < 4096:
        up, down = [c[:2000] for c in up], [c[:2000] for c in down]

    async def main() -> None:
        with trio.fail_after(30):
            async with running_relay(splice=scenario.splice) as relay:
                w = make_wire()
                got_up: list[str] = []
                got_down: list[str] = []
                results: list[RelayResult] = []

                async def relayed() -> None:
                    results.append(await serve(relay, w))

                async with trio.open_nursery() as n:
                    n.start_soon(relayed)
                    n.start_soon(send_then_eof, w.client, up, scenario.pause_up)
                    n.start_soon(send_then_eof, w.upstream, down, scenario.pause_down)
                    n.start_soon(digest_until_eof, w.upstream, got_up, scenario.read_limit)
                    n.start_soon(digest_until_eof, w.client, got_down, scenario.read_limit)
                assert got_up == [sha(b"".join(up))]
                assert got_down == [sha(b"".join(down))]
                assert results[0] == RelayResult(sum(map(len, up)), sum(map(len, down)))
                await w.aclose_ends()

    trio.run(main)


# -- bulk and splice -------------------------------------------------------------


@pytest.mark.parametrize("splice", [True, False], ids=["splice", "copy"])
async def test_bulk_transfer_both_ways_arrives_intact(splice: bool) -> None:
    size = 64 * MiB if splice else 16 * MiB
    up, down = os.urandom(size), os.urandom(size)
    with trio.fail_after(30):
        async with running_relay(splice=splice) as relay:
            w = make_wire()
            got_up: list[str] = []
            got_down: list[str] = []
            most_pipes = 0
            results: list[RelayResult] = []

            async def relayed() -> None:
                results.append(await serve(relay, w))

            async def watch_pipes() -> None:
                nonlocal most_pipes
                while True:
                    most_pipes = max(most_pipes, relay.pipes.in_use)
                    await trio.lowlevel.checkpoint()

            async with trio.open_nursery() as n:
                n.start_soon(watch_pipes)
                async with trio.open_nursery() as transfer:
                    transfer.start_soon(relayed)
                    transfer.start_soon(send_then_eof, w.client, [up])
                    transfer.start_soon(send_then_eof, w.upstream, [down])
                    transfer.start_soon(digest_until_eof, w.upstream, got_up)
                    transfer.start_soon(digest_until_eof, w.client, got_down)
                n.cancel_scope.cancel()
            assert got_up == [sha(up)]
            assert got_down == [sha(down)]
            assert results == [RelayResult(size, size)]
            if splice:
                assert relay.bytes_spliced > 0, "a bulk direction should have switched to splice"
            else:
                assert relay.bytes_spliced == most_pipes == 0
            assert relay.pipes.in_use == 0
            await w.aclose_ends()


async def test_slow_reader_holds_back_the_writer_without_losing_bytes() -> None:
    """Backpressure: a stalled upstream stops the relay reading the client."""
    data = os.urandom(48 * MiB)
    with trio.fail_after(30):
        async with running_relay() as relay:
            w = make_wire()
            got: list[str] = []
            sent = trio.Event()
            results: list[RelayResult] = []

            async def relayed() -> None:
                results.append(await serve(relay, w))

            async def send() -> None:
                await w.client.send_all(data)
                sent.set()
                await w.client.send_eof()

            async with trio.open_nursery() as n:
                n.start_soon(relayed)
                n.start_soon(send)
                await trio.sleep(0.3)
                # Socket buffers take a few MiB each; the relay itself holds at
                # most one read or one pipe, so the client is still blocked.
                assert not sent.is_set()
                assert relay.bytes_up < 24 * MiB
                assert relay.pipes.in_use <= 1
                # Now a reader of small pieces: many stop-and-go cycles.
                await digest_until_eof(w.upstream, got, 65536)
                await w.upstream.send_eof()
                assert await w.client.receive_some(10) == b""
            assert got == [sha(data)]
            assert results == [RelayResult(len(data), 0)]
            await w.aclose_ends()


# -- resets ----------------------------------------------------------------------


async def read_until_error(stream: trio.SocketStream) -> OSError | None:
    try:
        while await stream.socket.recv(65536):
            pass
    except OSError as e:
        return e
    return None


@pytest.mark.parametrize("side", ["upstream", "client"])
async def test_reset_on_one_side_resets_the_other(side: str) -> None:
    with trio.fail_after(10):
        async with running_relay() as relay:
            w = make_wire()
            resetter, other = (
                (w.upstream, w.client) if side == "upstream" else (w.client, w.upstream)
            )
            results: list[RelayResult] = []
            async with trio.open_nursery() as n:

                async def relayed() -> None:
                    results.append(await serve(relay, w))

                n.start_soon(relayed)
                await resetter.send_all(b"hello")
                assert await other.receive_some(100) == b"hello"
                resetter.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                await resetter.aclose()
            assert results[0].error == f"{side} reset"
            assert results[0].errored_side is Side(side)
            assert results[0].ending is Ending.FAILED
            assert (results[0].bytes_up, results[0].bytes_down) == (
                (0, 5) if side == "upstream" else (5, 0)
            )
            assert isinstance(await read_until_error(other), ConnectionResetError)
            await other.aclose()


async def test_upstream_reset_while_data_is_pending_resets_the_client() -> None:
    with trio.fail_after(10):
        async with running_relay() as relay:
            w = make_wire()
            results: list[RelayResult] = []
            flood_errors: list[BaseException | None] = []
            async with trio.open_nursery() as n:

                async def relayed() -> None:
                    results.append(await serve(relay, w))

                async def flood() -> None:
                    block = bytes(MiB)
                    try:
                        for _ in range(256):
                            await w.client.send_all(block)
                    except trio.BrokenResourceError as e:
                        flood_errors.append(e.__cause__)

                n.start_soon(relayed)
                n.start_soon(flood)
                await trio.sleep(0.2)  # the upstream never reads: everything backs up
                w.upstream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                await w.upstream.aclose()
            assert results[0].errored_side is Side.UPSTREAM
            assert results[0].error == "upstream reset"
            # The blocked send is the first to learn of the client's reset.
            assert len(flood_errors) == 1
            assert isinstance(flood_errors[0], ConnectionResetError)
            await w.client.aclose()


async def test_reset_after_fin_is_noticed_while_the_other_side_is_idle() -> None:
    """An RST with nobody reading or writing that socket still ends the session."""
    with trio.fail_after(10):
        async with running_relay() as relay:
            w = make_wire()
            results: list[RelayResult] = []
            async with trio.open_nursery() as n:

                async def relayed() -> None:
                    results.append(await serve(relay, w))

                n.start_soon(relayed)
                await w.upstream.send_eof()
                assert await w.client.receive_some(10) == b""
                w.upstream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                await w.upstream.aclose()
            assert results[0] == RelayResult(0, 0, Ending.FAILED, Side.UPSTREAM, "upstream reset")
            # The client already had a FIN, so Linux reports the RST to its next
            # write (EPIPE in CLOSE_WAIT), not to reads.
            await trio.sleep(0.01)
            with pytest.raises((BrokenPipeError, ConnectionResetError)):
                await w.client.socket.send(b"x")
            await w.client.aclose()


# -- cancellation, stopping, leaks -------------------------------------------------


async def test_cancelled_relay_unregisters_both_sockets_and_returns_its_pipes() -> None:
    with trio.fail_after(20):
        baseline = fd_count()
        async with running_relay() as relay:
            with_relay = fd_count()
            wires = [make_wire() for _ in range(8)]
            cancelled = 0

            async def caller(w: Wire, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
                nonlocal cancelled
                with trio.CancelScope() as scope:
                    task_status.started(scope)
                    try:
                        await serve(relay, w)
                    except trio.Cancelled:
                        cancelled += 1
                        raise

            async def flood(w: Wire) -> None:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    while True:
                        await w.client.send_all(bytes(MiB))

            async with trio.open_nursery() as n:
                scopes = [await n.start(caller, w) for w in wires]
                for w in wires:
                    n.start_soon(flood, w)
                await trio.sleep(0.2)  # bulk in flight, upstreams not reading: pipes held
                assert relay.active == 8
                assert epoll_registrations(relay) == 16
                for scope in scopes:
                    scope.cancel()
                await trio.sleep(0.05)
                assert cancelled == 8
                assert relay.active == 0
                assert relay.pipes.in_use == 0
                assert epoll_registrations(relay) == 0
                for w in wires:
                    await w.aclose_ends()
            # Only pooled (empty) pipes remain, two fds each.
            assert fd_count() - with_relay == 2 * relay.pipes.idle <= 2 * PIPE_POOL_MAX
        assert fd_count() == baseline


async def test_idle_sessions_hold_two_fds_each_and_no_pipes() -> None:
    sessions = 150
    with trio.fail_after(20):
        async with running_relay() as relay:
            # A bulk burst first, so pipes have been used and pooled.
            w = make_wire()
            async with trio.open_nursery() as first:
                first.start_soon(serve, relay, w)
                blob = os.urandom(4 * BUFFER_SIZE)
                first.start_soon(w.client.send_all, blob)
                got = b""
                while len(got) < len(blob):
                    got += await w.upstream.receive_some(MiB)
                assert got == blob
                await trio.sleep(0.05)
                assert relay.pipes.in_use == 0
                await w.aclose_ends()

            before = fd_count()
            async with trio.open_nursery() as n:
                wires = [make_wire() for _ in range(sessions)]
                for w in wires:
                    n.start_soon(serve, relay, w)
                    await w.client.send_all(b"ping")
                    await w.upstream.send_all(b"pong")
                for w in wires:
                    assert await w.upstream.receive_some(10) == b"ping"
                    assert await w.client.receive_some(10) == b"pong"
                assert relay.active == sessions
                assert relay.pipes.in_use == 0
                assert epoll_registrations(relay) == 2 * sessions
                # The two relayed sockets plus the test's two ends: no pipes.
                assert fd_count() - before == 4 * sessions
                for w in wires:
                    await w.aclose_ends()
            assert relay.active == 0
            assert fd_count() == before


async def test_stopping_run_ends_open_sessions_promptly() -> None:
    with trio.fail_after(10):
        baseline = fd_count()
        relay = Relay()
        results: list[RelayResult] = []
        wires = [make_wire() for _ in range(5)]
        async with trio.open_nursery() as outer, trio.open_nursery() as pump:
            await pump.start(relay.run)

            async def relayed(w: Wire) -> None:
                results.append(await serve(relay, w))

            for w in wires:
                outer.start_soon(relayed, w)
                await w.client.send_all(b"x")
            await trio.sleep(0.05)
            assert relay.active == 5
            pump.cancel_scope.cancel()
        assert results == [RelayResult(1, 0, Ending.STOPPED, None, "relay stopped")] * 5
        assert relay.active == 0
        late = make_wire()
        with pytest.raises(RelayNotRunningError):
            await serve(relay, late)
        for w in [*wires, late]:
            await w.aclose_ends()
        assert fd_count() == baseline


async def test_relay_before_run_raises() -> None:
    w = make_wire()
    with pytest.raises(RelayNotRunningError):
        await serve(Relay(), w)
    await w.aclose_ends()


# -- fairness ----------------------------------------------------------------------


def blocking_bulk(sock: socket.socket, size: int) -> Callable[[], None]:
    def send() -> None:
        block = memoryview(bytes(MiB))
        left = size
        while left:
            n = min(left, MiB)
            sock.sendall(block[:n])
            left -= n
        sock.shutdown(socket.SHUT_WR)

    return send


def blocking_drain(sock: socket.socket, into: list[int]) -> Callable[[], None]:
    def drain() -> None:
        buf = bytearray(MiB)
        total = 0
        while n := sock.recv_into(buf):
            total += n
        into.append(total)

    return drain


async def test_a_ticking_task_keeps_its_schedule_during_bulk() -> None:
    """The pump yields to trio while saturated: probes must not miss deadlines.

    The load runs in threads with blocking sockets, so the only trio tasks are
    the pump and the ticker: without a budget the pump would never yield.
    """
    size = 512 * MiB
    with trio.fail_after(60):
        async with running_relay() as relay:
            client_end, csock = tcp_pair()
            usock, upstream_end = tcp_pair()
            csock.setblocking(False)
            usock.setblocking(False)
            received: list[int] = []
            gaps: list[float] = []
            done = threading.Event()
            async with trio.open_nursery() as n:
                n.start_soon(relay.relay, csock, usock)
                sender = threading.Thread(target=blocking_bulk(client_end, size), daemon=True)
                sender.start()

                async def tick() -> None:
                    last = trio.current_time()
                    while not done.is_set():
                        await trio.sleep(0.01)
                        now = trio.current_time()
                        gaps.append(now - last)
                        last = now

                n.start_soon(tick)
                start = trio.current_time()
                drain = blocking_drain(upstream_end, received)
                await trio.to_thread.run_sync(drain, abandon_on_cancel=True)
                elapsed = trio.current_time() - start
                done.set()
                n.cancel_scope.cancel()  # the downstream direction never ends
            sender.join()
            csock.close()
            usock.close()
            client_end.close()
            upstream_end.close()
            assert received == [size]
            print(
                f"spliced {relay.bytes_spliced / size:.0%}, {len(gaps)} ticks in {elapsed:.2f} s,"
                f" longest gap {max(gaps) * 1000:.1f} ms"
            )
            assert relay.bytes_spliced > size // 2
            # Generous: a starved ticker would tick once for the whole transfer.
            assert len(gaps) >= 0.3 * elapsed / 0.01, (len(gaps), elapsed, max(gaps))
            assert max(gaps) < 0.5, max(gaps)


# -- hygiene ---------------------------------------------------------------------


async def test_run_twice_is_refused() -> None:
    async with running_relay() as relay:
        with pytest.raises(RuntimeError, match="already running"):
            await relay.run()


async def test_relay_works_under_the_autojump_clock(autojump_clock: trio.testing.MockClock) -> None:
    """Tests of the proxy drive time with autojump; the pump must not mind."""
    async with running_relay() as relay:
        w = make_wire()
        async with trio.open_nursery() as n:
            n.start_soon(serve, relay, w)
            await w.client.send_all(b"abc")
            got = b""
            while len(got) < 3:
                got += await w.upstream.receive_some(10)
            assert got == b"abc"
            await w.aclose_ends()


async def test_unix_socketpairs_relay_too() -> None:
    """Nothing in the pump is TCP-only: AF_UNIX stream pairs relay and half-close."""
    data = os.urandom(8 * MiB)
    with trio.fail_after(20):
        async with running_relay() as relay:
            client_end, csock = socket.socketpair()
            usock, upstream_end = socket.socketpair()
            csock.setblocking(False)
            usock.setblocking(False)
            w = Wire(
                trio.SocketStream(trio.socket.from_stdlib_socket(client_end)),
                trio.SocketStream(trio.socket.from_stdlib_socket(upstream_end)),
                csock,
                usock,
            )
            got_up: list[str] = []
            got_down: list[str] = []
            results: list[RelayResult] = []

            async def relayed() -> None:
                results.append(await serve(relay, w))

            async with trio.open_nursery() as n:
                n.start_soon(relayed)
                n.start_soon(send_then_eof, w.client, [data])
                n.start_soon(digest_until_eof, w.upstream, got_up)
                n.start_soon(send_then_eof, w.upstream, [b"bye"])
                n.start_soon(digest_until_eof, w.client, got_down)
            assert got_up == [sha(data)]
            assert got_down == [sha(b"bye")]
            assert results == [RelayResult(len(data), 3)]
            await w.aclose_ends()
