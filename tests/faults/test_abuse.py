"""Promises 11 and 12: abuse of the health port, and bad or rotating files on disk."""

from __future__ import annotations

import datetime
import shutil
from pathlib import Path

import pytest
import trio
import trustme
from fakeapi import PkiFiles
from kaptest import (
    StartFake,
    kap_args,
    kap_process,
    make_config,
    split_hostport,
    start_kap,
    wait_until,
    who,
)

from kap.address import Address


async def healthz(addr: Address) -> float:
    """Seconds for one GET /healthz on a new connection."""
    start = trio.current_time()
    with trio.fail_after(5):
        s = await trio.open_tcp_stream(addr.host, addr.port)
        async with s:
            await s.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            reply = b""
            while chunk := await s.receive_some(4096):
                reply += chunk
    assert reply.startswith(b"HTTP/1.1 200")
    return trio.current_time() - start


async def test_health_port_abuse_costs_only_those_connections(
    nursery: trio.Nursery, start_fake: StartFake, pki: PkiFiles, figure: object
) -> None:
    a = await start_fake("a")
    app, bound = await start_kap(
        nursery, make_config(pki, fallback_upstreams=f"127.0.0.1:{a.address[1]}")
    )
    await wait_until(lambda: all(u.usable for u in app.pool.upstreams))
    h = bound.health
    idle: list[trio.SocketStream] = []
    for _ in range(1000):
        idle.append(await trio.open_tcp_stream(h.host, h.port))

    async def slowloris() -> None:
        with trio.move_on_after(3):
            s = await trio.open_tcp_stream(h.host, h.port)
            try:
                await s.send_all(b"GET /healthz HTTP/1.1\r\n")
                while True:
                    await s.send_all(b"X-a: b\r\n")
                    await trio.sleep(0.2)
            except trio.BrokenResourceError:
                pass

    async def junk(data: bytes) -> None:
        with trio.move_on_after(3):
            s = await trio.open_tcp_stream(h.host, h.port)
            try:
                await s.send_all(data)
                while await s.receive_some(65536):
                    pass
            except trio.BrokenResourceError:
                pass

    latencies: list[float] = []
    async with trio.open_nursery() as n:
        for _ in range(20):
            n.start_soon(slowloris)
        for data in (
            b"\x16\x03\x01" + bytes(5000),
            b"GET / HTTP/1.1\r\nX: " + b"a" * 100_000,
            b"\r\n" * 10_000,
            bytes(range(256)) * 100,
        ):
            n.start_soon(junk, data)
        for _ in range(20):
            latencies.append(await healthz(h))
            await trio.sleep(0.05)
    # The data path never noticed.
    assert await who(bound.proxy) == "a"
    for s in idle:
        await s.aclose()
    figure(
        "11 health port abuse",
        "slowest /healthz under 1,000 idle + slowloris + junk",
        max(latencies),
        "s",
    )
    assert max(latencies) < 1.0


BAD_FILES = {
    "empty": b"",
    "truncated": b'["127.0.0.9:6443", "127.0.',
    "garbage": b"\x00\xffnot json at all",
    "wrong type": b'{"upstreams": ["127.0.0.9:6443"]}',
    "huge": b"[" + b'"127.0.0.9:6443",' * 200_000 + b'"127.0.0.9:6443"]',
    "bad items": b'["127.0.0.9:6443", 42, "nope", "[::1]", null]',
}


@pytest.mark.parametrize("kind", [*BAD_FILES, "a directory"])
async def test_bad_fallback_file_is_logged_and_ignored(
    start_fake: StartFake, pki: PkiFiles, tmp_path: Path, kind: str
) -> None:
    a = await start_fake("a")
    path = tmp_path / "upstreams.json"
    if kind == "a directory":
        path.mkdir()
    else:
        path.write_bytes(BAD_FILES[kind])
    args = kap_args(f"127.0.0.1:{a.address[1]}", pki, fallback_file=str(path))
    async with kap_process(*args) as kap:
        target = Address(*split_hostport(kap.listen or ""))
        assert await who(target) == "a"
        assert kap.process.poll() is None
    logged = [line for line in kap.lines if "fallback" in line["msg"]]
    assert logged, kap.lines
    assert all("\n" not in str(line) for line in logged)
    if kind == "bad items":  # the good item is used, the bad ones skipped one line each
        assert len([line for line in logged if line["msg"] == "skipping a fallback entry"]) == 4
        assert "127.0.0.9:6443" in kap.find("kap started")[0]["upstreams"]


def _write_cert(ca: trustme.CA, cert: Path, key: Path, **kw: object) -> None:
    leaf = ca.issue_cert("kap.test", common_name="system:kap", **kw)  # type: ignore[arg-type]
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))


async def test_rotated_ca_and_client_certificate_are_picked_up_without_restart(
    nursery: trio.Nursery, start_fake: StartFake, pki: PkiFiles, tmp_path: Path, figure: object
) -> None:
    a = await start_fake("a", require_client_cert=True)
    ca_file, cert, key = tmp_path / "ca.crt", tmp_path / "cl.crt", tmp_path / "cl.key"
    # Start with the wrong CA and an expired client certificate.
    other = trustme.CA()
    other.cert_pem.write_to_path(str(ca_file))
    real_ca = trustme.CA.from_pem(pki.ca_file.read_bytes(), (pki.dir / "ca.key").read_bytes())
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    _write_cert(real_ca, cert, key, not_before=past - datetime.timedelta(days=2), not_after=past)
    cfg = make_config(
        None,
        fallback_upstreams=f"127.0.0.1:{a.address[1]}",
        ca_file=str(ca_file),
        cert_file=str(cert),
        key_file=str(key),
    )
    app, _ = await start_kap(nursery, cfg)
    up = app.pool.get(Address("127.0.0.1", a.address[1]))
    assert up is not None
    await wait_until(lambda: up.stats.probes_total >= 2)
    assert not up.usable and "certificate verify failed" in (up.last_error or "")
    # The operator fixes the CA on disk: verification passes, the cert is expired.
    shutil.copy(pki.ca_file, ca_file)
    await wait_until(lambda: up.last_error is not None and "verify failed" not in up.last_error)
    assert not up.usable or up.auth_refused
    # ... and rotates the client certificate: accepted, no restart.
    t0 = trio.current_time()
    _write_cert(real_ca, cert, key)
    await wait_until(lambda: up.usable and not up.auth_refused, timeout=5)
    figure(
        "12 bad files",
        "seconds to pick up a rotated client certificate",
        trio.current_time() - t0,
        "s",
    )
