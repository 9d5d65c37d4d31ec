"""The fake apiserver's server (tests/fakeapi/server.py): readyz modes, auth, raw mode, stop.

Every test is bounded by ``trio.fail_after``: a fake that hangs fails the
test, it never stalls the suite.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx2
import pytest
import trio
import trio.testing
from fakeapi import FakeApiServer, PkiFiles
from fakeapitest import client, eventually, who

# ------------------------------------------------------------------ /readyz


@pytest.mark.parametrize(
    ("path", "mode", "code", "body_has"),
    [
        ("/readyz", "200", 200, "ok"),
        ("/livez", "200", 200, "ok"),
        ("/healthz", "200", 200, "ok"),
        ("/readyz", "500", 500, "[-]etcd failed"),
        ("/readyz", "slow", 200, "ok"),
    ],
)
async def test_health_endpoints_answer_per_mode(
    start_fake: Any, pki: PkiFiles, path: str, mode: str, code: int, body_has: str
) -> None:
    with trio.fail_after(10):
        fake = await start_fake("a", readyz=mode, readyz_delay=0.2)
        async with client(pki, fake) as http:
            started = trio.current_time()
            response = await http.get(path)
        assert response.status_code == code
        assert body_has in response.text
        if mode == "slow":
            assert trio.current_time() - started >= 0.2
        assert fake.probe_count(path) == 1


async def test_hung_readyz_never_answers_but_keeps_the_connection(
    start_fake: Any, pki: PkiFiles
) -> None:
    with trio.fail_after(10):
        fake = await start_fake("a", readyz="hang")
        async with client(pki, fake, timeout=0.3) as http:
            with pytest.raises(httpx2.ReadTimeout):
                await http.get("/readyz")
        assert fake.probe_count() == 1
        await eventually(lambda: fake.active_connections == 0)  # it saw the client leave


async def test_close_mode_drops_the_connection_without_answering(
    start_fake: Any, pki: PkiFiles
) -> None:
    with trio.fail_after(10):
        fake = await start_fake("a", readyz="close")
        async with client(pki, fake) as http:
            with pytest.raises(httpx2.RemoteProtocolError):
                await http.get("/readyz")


async def test_mode_switches_at_run_time_and_probes_are_timed(
    start_fake: Any, pki: PkiFiles, autojump_clock: trio.testing.MockClock
) -> None:
    """Probe times are on trio's clock (virtual here, so the pause between them is exact)."""
    with trio.fail_after(10):
        fake = await start_fake("a")
        async with client(pki, fake) as http:
            assert (await http.get("/readyz")).status_code == 200
            fake.readyz = "500"
            assert (await http.get("/readyz")).status_code == 500
            fake.readyz = "200"
            await trio.sleep(0.05)
            assert (await http.get("/readyz")).status_code == 200
        times = fake.probe_times["/readyz"]
        assert len(times) == 3
        assert times[2] - times[1] == pytest.approx(0.05)
        assert fake.connections_total == 1  # keep-alive: one connection for three probes


def test_readyz_mode_is_validated(pki: PkiFiles) -> None:
    with pytest.raises(ValueError, match="readyz"):
        FakeApiServer(name="a", pki=pki, readyz="maybe")


# --------------------------------------------------------------------- auth


async def test_client_cert_required_refuses_anonymous_with_403(
    start_fake: Any, pki: PkiFiles
) -> None:
    with trio.fail_after(10):
        fake = await start_fake("a", require_client_cert=True)
        async with client(pki, fake) as http:
            response = await http.get("/readyz")
        assert response.status_code == 403
        assert response.headers["content-type"] == "application/json"
        body = response.json()
        assert body["kind"] == "Status"
        assert body["code"] == 403
        assert "system:anonymous" in body["message"]
        async with client(pki, fake, client_cert=True) as http:
            assert (await http.get("/readyz")).status_code == 200
        assert fake.requests[-1].user == "system:kap"


async def test_records_the_serial_of_each_connections_client_certificate(
    start_fake: Any, pki: PkiFiles
) -> None:
    from cryptography import x509

    serial = x509.load_pem_x509_certificate(pki.client_cert_file.read_bytes()).serial_number
    with trio.fail_after(10):
        fake = await start_fake("a", require_client_cert=True)
        async with client(pki, fake) as http:
            await http.get("/readyz")
        async with client(pki, fake, client_cert=True) as http:
            await http.get("/readyz")
            await http.get("/readyz")  # the same connection: recorded once
        assert fake.client_cert_serials == [None, serial]


async def test_token_required_refuses_missing_or_wrong_token_with_401(
    start_fake: Any, pki: PkiFiles
) -> None:
    with trio.fail_after(10):
        fake = await start_fake("a", require_token=pki.token)
        async with client(pki, fake) as http:
            assert (await http.get("/readyz")).status_code == 401
            wrong = {"Authorization": "Bearer nope"}
            response = await http.get("/readyz", headers=wrong)
            assert response.status_code == 401
            assert response.json()["reason"] == "Unauthorized"
            right = {"Authorization": f"Bearer {pki.token}"}
            assert (await http.get("/readyz", headers=right)).status_code == 200


async def test_client_cert_from_another_ca_fails_the_handshake(
    start_fake: Any, pki: PkiFiles, tmp_path: Path
) -> None:
    import trustme

    other = trustme.CA().issue_cert("intruder")
    other.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "intruder.pem"))
    ssl_context = pki.client_ssl_context()
    ssl_context.load_cert_chain(tmp_path / "intruder.pem")
    with trio.fail_after(10):
        fake = await start_fake("a", require_client_cert=True)
        async with httpx2.AsyncClient(verify=ssl_context, trust_env=False, timeout=5) as http:
            with pytest.raises(httpx2.HTTPError):
                await http.get(f"{fake.url}/readyz")
        assert fake.probe_count() == 0


# ----------------------------------------------------------------- raw mode


async def test_raw_mode_answers_who_then_echoes_through_half_close(start_fake: Any) -> None:
    with trio.fail_after(10):
        fake = await start_fake("alpha")
        assert fake.address is not None
        assert await who(*fake.address, b"hello") == b"alpha\nhello"
        assert fake.raw_connections == 1


async def test_raw_mode_echoes_when_the_first_bytes_are_not_who(start_fake: Any) -> None:
    with trio.fail_after(10):
        fake = await start_fake("a")
        assert fake.address is not None
        stream = await trio.open_tcp_stream(*fake.address)
        async with stream:
            await stream.send_all(b"WH")  # a prefix of WHO: the fake waits for more
            await trio.testing.wait_all_tasks_blocked()  # ... as it does now
            await stream.send_all(b"AT\n")
            assert await stream.receive_some(100) == b"WHAT\n"
            # Half-close: our FIN, then the fake finishes and sends its own.
            await stream.send_all(b"tail")
            await stream.send_eof()
            received = b""
            while chunk := await stream.receive_some(100):
                received += chunk
            assert received == b"tail"


async def test_raw_mode_keeps_echoing_while_the_client_side_is_open(start_fake: Any) -> None:
    with trio.fail_after(10):
        fake = await start_fake("a")
        assert fake.address is not None
        stream = await trio.open_tcp_stream(*fake.address)
        async with stream:
            await stream.send_all(b"WHO\n")
            assert await stream.receive_some(100) == b"a\n"
            for i in range(3):
                await stream.send_all(b"x" * (i + 1))
                assert await stream.receive_some(100) == b"x" * (i + 1)


async def test_several_fakes_share_one_port_on_distinct_loopback_addresses(
    start_fake: Any, free_port: int
) -> None:
    with trio.fail_after(10):
        fakes = [
            await start_fake(name, host=f"127.0.0.{i}", port=free_port)
            for i, name in [(2, "b"), (3, "c"), (4, "d")]
        ]
        assert [f.address for f in fakes] == [(f"127.0.0.{i}", free_port) for i in (2, 3, 4)]
        for i, name in [(2, "b"), (3, "c"), (4, "d")]:
            assert await who(f"127.0.0.{i}", free_port) == f"{name}\n".encode()


async def test_ipv6_loopback(start_fake: Any, pki: PkiFiles) -> None:
    if not _has_ipv6_loopback():
        pytest.skip("no ::1 on this machine")
    with trio.fail_after(10):
        fake = await start_fake("six", host="::1")
        assert fake.url.startswith("https://[::1]:")
        async with client(pki, fake) as http:
            assert (await http.get("/readyz")).text == "ok"
        assert await who("::1", fake.address[1]) == b"six\n"


def _has_ipv6_loopback() -> bool:
    import socket

    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


async def test_stop_closes_the_listener_and_every_connection(pki: PkiFiles) -> None:
    with trio.fail_after(10):
        fake = FakeApiServer(name="a", pki=pki)
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(fake.run)
            stream = await trio.open_tcp_stream(host, port)
            await stream.send_all(b"WHO\n")
            assert await stream.receive_some(100) == b"a\n"
            fake.stop()
        # run() returned: the open connection is closed, new ones are refused.
        assert await stream.receive_some(100) == b""
        await stream.aclose()
        with pytest.raises(OSError):
            await trio.open_tcp_stream(host, port)


async def test_drop_connections_keeps_listening(start_fake: Any) -> None:
    with trio.fail_after(10):
        fake = await start_fake("a")
        stream = await trio.open_tcp_stream(*fake.address)
        async with stream:
            await stream.send_all(b"WHO\n")
            assert await stream.receive_some(100) == b"a\n"
            fake.drop_connections()
            assert await stream.receive_some(100) == b""
        assert await who(*fake.address) == b"a\n"
