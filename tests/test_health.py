"""The health server against good, bad, slow and hostile clients, on real sockets."""

from __future__ import annotations

import socket
import struct
from typing import Any

import pytest
import trio
import trio.testing

import kap.health
from kap.address import Address
from kap.health import HealthServer


def server(**limits: Any) -> HealthServer:
    return HealthServer(
        host="127.0.0.1",
        port=0,
        routes={
            "/healthz": lambda: ("text/plain", b"ok\n"),
            "/boom": lambda: 1 / 0,  # type: ignore[dict-item]
        },
        **limits,
    )


async def start(nursery: trio.Nursery, **limits: Any) -> Address:
    return await nursery.start(server(**limits).run)  # type: ignore[no-any-return]


async def exchange(addr: Address, data: bytes, *, timeout: float = 5.0) -> bytes:
    """Send ``data``, read until the server closes or 1 s of silence."""
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream(addr.host, addr.port)
        async with stream:
            await stream.send_all(data)
            out = b""
            while True:
                with trio.move_on_after(1.0):
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        return out
                    out += chunk
                    continue
                return out


async def status_of(addr: Address, request: bytes) -> int:
    reply = await exchange(addr, request)
    return int(reply.split(b" ", 2)[1])


def get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (get("/healthz"), 200),
        (get("/healthz?verbose=1"), 200),
        # Absolute-form (RFC 9112 3.2.2: a server must accept it), as through a proxy.
        (get("http://127.0.0.1:8080/healthz"), 200),
        (get("HTTP://node-1/healthz?x=1"), 200),
        (get("http://127.0.0.1:8080"), 404),  # path "/"
        (get("http://127.0.0.1:8080/nope"), 404),
        (get("/nope"), 404),
        (get("/healthz", "POST"), 405),
        (get("/healthz", "DELETE"), 405),
        (get("/boom"), 500),
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20000 + b"\r\n\r\n", 431),
    ],
)
async def test_answers(nursery: trio.Nursery, request_bytes: bytes, status: int) -> None:
    addr = await start(nursery)
    assert await status_of(addr, request_bytes) == status


async def test_head_has_no_body(nursery: trio.Nursery) -> None:
    addr = await start(nursery)
    reply = await exchange(addr, get("/healthz", "HEAD"))
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"\r\n\r\n")


async def test_keep_alive_serves_several_requests(nursery: trio.Nursery) -> None:
    addr = await start(nursery)
    req = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    reply = await exchange(addr, req * 3)
    assert reply.count(b"HTTP/1.1 200") == 3


async def test_binary_junk_costs_only_its_connection(nursery: trio.Nursery) -> None:
    health = server()
    addr = await nursery.start(health.run)
    await exchange(addr, bytes(range(256)) * 10)  # answered with a 400, not an error
    assert await status_of(addr, get("/healthz")) == 200
    assert health.connection_errors_total == 0


async def test_a_client_that_resets_mid_request_is_counted_and_costs_only_its_connection(
    nursery: trio.Nursery,
) -> None:
    health = server()
    addr = await nursery.start(health.run)
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream(addr.host, addr.port)
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # no end of head
        while health.accepted_total < 1:
            await trio.sleep(0.01)
        # SO_LINGER 0: close() sends a reset instead of a FIN.
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()
        while health.connection_errors_total < 1:
            await trio.sleep(0.01)
    assert await status_of(addr, get("/healthz")) == 200
    assert health.connection_errors_total == 1


async def test_slowloris_is_cut_at_the_deadline_and_healthz_keeps_answering(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The dribble and the deadline on trio's virtual clock: the cut comes at 0.3 s exactly."""
    addr = await start(nursery, request_deadline=0.3)
    with trio.fail_after(5):
        slow = await trio.open_tcp_stream(addr.host, addr.port)
        start_t = trio.current_time()
        await slow.send_all(b"GET /healthz HTTP/1.1\r\n")
        assert await status_of(addr, get("/healthz")) == 200
        for _ in range(10):  # dribble a header byte every 100 ms
            try:
                await slow.send_all(b"X")
            except trio.BrokenResourceError:
                break
            await trio.sleep(0.1)
        assert await slow.receive_some(100) == b""  # closed by the server
        assert 0.3 <= trio.current_time() - start_t < 0.5  # at the deadline, not after it all
        await slow.aclose()


async def test_idle_connections_beyond_the_cap_evict_the_oldest(
    nursery: trio.Nursery,
) -> None:
    health = server(max_connections=20)
    addr = await nursery.start(health.run)
    idle = [await trio.open_tcp_stream(addr.host, addr.port) for _ in range(50)]
    with trio.fail_after(5):  # every connection accepted: the cap holds 20 of them
        while health.accepted_total < 50 or health.open_connections > 20:
            await trio.sleep(0.01)
    assert await status_of(addr, get("/healthz")) == 200
    for s in idle:
        await s.aclose()


async def test_a_client_that_does_not_read_its_answers_costs_only_its_connection(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pipelined requests never read: the send deadline closes that connection, kap lives on.

    (It used to raise TooSlowError out of the health server, and kap exited
    with a traceback: one `printf 'GET /metrics ...' x 50 | nc` away.)
    """
    monkeypatch.setattr(kap.health, "SEND_DEADLINE", 0.3)
    big = b"x" * (1 << 20)
    health = HealthServer(
        host="127.0.0.1",
        port=0,
        routes={"/healthz": lambda: ("text/plain", b"ok\n"), "/big": lambda: ("text/plain", big)},
    )
    addr = await nursery.start(health.run)
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(addr.host, addr.port)
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await stream.send_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n" * 20)  # never read
        while health.connection_errors_total < 1:
            await trio.sleep(0.01)
        assert await status_of(addr, get("/healthz")) == 200
        await stream.aclose()
