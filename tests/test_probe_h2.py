"""HTTP/2 probes against the fake apiserver: ALPN, PINGs between two /readyz, GOAWAY.

Real sockets and TLS on loopback, trio's virtual clock (autojump): every
check's time is exact, so "one /readyz per readiness interval" is a count.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from fakeapi import FakeApiServer, PkiFiles
from kaptest import StartFake, get_json, make_config, start_kap, upstream, wait_until
from test_probe import fake_address, prober

from kap.address import Address
from kap.config import ConfigError, Credentials
from kap.credentials import CredentialFiles
from kap.events import ChangeFeed
from kap.membership import Membership, open_sets_channel
from kap.pool import SOURCE_FLAG, Pool
from kap.probe import Prober
from kap.probe_h2 import ALPN_H2
from kap.probe_schedule import PING, READYZ, ProbeScheduler, next_check

PROTOCOL_ERROR = 1


@pytest.mark.parametrize(
    ("protocol", "due", "since", "readiness", "expected"),
    [
        # Default: readiness interval = health interval, every check a /readyz.
        (ALPN_H2, False, 1.0, 1.0, READYZ),
        # Fleet setting, HTTP/2: PINGs until the readiness interval (less half an interval).
        (ALPN_H2, False, 1.0, 10.0, PING),
        (ALPN_H2, False, 9.0, 10.0, PING),
        (ALPN_H2, False, 9.5, 10.0, READYZ),
        (ALPN_H2, False, 10.2, 10.0, READYZ),
        # Never a /readyz yet, or one asked for (a failure, a poke, a GOAWAY).
        (ALPN_H2, False, None, 10.0, READYZ),
        (ALPN_H2, True, 1.0, 10.0, READYZ),
        # HTTP/1.1, or no open connection: /readyz every interval.
        ("http/1.1", False, 1.0, 10.0, READYZ),
        (None, False, 1.0, 10.0, READYZ),
    ],
)
def test_next_check(
    protocol: str | None, due: bool, since: float | None, readiness: float, expected: str
) -> None:
    kind = next_check(
        protocol=protocol,
        readyz_due=due,
        since_readyz=since,
        interval=1.0,
        readiness_interval=readiness,
    )
    assert kind == expected


@pytest.mark.parametrize(
    ("values", "line"),
    [
        ({"readiness_interval": "500ms"}, "below --health-interval"),
        ({"readiness_interval": "61s"}, "at most 60s"),
        ({"readiness_interval": "soon"}, "READINESS_INTERVAL"),
    ],
)
def test_a_bad_readiness_interval_is_one_line(values: dict[str, str], line: str) -> None:
    with pytest.raises(ConfigError) as e:
        make_config(None, health_interval="1s", **values)
    assert len(e.value.problems) == 1
    assert line in e.value.problems[0] and "--readiness-interval" in e.value.problems[0]


def test_the_readiness_interval_defaults_to_the_health_interval() -> None:
    assert make_config(None, health_interval="2s").readiness_interval == 2.0
    assert make_config(None, readiness_interval="30s").readiness_interval == 30.0


def scheduler(pki: PkiFiles, fake: FakeApiServer, **kw: Any) -> tuple[ProbeScheduler, Address]:
    address = fake_address(fake)
    pool = Pool()
    pool.set_source(SOURCE_FLAG, [address], now=trio.current_time())
    kw.setdefault("interval", 1.0)
    kw.setdefault("timeout", 0.1)
    sched = ProbeScheduler(pool=pool, prober=prober(pki), jitter=0.0, changes=ChangeFeed(), **kw)
    return sched, address


async def test_probes_speak_h2_when_the_apiserver_offers_it(
    nursery: trio.Nursery, start_fake: StartFake, pki: PkiFiles
) -> None:
    a = await start_fake("a")
    app, bound = await start_kap(
        nursery, make_config(pki, fallback_upstreams=f"127.0.0.1:{a.address[1]}")
    )
    await wait_until(lambda: upstream(app, a).usable)
    doc = await get_json(bound.health, "/upstreams")
    assert [u["protocol"] for u in doc["upstreams"]] == ["h2"]
    assert a.counts()["probe_h2"] >= 1 and a.counts()["probe_h1"] == 0


async def test_an_http11_apiserver_gets_readyz_every_interval_in_the_fleet_setting(
    nursery: trio.Nursery,
    start_fake: StartFake,
    pki: PkiFiles,
    autojump_clock: trio.testing.MockClock,
) -> None:
    a = await start_fake("a", http2=False)
    sched, address = scheduler(pki, a, readiness_interval=10.0)
    start = trio.current_time()
    with trio.move_on_after(5.5):
        await sched.run()
    assert sched.prober.protocol(address) == "http/1.1"
    assert [t - start for t in a.probe_times["/readyz"]] == pytest.approx([0, 1, 2, 3, 4, 5])
    assert a.counts() == {"probe_h1": 6, "probe_h2": 0, "ping": 0}


async def test_one_readyz_per_readiness_interval_and_pings_in_between(
    nursery: trio.Nursery,
    start_fake: StartFake,
    pki: PkiFiles,
    autojump_clock: trio.testing.MockClock,
) -> None:
    a = await start_fake("a")
    sched, address = scheduler(pki, a, readiness_interval=10.0)
    start = trio.current_time()
    with trio.move_on_after(25.5):
        await sched.run()
    assert sched.prober.protocol(address) == ALPN_H2
    assert [t - start for t in a.probe_times["/readyz"]] == pytest.approx([0, 10, 20])
    assert a.counts() == {"probe_h1": 0, "probe_h2": 3, "ping": 23}
    up = sched.pool.get(address)
    assert up is not None and up.stats.probes_total == 26 and up.stats.probe_failures_total == 0
    assert a.connections_total == 1


async def run_until(nursery: trio.Nursery, sched: ProbeScheduler, when: float, action: Any) -> None:
    """Start ``sched``; at ``when`` (from now) call ``action``."""
    start = trio.current_time()
    await nursery.start(sched.run)
    await trio.sleep_until(start + when)
    action()


async def test_a_missed_ping_fails_and_a_readyz_follows_at_once(
    nursery: trio.Nursery,
    start_fake: StartFake,
    pki: PkiFiles,
    autojump_clock: trio.testing.MockClock,
) -> None:
    a = await start_fake("a")
    sched, address = scheduler(pki, a, readiness_interval=10.0)
    start = trio.current_time()

    def stop_acking() -> None:
        a.ack_pings = False

    await run_until(nursery, sched, 1.5, stop_acking)  # after one PING at t=1
    await trio.sleep(1.0)
    up = sched.pool.get(address)
    assert up is not None
    # The PING at t=2 got no ack within 100 ms: a failed check; the /readyz
    # at once on a new connection passed.
    assert [t - start for t in a.probe_times["/readyz"]] == pytest.approx([0, 2.1])
    assert up.stats.probe_failures_total == 1 and up.probed_ok and up.usable
    assert a.connections_total == 2


async def test_a_hung_apiserver_fails_its_readyz_after_a_missed_ping(
    nursery: trio.Nursery,
    start_fake: StartFake,
    pki: PkiFiles,
    autojump_clock: trio.testing.MockClock,
) -> None:
    a = await start_fake("a")
    sched, address = scheduler(pki, a, readiness_interval=10.0)
    start = trio.current_time()

    def hang() -> None:
        a.ack_pings, a.readyz = False, "hang"

    await run_until(nursery, sched, 1.5, hang)
    up = sched.pool.get(address)
    assert up is not None
    await wait_until(lambda: not up.usable, timeout=5.0)
    # Out of rotation within interval + 3 x timeout + interval of the hang.
    assert trio.current_time() - (start + 1.5) <= 1.0 + 3 * 0.1 + 1.0
    assert a.counts()["ping"] == 2  # t=1 (acked) and t=2 (not): the rest are /readyz


async def test_goaway_no_error_reconnects_and_probes_at_once_without_a_failure(
    nursery: trio.Nursery,
    start_fake: StartFake,
    pki: PkiFiles,
    autojump_clock: trio.testing.MockClock,
) -> None:
    a = await start_fake("a")
    sched, address = scheduler(pki, a, readiness_interval=10.0)
    start = trio.current_time()
    await run_until(nursery, sched, 1.5, lambda: a.goaway(0))
    await trio.sleep(1.0)
    assert a.goaways_sent == [0]
    assert [t - start for t in a.probe_times["/readyz"]] == pytest.approx([0, 1.5])
    up = sched.pool.get(address)
    assert up is not None and up.stats.probe_failures_total == 0 and up.usable
    assert a.connections_total == 2


async def test_goaway_with_an_error_is_a_failed_probe(
    nursery: trio.Nursery,
    start_fake: StartFake,
    pki: PkiFiles,
    autojump_clock: trio.testing.MockClock,
) -> None:
    a = await start_fake("a")
    sched, address = scheduler(pki, a, readiness_interval=10.0)
    await run_until(nursery, sched, 1.5, lambda: a.goaway(PROTOCOL_ERROR))
    await trio.sleep(0.01)
    up = sched.pool.get(address)
    assert up is not None and up.stats.probe_failures_total == 1
    assert up.last_error == "GOAWAY PROTOCOL_ERROR"
    await trio.sleep(1.0)
    # The next check is a /readyz on a new connection, and it passes.
    assert a.counts()["probe_h2"] == 2 and a.connections_total == 2
    assert up.stats.probe_failures_total == 1


async def test_the_fake_sends_goaway_after_its_idle_limit_and_kap_reconnects(
    start_fake: StartFake, pki: PkiFiles, autojump_clock: trio.testing.MockClock
) -> None:
    """kube-apiserver's GOAWAY(NO_ERROR) after 90 s without a stream (PINGs do not count)."""
    a = await start_fake("a", h2_idle_goaway=5.0)
    p: Prober = prober(pki)
    address = fake_address(a)
    assert await p.open(address) is None and (await p.request(address)).ok
    start = trio.current_time()
    assert (await p.ping(address)).ok
    await p.idle(address)  # returns when the connection ends
    assert trio.current_time() - start == pytest.approx(5.0, abs=0.05)
    assert a.goaways_sent == [0] and p.open_protocol(address) is None
    assert await p.open(address) is None and (await p.request(address)).ok
    assert a.connections_total == 2
    await p.aclose()


async def test_a_poke_asks_for_a_readyz_at_once_in_the_fleet_setting(
    nursery: trio.Nursery,
    start_fake: StartFake,
    pki: PkiFiles,
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A failed dial or a passive failure pokes the upstream: a /readyz, not a PING."""
    a = await start_fake("a")
    sched, address = scheduler(pki, a, readiness_interval=10.0)
    start = trio.current_time()
    await run_until(nursery, sched, 1.5, lambda: sched.poke(address))
    await trio.sleep(1.2)
    assert [t - start for t in a.probe_times["/readyz"]] == pytest.approx([0, 1.5])
    assert a.counts()["ping"] == 2  # t=1, and t=2.5 (the next tick after the poke)


async def test_a_changed_slice_asks_for_a_readyz_at_once_in_the_fleet_setting(
    nursery: trio.Nursery,
    start_fake: StartFake,
    pki: PkiFiles,
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Discovery's new set reaches the scheduler as DISCOVERED: a /readyz of each member, now."""
    a = await start_fake("a")
    sched, address = scheduler(pki, a, readiness_interval=10.0)
    discovered, sets = open_sets_channel()
    membership = Membership(pool=sched.pool, changes=sched.changes, sets=sets)
    await nursery.start(membership.run)
    start = trio.current_time()
    await run_until(nursery, sched, 1.5, lambda: discovered.send_nowait([address]))
    await trio.sleep(1.2)
    assert [t - start for t in a.probe_times["/readyz"]] == pytest.approx([0, 1.5])
    assert a.counts()["ping"] == 2  # t=1, and t=2.5 (the next tick after the new set)


async def test_a_readyz_500_leaves_rotation_within_the_readiness_interval_plus_one_interval(
    nursery: trio.Nursery,
    start_fake: StartFake,
    pki: PkiFiles,
    autojump_clock: trio.testing.MockClock,
) -> None:
    """PINGs still pass on a shutting-down apiserver; its /readyz 500 counts, then only /readyz."""
    a = await start_fake("a")
    sched, address = scheduler(pki, a, readiness_interval=10.0)
    start = trio.current_time()

    def shutting_down() -> None:
        a.readyz = "500"

    await run_until(nursery, sched, 0.5, shutting_down)
    up = sched.pool.get(address)
    assert up is not None
    await wait_until(lambda: not up.usable, timeout=20.0)
    assert trio.current_time() - (start + 0.5) <= 10.0 + 1.0
    pings = a.counts()["ping"]
    await trio.sleep(3.0)
    assert a.counts()["ping"] == pings  # failing: every check is a /readyz


async def test_only_the_probes_context_offers_h2(
    start_fake: StartFake, pki: PkiFiles, tmp_path: Path
) -> None:
    """Discovery keeps HTTP/1.1 (httpx2, http2 off); both contexts come from the same files."""
    a = await start_fake("a")
    ca = tmp_path / "ca.crt"
    ca.write_bytes(pki.ca_file.read_bytes())
    credentials = CredentialFiles(Credentials(ca_file=str(ca)))

    async def alpn(context: ssl.SSLContext) -> str | None:
        host, port = a.address
        stream = await trio.open_ssl_over_tcp_stream(
            host, port, ssl_context=context, https_compatible=True
        )
        await stream.do_handshake()
        protocol = stream.selected_alpn_protocol()
        await trio.aclose_forcefully(stream)
        return protocol

    assert await alpn(credentials.ssl_context()) == "http/1.1"
    assert await alpn(credentials.probe_ssl_context()) == ALPN_H2
    generation = credentials.generation
    ca.write_text("not a certificate")  # a bad rotation: both keep the last good ones
    assert await alpn(credentials.probe_ssl_context()) == ALPN_H2
    assert await alpn(credentials.ssl_context()) == "http/1.1"
    assert credentials.generation == generation
