"""The prober against fake apiservers: kept-alive connections, distant and untrusted ones."""

from __future__ import annotations

from pathlib import Path

import trio
from delayproxy import DelayProxy
from fakeapi import FakeApiServer, PkiFiles, create_pki
from kaptest import StartFake, make_config, start_kap, upstream, wait_until, who
from loguru import logger

from kap.address import Address
from kap.config import Credentials
from kap.credentials import CredentialFiles
from kap.events import ChangeFeed
from kap.pool import SOURCE_FLAG, Pool
from kap.probe import Prober
from kap.probe_schedule import ProbeScheduler

# One way: an apiserver behind the proxy is a 40 ms round trip away, as a
# remote or cross-zone control plane is.
ONE_WAY = 0.020
# kap's defaults (README, kap/config.py): what a new user runs with.
DEFAULT_HEALTH = {"health_interval": "1s", "health_timeout": "100ms", "health_jitter": "0.2"}


def prober(pki: PkiFiles, *, server_name: str = "") -> Prober:
    return Prober(CredentialFiles(Credentials(ca_file=str(pki.ca_file))), server_name)


def fake_address(fake: object) -> Address:
    host, port = fake.address  # type: ignore[attr-defined]
    return Address(host, port)


async def test_probes_reuse_one_connection(start_fake: StartFake, pki: PkiFiles) -> None:
    a = await start_fake("a")
    p = prober(pki)
    address = fake_address(a)
    for _ in range(3):
        assert await p.open(address) is None
        result = await p.request(address)
        assert result.ok and result.status == 200 and result.latency is not None
    assert a.probe_count() == 3 and a.connections_total == 1
    await p.aclose()


async def test_a_connection_the_apiserver_closed_is_reopened_without_a_failure(
    start_fake: StartFake, pki: PkiFiles
) -> None:
    a = await start_fake("a")
    p = prober(pki)
    address = fake_address(a)
    assert await p.open(address) is None
    assert (await p.request(address)).ok
    a.drop_connections()  # as an apiserver restarting, or ending idle connections
    await wait_until(lambda: a.active_connections == 0)
    assert await p.open(address) is None
    assert (await p.request(address)).ok
    assert a.connections_total == 2
    await p.aclose()


async def test_rotated_credentials_reopen_the_connection(
    start_fake: StartFake, pki: PkiFiles, tmp_path: Path
) -> None:
    a = await start_fake("a")
    ca = tmp_path / "ca.crt"
    ca.write_bytes(pki.ca_file.read_bytes())
    p = Prober(CredentialFiles(Credentials(ca_file=str(ca))), "")
    address = fake_address(a)
    assert await p.open(address) is None and (await p.request(address)).ok
    ca.write_bytes(pki.ca_file.read_bytes() + b"\n")  # a rotation: a new file
    assert await p.open(address) is None and (await p.request(address)).ok
    assert a.connections_total == 2 and a.probe_count() == 2
    await p.aclose()


async def test_an_http_error_keeps_its_status_and_body(
    start_fake: StartFake, pki: PkiFiles
) -> None:
    a = await start_fake("a", readyz="500")
    p = prober(pki)
    assert await p.open(fake_address(a)) is None
    result = await p.request(fake_address(a))
    assert not result.ok and result.status == 500
    assert result.error is not None and result.error.startswith("HTTP 500")
    await p.aclose()


async def test_a_certificate_from_another_ca_fails_and_no_token_is_sent(
    nursery: trio.Nursery, start_fake: StartFake, pki: PkiFiles, tmp_path: Path
) -> None:
    """Item: an apiserver kap cannot verify is unhealthy and gets no client."""
    stranger = FakeApiServer("stranger", create_pki(tmp_path))  # its own trustme CA
    await nursery.start(stranger.run)
    good = await start_fake("good")
    cfg = make_config(
        pki,
        fallback_upstreams=f"127.0.0.1:{stranger.address[1]},127.0.0.1:{good.address[1]}",
        token_file=str(pki.token_file),
    )
    app, bound = await start_kap(nursery, cfg)
    await wait_until(lambda: upstream(app, stranger).stats.probes_total >= 3)
    await wait_until(lambda: upstream(app, good).usable)
    bad = upstream(app, stranger)
    assert not bad.usable and not bad.probed_ok
    assert bad.last_error.startswith("certificate verify failed")
    for _ in range(6):
        assert await who(bound.proxy) == "good"
    # kap did connect (the handshakes failed on the stranger's side too), and
    # nothing reached it: no request, so no token, and no client.
    assert stranger.connections_total >= 3 and stranger.connection_errors >= 3
    assert stranger.requests == [] and stranger.raw_connections == 0


async def test_three_distant_apiservers_are_healthy_with_the_default_flags(
    nursery: trio.Nursery, start_fake: StartFake, pki: PkiFiles, figure: object
) -> None:
    """40 ms away, --health-timeout 100ms: healthy at once, latency one round trip."""
    fakes = [await start_fake(name) for name in ("a", "b", "c")]
    proxies = [DelayProxy(fake.address, ONE_WAY) for fake in fakes]
    for proxy in proxies:
        await nursery.start(proxy.run)
    upstreams = ",".join(f"127.0.0.1:{proxy.address[1]}" for proxy in proxies)  # type: ignore[index]
    start = trio.current_time()
    app, bound = await start_kap(
        nursery, make_config(pki, fallback_upstreams=upstreams, **DEFAULT_HEALTH)
    )
    await wait_until(lambda: all(u.usable for u in app.pool.upstreams), timeout=5)
    healthy_after = trio.current_time() - start
    answers = {await who(bound.proxy) for _ in range(9)}
    assert answers <= {"a", "b", "c"} and answers
    # A few more probes each, on the kept-alive connections.
    await wait_until(lambda: all(u.stats.probes_total >= 4 for u in app.pool.upstreams), timeout=8)
    latencies = [u.latency for u in app.pool.upstreams]
    figure("probe 40 ms away", "seconds until all 3 upstreams are healthy", healthy_after, "s")
    for u in app.pool.upstreams:
        figure("probe 40 ms away", f"latency_ms of {u.address}", u.latency * 1e3, "ms")
    assert all(u.usable and u.stats.probe_failures_total == 0 for u in app.pool.upstreams)
    # One round trip (40 ms plus the fake's answer), not two: the connection's
    # opening is not in it.
    assert all(2 * ONE_WAY <= lat < 4 * ONE_WAY for lat in latencies), latencies  # type: ignore[operator]
    assert all(fake.connections_total - fake.raw_connections == 1 for fake in fakes)


async def test_a_timed_out_request_does_not_doom_the_next_probe(
    nursery: trio.Nursery, start_fake: StartFake, pki: PkiFiles
) -> None:
    """After a timeout the next probe opens a new connection outside the request deadline."""
    a = await start_fake("a")
    proxy = DelayProxy(a.address, ONE_WAY)  # type: ignore[arg-type]
    await nursery.start(proxy.run)
    address = Address("127.0.0.1", proxy.address[1])  # type: ignore[index]
    pool = Pool()
    pool.set_source(SOURCE_FLAG, [address], now=trio.current_time())
    sched = ProbeScheduler(
        pool=pool, prober=prober(pki), interval=1.0, timeout=0.1, jitter=0.0,
        changes=ChangeFeed(),
    )  # fmt: skip
    assert (await sched.probe_once(address)).ok
    a.readyz = "hang"
    assert (await sched.probe_once(address)).error == "timeout after 100ms"
    a.readyz = "200"
    result = await sched.probe_once(address)
    assert result.ok and proxy.connections_total == 2
    await sched.prober.aclose()


async def test_an_upstream_that_never_answers_is_warned_about_once_not_as_a_transition(
    nursery: trio.Nursery, start_fake: StartFake, pki: PkiFiles, free_port: int
) -> None:
    messages: list[str] = []
    sink = logger.add(lambda m: messages.append(m.record["message"]), level="INFO")
    try:
        a = await start_fake("a")
        dead = Address("127.0.0.1", free_port)  # nothing listens there
        cfg = make_config(pki, fallback_upstreams=f"{dead},127.0.0.1:{a.address[1]}")
        app, _ = await start_kap(nursery, cfg)  # probes every 100 ms
        never = "upstream not healthy since it was added"
        await wait_until(lambda: never in messages)
        await wait_until(lambda: app.pool.get(dead).stats.probes_total >= 10)  # type: ignore[union-attr]
    finally:
        logger.remove(sink)
    assert messages.count(never) == 1
    assert "upstream unhealthy" not in messages
    assert messages.count("upstream healthy") == 1  # a's
