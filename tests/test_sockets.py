"""kap/sockets.py: a second listener on kap's address and port is noticed.

kap binds with SO_REUSEPORT so a restart hands over without refusing a
client; the same option would let a stale, hand-run kap share the port with
the static pod and silently take part of the clients. At start kap warns when
another socket already listens there (during a restart the new kap warns too,
which the message says). Leftovers of an earlier kap that are not listeners
(connections draining, TIME_WAIT) must not trigger it.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from fakeapi import PkiFiles
from kaptest import StartFake, kap_args, kap_process
from loguru import logger

from kap.sockets import already_listening, bind_listener, is_local_ip

WARNING = "another socket already listens on this address and port"


@pytest.fixture
def warnings() -> Iterator[list[str]]:
    """The messages of every loguru warning emitted during the test."""
    records: list[str] = []
    sink = logger.add(lambda m: records.append(m.record["message"]), level="WARNING")
    yield records
    logger.remove(sink)


def reuse_port_listener(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listener bound as kap binds its own: SO_REUSEADDR and SO_REUSEPORT."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen()
    return sock


def port_of(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


def test_a_lone_listener_is_not_warned_about(warnings: list[str], free_port: int) -> None:
    assert not already_listening("127.0.0.1", free_port)
    with bind_listener("127.0.0.1", free_port):
        pass
    assert warnings == []


def test_a_second_listener_on_the_same_port_is_warned_about(warnings: list[str]) -> None:
    with reuse_port_listener() as other:
        port = port_of(other)
        assert already_listening("127.0.0.1", port)
        with bind_listener("127.0.0.1", port) as sock:
            assert port_of(sock) == port, "the bind itself still succeeds (hitless restart)"
    assert len(warnings) == 1
    assert warnings[0].startswith(WARNING)
    # Both readings of the situation are offered: a restart, or a stray kap.
    assert "restart" in warnings[0]
    assert "second kap" in warnings[0]


def test_a_wildcard_listener_on_the_port_counts(warnings: list[str]) -> None:
    with reuse_port_listener("0.0.0.0") as other, bind_listener("127.0.0.1", port_of(other)):
        pass
    assert len(warnings) == 1


def test_a_listener_that_refuses_to_share_gives_the_bind_error_alone(
    warnings: list[str],
) -> None:
    with socket.socket() as other:  # no SO_REUSEPORT: kap's bind fails
        other.bind(("127.0.0.1", 0))
        other.listen()
        with pytest.raises(OSError, match="cannot listen on"):
            bind_listener("127.0.0.1", port_of(other))
    assert warnings == []


def test_port_zero_is_never_warned_about(warnings: list[str]) -> None:
    with bind_listener("127.0.0.1", 0):
        pass
    assert warnings == []


@pytest.mark.parametrize("who_closes_first", ["server", "client"])
def test_connections_left_by_an_earlier_listener_do_not_count(
    warnings: list[str], who_closes_first: str
) -> None:
    """Draining and TIME_WAIT sockets of an earlier kap on the port are not listeners."""
    listener = bind_listener("127.0.0.1", 0)
    port = port_of(listener)
    listener.setblocking(True)
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    accepted, _ = listener.accept()
    listener.close()
    # An accepted connection still open: an old kap draining after it closed its listener.
    assert not already_listening("127.0.0.1", port)
    first, second = (accepted, client) if who_closes_first == "server" else (client, accepted)
    first.close()
    second.recv(1)  # the FIN arrived
    second.close()
    # The side that closed first now holds the port in TIME_WAIT (for the
    # server side, the port kap listens on).
    with bind_listener("127.0.0.1", port):
        pass
    assert warnings == []


async def test_a_second_kap_on_the_same_port_warns_and_the_first_did_not(
    start_fake: StartFake, pki: PkiFiles, free_port: int
) -> None:
    a = await start_fake("a")
    args = kap_args(f"127.0.0.1:{a.address[1]}", pki, port=free_port)

    def warned(kp: Any) -> list[dict[str, Any]]:
        return [line for line in kp.lines if str(line.get("msg", "")).startswith(WARNING)]

    async with kap_process(*args) as first:
        assert warned(first) == []
        async with kap_process(*args) as second:
            assert second.listen == first.listen == f"127.0.0.1:{free_port}"
            (line,) = warned(second)
            assert line["level"] == "warn"
            assert line["listen"] == f"127.0.0.1:{free_port}"
        await trio.lowlevel.checkpoint()
        assert warned(first) == []


def test_is_local_ip() -> None:
    assert is_local_ip("127.0.0.1") and is_local_ip("127.0.0.2")
    assert not is_local_ip("192.0.2.1")  # TEST-NET-1: no host has it
