"""Helpers for the relay's tests: wires of real loopback sockets, a running pump.

Each session is four sockets: the client application's end and the relayed
client socket (one TCP connection), the relayed upstream socket and the upstream
server's end (another). A test plays the caller (kap/proxy.py): it hands the
two relayed sockets to ``Relay.relay`` and closes them afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import select
import socket
from collections.abc import AsyncIterator, Callable

import attrs
import trio
import trio.lowlevel
import trio.testing

from kap.relay import (
    Outcome,
    Relay,
    Relayed,
    RelayResult,
)

MiB = 1024 * 1024


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair on a kernel-chosen port."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    return a, b


@attrs.define
class Wire:
    client: trio.SocketStream  # the client application's end
    upstream: trio.SocketStream  # the upstream server's end
    csock: socket.socket  # relayed, owned by the caller
    usock: socket.socket  # relayed, owned by the caller

    async def aclose_ends(self) -> None:
        await self.client.aclose()
        await self.upstream.aclose()


def make_wire() -> Wire:
    client_end, csock = tcp_pair()
    usock, upstream_end = tcp_pair()
    csock.setblocking(False)
    usock.setblocking(False)
    return Wire(
        trio.SocketStream(trio.socket.from_stdlib_socket(client_end)),
        trio.SocketStream(trio.socket.from_stdlib_socket(upstream_end)),
        csock,
        usock,
    )


async def serve(relay: Relay, wire: Wire) -> RelayResult:
    """What the proxy does: relay, then close both sockets whatever happened."""
    try:
        return relayed(await relay.relay(wire.csock, wire.usock))
    finally:
        wire.csock.close()
        wire.usock.close()


def relayed(result: Outcome) -> RelayResult:
    assert isinstance(result, Relayed), result
    return result.result


@contextlib.asynccontextmanager
async def running_relay(*, splice: bool = hasattr(os, "splice")) -> AsyncIterator[Relay]:
    relay = Relay(splice=splice)
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.run)
        yield relay
        nursery.cancel_scope.cancel()


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def epoll_registrations(relay: Relay) -> int:
    """Sockets registered in the pump's epoll set, as the kernel lists them."""
    assert relay._epoll is not None
    with open(f"/proc/self/fdinfo/{relay._epoll.fileno()}") as f:
        return sum(1 for line in f if line.startswith("tfd:"))


def chunks(data: bytes, rng: random.Random, largest: int) -> list[bytes]:
    out = []
    i = 0
    while i < len(data):
        n = rng.randint(1, largest)
        out.append(data[i : i + n])
        i += n
    return out


async def send_then_eof(stream: trio.SocketStream, pieces: list[bytes], pause: float = 0) -> None:
    for piece in pieces:
        await stream.send_all(piece)
        if pause:
            await trio.sleep(pause)
    await stream.send_eof()


async def digest_until_eof(stream: trio.SocketStream, into: list[str], limit: int = MiB) -> None:
    h = hashlib.sha256()
    while data := await stream.receive_some(limit):
        h.update(data)
    into.append(h.hexdigest())


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fill_accept_queue(listener: socket.socket) -> list[socket.socket]:
    """Connects that fill a ``listen(0)`` queue, so later SYNs are dropped (a dial hangs)."""
    queued = [connecting_socket(listener.getsockname()) for _ in range(3)]
    _, writable, _ = select.select([], queued, [], 1.0)  # the ones that got in
    assert writable
    return queued


def connecting_socket(address: tuple[str, int]) -> socket.socket:
    """A non-blocking socket whose connect() to ``address`` has begun, as the proxy's."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    sock.connect_ex(address)
    return sock


async def wait_for(condition: Callable[[], bool]) -> None:
    while not condition():
        await trio.sleep(0.01)
