"""Promise 3: a black-holed apiserver (packets dropped, no RST, no ICMP).

The apiserver runs inside a network namespace this test creates, behind a veth
link; iptables in that namespace drops everything. Skipped, with the reason,
where the machine cannot make namespaces.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio
from fakeapi import PkiFiles, fake_api_process
from kaptest import ONE_TIER, StartFake, make_config, settled, start_kap, wait_until, who
from netns import Netns, NetnsUnavailable

from kap.address import Address


@pytest.fixture
def netns() -> Iterator[Netns]:
    try:
        ns = Netns.create()
    except NetnsUnavailable as e:
        pytest.skip(str(e))
    try:
        yield ns
    finally:
        ns.delete()


async def test_blackholed_upstream_dials_fail_over_and_connections_die(
    nursery: trio.Nursery,
    netns: Netns,
    pki: PkiFiles,
    start_fake: StartFake,
    figure: object,
) -> None:
    other = await start_fake("other", host="127.0.0.2")
    async with fake_api_process(
        "holed", pki, host=netns.ns_ip, port=6443, wrapper=netns.exec_prefix
    ) as holed:
        holed_addr = Address(netns.ns_ip, 6443)
        cfg = make_config(
            pki,
            fallback_upstreams=f"{holed_addr},127.0.0.2:{other.address[1]}",
            dial_timeout="1s",
            tcp_user_timeout="2s",
            keepalive_period="1s",
            health_interval="1s",
            health_timeout="100ms",
        )
        app, bound = await start_kap(nursery, cfg, tier_thresholds=ONE_TIER)
        await wait_until(lambda: settled(app), timeout=10)
        # Idle long-lived connections (watches) through kap to the holed apiserver.
        idle = []
        for _ in range(6):
            s = await trio.open_tcp_stream(bound.proxy.host, bound.proxy.port)
            await s.send_all(b"WHO\n")
            if (await s.receive_some(10)).strip() == b"holed":
                idle.append(s)
            else:
                await s.aclose()
        assert idle

        netns.blackhole()
        t0 = trio.current_time()

        # New clients right away: the pool still thinks it is fine, so some dial
        # it, time out after --dial-timeout, and move on.
        answers: list[tuple[str, float]] = []

        async def one() -> None:
            start = trio.current_time()
            answers.append((await who(bound.proxy, timeout=5), trio.current_time() - start))

        async with trio.open_nursery() as n:
            for _ in range(4):
                n.start_soon(one)
        slowest = max(t for _, t in answers)
        assert {a for a, _ in answers} == {"other"}
        assert slowest <= 1.0 + 0.5  # one dial timeout, then the other upstream

        # The idle connections die by keepalive + TCP_USER_TIMEOUT, and kap
        # closes the client side.
        died: list[float] = []

        async def wait_dead(s: trio.SocketStream) -> None:
            with trio.fail_after(15):
                try:
                    while await s.receive_some(100):
                        pass
                except trio.BrokenResourceError:
                    pass
            died.append(trio.current_time() - t0)
            await s.aclose()

        async with trio.open_nursery() as n:
            for s in idle:
                n.start_soon(wait_dead, s)
        assert not app.pool.get(holed_addr).usable  # type: ignore[union-attr]
        figure("3 black-holed upstream", "slowest new client (dial timeout 1s)", slowest, "s")
        figure(
            "3 black-holed upstream",
            "idle connections closed after (user timeout 2s, keepalive 1s)",
            max(died),
            "s",
        )
        figure("3 black-holed upstream", "failed new clients", 0)
        assert max(died) <= 2.0 + 1.0 + 2.5
        holed.kill()
