"""kap in front of fake apiservers, through real sockets and real TLS on 127.0.0.1."""

from __future__ import annotations

import contextlib
import socket
from collections import Counter

import kaptest
import pytest
import trio
from fakeapi import PkiFiles
from kaptest import StartFake, get_json, make_config, settled, start_kap, upstream, wait_until, who
from relaytest import fill_accept_queue

from kap.address import Address
from kap.pool import SCORE_MAX, Pool
from kap.proxy import Proxy
from kap.relay import Relay
from kap.sockets import TcpOptions


def fallback(*fakes: object) -> str:
    return ",".join(f"{f.address[0]}:{f.address[1]}" for f in fakes)  # type: ignore[attr-defined]


async def test_balances_across_equal_upstreams(
    nursery: trio.Nursery, start_fake: StartFake, pki: PkiFiles
) -> None:
    fakes = [await start_fake(n) for n in "abc"]
    app, bound = await start_kap(
        nursery,
        make_config(pki, fallback_upstreams=fallback(*fakes)),
        tier_thresholds=kaptest.ONE_TIER,
    )
    await wait_until(lambda: settled(app))
    seen = Counter([await who(bound.proxy) for _ in range(30)])
    assert seen == {"a": 10, "b": 10, "c": 10}


async def test_killed_upstream_gets_no_new_connections_and_clients_see_no_errors(
    nursery: trio.Nursery, start_fake: StartFake, pki: PkiFiles
) -> None:
    a, b = await start_fake("a"), await start_fake("b")
    app, bound = await start_kap(
        nursery,
        make_config(pki, fallback_upstreams=fallback(a, b)),
        tier_thresholds=kaptest.ONE_TIER,
    )
    await wait_until(lambda: settled(app))
    assert {await who(bound.proxy) for _ in range(4)} == {"a", "b"}
    a.stop()  # listener closed: dials are refused from now on
    answers = [await who(bound.proxy) for _ in range(20)]
    assert answers == ["b"] * 20
    # The refused dials and the failing probes took it out of rotation.
    await wait_until(lambda: not upstream(app, a).usable)
    assert upstream(app, a).stats.dial_failures_total >= 1
    assert app.proxy.stats.no_upstream_total == 0


async def test_readyz_500_leaves_rotation_and_comes_back(
    nursery: trio.Nursery, start_fake: StartFake, pki: PkiFiles
) -> None:
    a, b = await start_fake("a"), await start_fake("b")
    app, bound = await start_kap(
        nursery,
        make_config(pki, fallback_upstreams=fallback(a, b)),
        tier_thresholds=kaptest.ONE_TIER,
    )
    await wait_until(lambda: upstream(app, a).score == SCORE_MAX)
    a.readyz = "500"
    # From +3 it takes 4 failed probes; interval 100 ms: well within 2 s.
    await wait_until(lambda: not upstream(app, a).usable, timeout=2.0)
    assert upstream(app, a).last_error.startswith("HTTP 500")
    assert {await who(bound.proxy) for _ in range(10)} == {"b"}
    a.readyz = "200"
    await wait_until(lambda: upstream(app, a).usable, timeout=2.0)
    # Stable upstreams are preferred: a shares the traffic once its score is full.
    await wait_until(lambda: upstream(app, a).score == SCORE_MAX, timeout=2.0)
    assert {await who(bound.proxy) for _ in range(10)} == {"a", "b"}


async def test_hung_readyz_does_not_delay_other_probes(
    nursery: trio.Nursery, start_fake: StartFake, pki: PkiFiles
) -> None:
    hung, ok = await start_fake("hung", readyz="hang"), await start_fake("ok")
    cfg = make_config(
        pki, fallback_upstreams=fallback(hung, ok), health_timeout="1s", health_jitter="0"
    )
    app, _ = await start_kap(nursery, cfg)
    await trio.sleep(1.5)
    # ok was probed about every 100 ms although hung eats a 1 s timeout per probe.
    assert ok.probe_count() >= 10
    assert hung.probe_count() <= 2
    assert upstream(app, ok).usable and not upstream(app, hung).usable


async def test_half_close_is_propagated_through_kap(
    nursery: trio.Nursery, start_fake: StartFake, pki: PkiFiles
) -> None:
    a = await start_fake("a")
    app, bound = await start_kap(nursery, make_config(pki, fallback_upstreams=fallback(a)))
    await wait_until(lambda: upstream(app, a).usable)
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream(bound.proxy.host, bound.proxy.port)
        payload = b"x" * 100_000
        await stream.send_all(payload)
        await stream.send_eof()  # our FIN reaches the fake; it echoes the rest, then FINs
        got = b""
        while chunk := await stream.receive_some(65536):
            got += chunk
        await stream.aclose()
    assert got == payload


async def test_all_down_uses_the_default_service_then_every_upstream(
    nursery: trio.Nursery, start_fake: StartFake, pki: PkiFiles
) -> None:
    a = await start_fake("a", readyz="500")
    service = await start_fake("service", readyz="500")
    env = {"KUBERNETES_SERVICE_HOST": service.address[0],
           "KUBERNETES_SERVICE_PORT": str(service.address[1])}  # fmt: skip
    app, bound = await start_kap(
        nursery, make_config(pki, environ=env, fallback_upstreams=fallback(a))
    )
    await wait_until(lambda: upstream(app, a).stats.probes_total >= 2)
    assert not upstream(app, a).usable
    # Nothing usable: the Service first ...
    assert await who(bound.proxy) == "service"
    doc = await get_json(bound.health, "/upstreams")
    assert doc["fallback_service"] == f"{service.address[0]}:{service.address[1]}"
    # ... and when it is gone too, the unhealthy upstream still gets the client.
    service.stop()
    assert await who(bound.proxy) == "a"


async def test_client_is_closed_when_nothing_answers(nursery: trio.Nursery, pki: PkiFiles) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # bound, not listening: refused
        app, bound = await start_kap(
            nursery, make_config(pki, fallback_upstreams=f"127.0.0.1:{dead}")
        )
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream(bound.proxy.host, bound.proxy.port)
            assert await stream.receive_some(10) == b""
        await wait_until(lambda: app.proxy.stats.no_upstream_total == 1)
        up = app.pool.get(Address("127.0.0.1", dead))
        assert up is not None and up.stats.dial_failures_total == 1


async def test_probes_present_client_certificate(
    nursery: trio.Nursery, start_fake: StartFake, pki: PkiFiles
) -> None:
    a = await start_fake("a", require_client_cert=True)
    cfg = make_config(pki, fallback_upstreams=fallback(a), cert_file=str(pki.client_cert_file),
                      key_file=str(pki.client_key_file))  # fmt: skip
    app, _ = await start_kap(nursery, cfg)
    await wait_until(lambda: upstream(app, a).stats.probes_total >= 2)
    assert upstream(app, a).usable and not upstream(app, a).auth_refused


async def test_probes_send_the_token_and_reread_it_when_it_rotates(
    nursery: trio.Nursery, start_fake: StartFake, pki: PkiFiles, tmp_path: object
) -> None:
    import pathlib

    token = pathlib.Path(str(tmp_path)) / "token"
    token.write_text("first\n")
    a = await start_fake("a", require_token="first")
    app, _ = await start_kap(
        nursery, make_config(pki, fallback_upstreams=fallback(a), token_file=str(token))
    )
    await wait_until(lambda: upstream(app, a).stats.probes_total >= 2)
    assert not upstream(app, a).auth_refused
    a.require_token = "second"
    await wait_until(lambda: upstream(app, a).auth_refused)
    token.write_text("second-but-longer\n")  # size changes: a new stamp
    a.require_token = "second-but-longer"
    await wait_until(lambda: not upstream(app, a).auth_refused)


async def test_refused_credentials_count_as_alive_and_show_in_upstreams(
    nursery: trio.Nursery, start_fake: StartFake, pki: PkiFiles
) -> None:
    a = await start_fake("a", require_client_cert=True)
    app, bound = await start_kap(nursery, make_config(pki, fallback_upstreams=fallback(a)))
    await wait_until(lambda: upstream(app, a).usable and upstream(app, a).stats.probes_total >= 2)
    doc = await get_json(bound.health, "/upstreams")
    (entry,) = doc["upstreams"]
    assert entry["healthy"] is True and entry["auth_refused"] is True
    assert "403" in entry["last_error"]


async def test_wrong_tls_server_name_fails_the_probe(
    nursery: trio.Nursery, start_fake: StartFake, pki: PkiFiles
) -> None:
    a = await start_fake("a")
    cfg = make_config(pki, fallback_upstreams=fallback(a), tls_server_name="not-the-apiserver")
    app, _ = await start_kap(nursery, cfg)
    await wait_until(lambda: upstream(app, a).stats.probes_total >= 2)
    up = upstream(app, a)
    assert not up.usable
    assert "certificate verify failed" in up.last_error


async def test_empty_tls_server_name_verifies_the_dialed_address(
    nursery: trio.Nursery, start_fake: StartFake, pki: PkiFiles
) -> None:
    a = await start_fake("a")
    app, _ = await start_kap(nursery, make_config(pki, fallback_upstreams=fallback(a),
                                                  tls_server_name=""))  # fmt: skip
    await wait_until(lambda: upstream(app, a).usable)


async def test_upstreams_and_metrics_report_the_state_without_moving_the_cursor(
    nursery: trio.Nursery, start_fake: StartFake, pki: PkiFiles
) -> None:
    a, b = await start_fake("a"), await start_fake("b")
    app, bound = await start_kap(
        nursery,
        make_config(pki, fallback_upstreams=fallback(a, b)),
        tier_thresholds=kaptest.ONE_TIER,
    )
    await wait_until(lambda: settled(app))
    first = await who(bound.proxy)
    for _ in range(3):
        doc = await get_json(bound.health, "/upstreams")
    second = await who(bound.proxy)
    assert {first, second} == {"a", "b"}
    keys = {"address", "sources", "healthy", "score", "tier", "latency_ms", "last_error",
            "active_connections", "connections_total", "dial_failures_total"}  # fmt: skip
    for entry in doc["upstreams"]:
        assert keys <= set(entry)
        assert entry["sources"] == ["flag"]
    import httpx2

    async with httpx2.AsyncClient(trust_env=False) as client:
        text = (await client.get(f"http://{bound.health}/metrics")).text
    for name in (
        "kap_upstream_healthy{", "kap_upstream_score{", "kap_upstream_tier{",
        "kap_upstream_probe_duration_seconds_bucket{", "kap_upstream_active_connections{",
        "kap_upstream_connections_total{", "kap_upstream_dial_failures_total{",
        "kap_connections_no_upstream_total ", 'kap_bytes_total{direction="up"}',
    ):  # fmt: skip
        assert name in text, name
    assert f'kap_upstream_healthy{{upstream="{a.address[0]}:{a.address[1]}"}} 1.0' in text


@pytest.mark.parametrize("family", ["ipv6"])
async def test_ipv6_listener_and_upstream(
    nursery: trio.Nursery, start_fake: StartFake, pki: PkiFiles, family: str
) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        a = await start_fake("a", host="::1")
    except OSError as e:
        pytest.skip(f"cannot bind ::1: {e}")
    cfg = make_config(pki, listen_addr="::1", fallback_upstreams=f"[::1]:{a.address[1]}")
    app, bound = await start_kap(nursery, cfg)
    await wait_until(lambda: app.pool.get(Address("::1", a.address[1])).usable)  # type: ignore[union-attr]
    assert await who(bound.proxy) == "a"


def test_client_sockets_inherit_tcp_options_from_the_listener() -> None:
    # Proxy.run sets the TCP options on the listener only (bind_listener): Linux
    # clones each accepted socket from it, which saves five setsockopt calls
    # per client. If a kernel stopped copying them, keepalive would go silently.
    from kap.sockets import TcpOptions, bind_listener

    listener = bind_listener("127.0.0.1", 0, options=TcpOptions(3.0, 7.0))
    with listener, socket.create_connection(listener.getsockname()[:2]) as _peer:
        listener.setblocking(True)
        accepted, _ = listener.accept()
        with accepted:
            tcp = socket.IPPROTO_TCP
            assert accepted.getsockopt(tcp, socket.TCP_NODELAY) == 1
            assert accepted.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert accepted.getsockopt(tcp, socket.TCP_KEEPIDLE) == 3
            assert accepted.getsockopt(tcp, socket.TCP_KEEPINTVL) == 3
            assert accepted.getsockopt(tcp, socket.TCP_USER_TIMEOUT) == 7000


async def bad_upstream(nursery: trio.Nursery, *, reset: bool) -> int:
    """A raw upstream that reads what a client sends, then closes (or resets) without a byte."""
    import struct

    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(16)

    async def serve() -> None:
        while True:
            conn, _ = await listener.accept()
            with conn:
                await conn.recv(100)
                if reset:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    nursery.start_soon(serve)
    return int(listener.getsockname()[1])


@pytest.mark.parametrize("reset", [True, False])
async def test_upstream_that_resets_or_closes_unanswered_counts_against_it(
    nursery: trio.Nursery, start_fake: StartFake, pki: PkiFiles, reset: bool
) -> None:
    port = await bad_upstream(nursery, reset=reset)
    a = await start_fake("a")
    bad = Address("127.0.0.1", port)
    app, bound = await start_kap(
        nursery, make_config(pki, fallback_upstreams=f"{bad},{fallback(a)}")
    )
    up = app.pool.get(bad)
    assert up is not None
    # Its /readyz "passes" for this test: it is a raw server, so mark it by hand.
    app.pool.record_probe(bad, ok=True, latency=1e-4, now=trio.current_time())
    await wait_until(lambda: upstream(app, a).usable)
    app.probes.interval = 60.0  # keep probes from clearing the verdict during the test
    with trio.fail_after(5):
        while up.usable:
            s = await trio.open_tcp_stream(bound.proxy.host, bound.proxy.port)
            await s.send_all(b"\x16hello")
            with contextlib.suppress(trio.BrokenResourceError):
                await s.receive_some(10)
            await s.aclose()
            await trio.sleep(0.01)
    assert up.suspect
    assert app.proxy.stats.passive_failures_total >= 1
    assert await who(bound.proxy) == "a"  # the next client goes elsewhere


async def test_draining_an_upstream_also_cancels_the_clients_still_dialing_it() -> None:
    """A connection counts as its upstream's from the start of its dial (not from the
    relay's say-so once connected), so a drain or removal misses no dial in flight."""
    with socket.socket() as full, trio.fail_after(10):
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        queued = fill_accept_queue(full)  # a dial to it hangs
        hanging = Address("127.0.0.1", full.getsockname()[1])
        pool = Pool()
        pool.set_source("flag", [hanging], now=trio.current_time())
        pool.record_probe(hanging, ok=True, latency=1e-4, now=trio.current_time())
        relay = Relay()
        proxy = Proxy("127.0.0.1", 0, pool, relay, TcpOptions(), 30.0, on_changes=lambda _: None)
        async with trio.open_nursery() as nursery:
            await nursery.start(relay.run)
            bound = await nursery.start(proxy.run)
            client = await trio.open_tcp_stream(bound.host, bound.port)
            await wait_until(lambda: len(proxy.connections_to(hanging)) == 1)
            up = pool.get(hanging)
            assert up is not None and up.active_connections == 1 and relay.dialing == 1
            assert await proxy.close_connections(hanging) == 1
            assert await client.receive_some(10) == b""  # closed, not left hanging
            await wait_until(lambda: proxy.active == 0)
            assert (up.active_connections, up.stats.dial_failures_total, relay.dialing) == (0, 0, 0)
            await client.aclose()
            nursery.cancel_scope.cancel()
        for s in queued:
            s.close()
