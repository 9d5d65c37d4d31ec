"""The probe scheduler's timing, on trio's virtual clock (no real sleeps)."""

from __future__ import annotations

import itertools
import random

import attrs
import pytest
import trio
import trio.testing

from kap.address import Address
from kap.events import Change, ChangeFeed, ChangeKind
from kap.pool import SOURCE_FLAG, Pool
from kap.probe import ProbeResult
from kap.probe_schedule import ProbeScheduler, next_delay, open_budget
from kap.upstream import fast_delay

A, B, C = (Address(f"10.0.0.{i}", 6443) for i in range(1, 4))


@attrs.define
class ScriptedProber:
    """A prober whose upstreams behave by name.

    'ok', 'fail' (HTTP 500), 'hang' (the request never answers), 'slow:<s>'
    (the request takes s seconds), 'hang-open' (the connection never opens),
    'slow-open:<s>' (opening takes s seconds, then 'ok'), 'refuse' (the
    connection is refused). A connection stays open until forgotten.
    """

    behaviour: dict[Address, str]
    calls: dict[Address, list[float]] = attrs.field(factory=dict)
    opens: dict[Address, list[float]] = attrs.field(factory=dict)
    forgotten: list[Address] = attrs.field(factory=list)
    connected: set[Address] = attrs.field(factory=set)

    async def open(self, address: Address) -> ProbeResult | None:
        if address in self.connected:
            return None
        self.opens.setdefault(address, []).append(trio.current_time())
        how = self.behaviour[address]
        if how == "hang-open":
            await trio.sleep_forever()
        if how.startswith("slow-open:"):
            await trio.sleep(float(how.split(":")[1]))
        if how == "refuse":
            return ProbeResult(ok=False, error="Connection refused")
        self.connected.add(address)
        return None

    async def request(self, address: Address) -> ProbeResult:
        self.calls.setdefault(address, []).append(trio.current_time())
        how = self.behaviour[address]
        if how == "hang":
            await trio.sleep_forever()
        if how.startswith("slow:"):
            await trio.sleep(float(how.split(":")[1]))
        if how == "fail":
            return ProbeResult(ok=False, status=500, error="HTTP 500")
        return ProbeResult(ok=True, status=200, latency=0.0005, duration=0.0005)

    async def forget(self, address: Address) -> None:
        self.connected.discard(address)
        self.forgotten.append(address)

    async def aclose(self) -> None:
        pass

    def open_protocol(self, address: Address) -> str | None:
        return "http/1.1" if address in self.connected else None

    async def idle(self, address: Address) -> None:
        await trio.sleep_forever()


def scheduler(
    pool: Pool,
    prober: ScriptedProber,
    *,
    jitter: float = 0.0,
    changes: ChangeFeed | None = None,
    **kw: float,
) -> ProbeScheduler:
    return ProbeScheduler(
        pool=pool, prober=prober, interval=kw.get("interval", 1.0),  # type: ignore[arg-type]
        timeout=kw.get("timeout", 0.1), jitter=jitter, changes=changes or ChangeFeed(),
        rng=random.Random(7),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("interval", "jitter", "u", "delay"),
    [(1.0, 0.2, -1.0, 0.8), (1.0, 0.2, 1.0, 1.2), (1.0, 0.0, 0.7, 1.0), (2.0, 1.0, -1.0, 0.0)],
)
def test_next_delay_formula(interval: float, jitter: float, u: float, delay: float) -> None:
    assert next_delay(interval, jitter, u) == pytest.approx(delay)


async def test_first_round_runs_at_start_and_then_every_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pool = Pool()
    pool.set_source(SOURCE_FLAG, [A, B], now=0)
    prober = ScriptedProber({A: "ok", B: "ok"})
    sched = scheduler(pool, prober)
    async with trio.open_nursery() as nursery:
        await nursery.start(sched.run)
        await trio.sleep(3.5)
        nursery.cancel_scope.cancel()
    assert prober.calls[A] == [0.0, 1.0, 2.0, 3.0]
    assert prober.calls[B] == [0.0, 1.0, 2.0, 3.0]
    assert pool.get(A).usable  # type: ignore[union-attr]


async def test_jitter_keeps_every_gap_within_its_bounds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pool = Pool()
    pool.set_source(SOURCE_FLAG, [A, B, C], now=0)
    prober = ScriptedProber(dict.fromkeys([A, B, C], "ok"))
    sched = scheduler(pool, prober, jitter=0.2)
    async with trio.open_nursery() as nursery:
        await nursery.start(sched.run)
        await trio.sleep(60)
        nursery.cancel_scope.cancel()
    gaps = [b - a for calls in prober.calls.values() for a, b in itertools.pairwise(calls)]
    assert min(gaps) >= 0.8 - 1e-9 and max(gaps) <= 1.2 + 1e-9
    assert max(gaps) - min(gaps) > 0.2  # the jitter is really there
    # Upstreams drift apart instead of probing in lockstep.
    assert prober.calls[A][5] != prober.calls[B][5]


async def test_a_hung_upstream_times_out_alone(autojump_clock: trio.testing.MockClock) -> None:
    pool = Pool()
    pool.set_source(SOURCE_FLAG, [A, B], now=0)
    prober = ScriptedProber({A: "hang", B: "ok"})
    sched = scheduler(pool, prober, timeout=0.1)
    async with trio.open_nursery() as nursery:
        await nursery.start(sched.run)
        await trio.sleep(2.5)
        nursery.cancel_scope.cancel()
    assert prober.calls[B] == [0.0, 1.0, 2.0]
    # A's probes each take the 100 ms timeout, then the interval.
    assert prober.calls[A] == pytest.approx([0.0, 1.1, 2.2])
    up = pool.get(A)
    assert up is not None and up.last_error == "timeout after 100ms" and not up.usable
    assert A in prober.forgotten  # the connection of a timed-out probe is dropped


async def test_probe_tasks_follow_the_published_membership_changes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pool = Pool(removal_grace=0)
    pool.set_source("discovery", [A], now=0)
    prober = ScriptedProber({A: "ok", B: "ok"})
    feed = ChangeFeed()
    sched = scheduler(pool, prober, changes=feed)
    async with trio.open_nursery() as nursery:
        await nursery.start(sched.run)
        await trio.sleep(1.5)
        feed.publish(pool.set_source("discovery", [B], now=trio.current_time()))  # ADDED B
        feed.publish(pool.expire(trio.current_time()))  # REMOVED A
        await trio.sleep(2.2)
        nursery.cancel_scope.cancel()
    assert prober.calls[A] == [0.0, 1.0]
    assert prober.calls[B] == [1.5, 2.5, 3.5]
    assert A in prober.forgotten


async def test_failures_and_recovery_are_reported(autojump_clock: trio.testing.MockClock) -> None:
    pool = Pool()
    pool.set_source(SOURCE_FLAG, [A], now=0)
    prober = ScriptedProber({A: "ok"})
    seen: list[Change] = []
    feed = ChangeFeed()
    sched = scheduler(pool, prober, changes=feed)
    with feed.subscribe(seen.append):
        async with trio.open_nursery() as nursery:
            await nursery.start(sched.run)
            await trio.sleep(3.5)  # 4 ok probes: score 3
            prober.behaviour[A] = "fail"
            t0 = trio.current_time()
            while pool.get(A).usable:  # type: ignore[union-attr]
                await trio.sleep(0.01)
            # The first failure at the next interval, then fast confirmations.
            fall_time = trio.current_time() - t0
            await trio.sleep(4)
            prober.behaviour[A] = "ok"
            await trio.sleep(4)  # from -3, three good probes
            nursery.cancel_scope.cancel()
    assert [c.kind for c in seen] == [ChangeKind.HEALTHY, ChangeKind.UNHEALTHY, ChangeKind.HEALTHY]
    assert fall_time == pytest.approx(0.5 + 3 * fast_delay(1.0, 0.1), abs=0.02)


async def test_a_timeout_noticed_late_because_kap_was_busy_is_not_counted() -> None:
    """Real clock: a task blocks the loop past the probe's deadline."""
    import time

    pool = Pool()
    pool.set_source(SOURCE_FLAG, [A], now=0)
    prober = ScriptedProber({A: "hang"})
    sched = scheduler(pool, prober, timeout=0.05)

    async def hog() -> None:
        await trio.sleep(0.01)
        time.sleep(0.2)  # noqa: ASYNC251 -- the point: kap's loop stalls

    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            n.start_soon(hog)
            busy = await sched.probe_once(A)
        plain = await sched.probe_once(A)  # nothing blocks now: a real timeout
    assert busy.inconclusive
    assert plain.error == "timeout after 50ms"
    up = pool.get(A)
    assert up is not None and up.stats.probes_total == 1 and sched.inconclusive_total == 1


@pytest.mark.parametrize(
    ("interval", "timeout", "budget"),
    [
        (1.0, 0.1, 0.2),  # the defaults: a fifth of the interval, two timeouts
        (1.0, 0.05, 0.2),  # a fifth of the interval
        (1.0, 0.2, 0.4),  # two timeouts when that is longer
        (10.0, 0.1, 2.0),
        (1.0, 0.9, 1.0),  # never more than one interval
    ],
)
def test_open_budget_formula(interval: float, timeout: float, budget: float) -> None:
    assert open_budget(interval, timeout) == pytest.approx(budget)


async def test_a_slow_open_is_not_under_the_request_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A distant apiserver: opening takes longer than the timeout, the request does not."""
    pool = Pool()
    pool.set_source(SOURCE_FLAG, [A], now=0)
    prober = ScriptedProber({A: "slow-open:0.15"})
    sched = scheduler(pool, prober, timeout=0.1)
    async with trio.open_nursery() as nursery:
        await nursery.start(sched.run)
        await trio.sleep(2.5)
        nursery.cancel_scope.cancel()
    assert prober.opens[A] == [0.0]  # opened once, then kept alive
    assert prober.calls[A] == pytest.approx([0.15, 1.15, 2.15])
    up = pool.get(A)
    assert up is not None and up.usable and up.stats.probe_failures_total == 0


async def test_a_timed_out_request_reopens_before_the_next_request(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pool = Pool()
    pool.set_source(SOURCE_FLAG, [A], now=0)
    prober = ScriptedProber({A: "slow-open:0.08"})
    sched = scheduler(pool, prober, timeout=0.1)
    with trio.fail_after(5):
        assert (await sched.probe_once(A)).ok
        prober.behaviour[A] = "hang"
        assert (await sched.probe_once(A)).error == "timeout after 100ms"
        prober.behaviour[A] = "slow-open:0.08"
        t0 = trio.current_time()
        assert (await sched.probe_once(A)).ok
    # The open (80 ms) and the request each had their own deadline.
    assert len(prober.opens[A]) == 2 and prober.calls[A][-1] == pytest.approx(t0 + 0.08)


async def test_a_connection_that_never_opens_fails_within_the_open_budget(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pool = Pool()
    pool.set_source(SOURCE_FLAG, [A], now=0)
    prober = ScriptedProber({A: "hang-open"})
    sched = scheduler(pool, prober, interval=1.0, timeout=0.1)
    result = await sched.probe_once(A)
    assert result.open_timed_out and result.error == "connection not open within 200ms"
    assert trio.current_time() == pytest.approx(0.2)
    assert A in prober.forgotten


async def test_a_hung_upstream_leaves_rotation_on_time_though_it_needs_new_connections(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """SIGSTOP: the kept-alive request times out, then every new connection hangs."""
    pool = Pool()
    pool.set_source(SOURCE_FLAG, [A], now=0)
    prober = ScriptedProber({A: "ok"})
    sched = scheduler(pool, prober, interval=1.0, timeout=0.1)
    async with trio.open_nursery() as nursery:
        await nursery.start(sched.run)
        await trio.sleep(3.5)  # score 3 on a kept-alive connection
        prober.behaviour[A] = "hang"  # the open connection's request hangs...
        await trio.sleep(0.5 + 0.1 + 0.05)  # the 4.0 probe timed out at 4.1
        prober.behaviour[A] = "hang-open"  # ... and so do new handshakes
        t0 = 3.5
        while pool.get(A).usable:  # type: ignore[union-attr]
            await trio.sleep(0.01)
        fall_time = trio.current_time() - t0
        nursery.cancel_scope.cancel()
    # Next probe at 4.0 times out at 4.1; after the fast delay three opens
    # of 200 ms each, back to back: out at 4.8.
    assert fall_time == pytest.approx(0.5 + 0.1 + 0.1 + 3 * 0.2, abs=0.02)
    assert fall_time <= 1.0 + 3 * 0.1 + 1.0  # interval + 3 x timeout + interval


async def test_a_new_upstream_that_never_passes_is_warned_about_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pool = Pool()
    pool.set_source(SOURCE_FLAG, [A, B], now=0)
    prober = ScriptedProber({A: "refuse", B: "ok"})
    seen: list[Change] = []
    feed = ChangeFeed()
    sched = scheduler(pool, prober, changes=feed)
    with feed.subscribe(seen.append):
        async with trio.open_nursery() as nursery:
            await nursery.start(sched.run)
            await trio.sleep(4.5)
            assert [c.kind for c in seen if c.address == A] == []  # not logged as transitions
            await trio.sleep(10)
            nursery.cancel_scope.cancel()
    about_a = [c for c in seen if c.address == A]
    assert [c.kind for c in about_a] == [ChangeKind.NEVER_HEALTHY]
    assert "Connection refused" in about_a[0].reason
    assert [c.kind for c in seen if c.address == B] == [ChangeKind.HEALTHY]


async def test_an_open_noticed_late_because_kap_was_busy_is_not_counted() -> None:
    """Real clock: a task blocks the loop past the open budget."""
    import time

    pool = Pool()
    pool.set_source(SOURCE_FLAG, [A], now=0)
    prober = ScriptedProber({A: "hang-open"})
    sched = scheduler(pool, prober, interval=0.2, timeout=0.02)  # open budget 40 ms

    async def hog() -> None:
        await trio.sleep(0.01)
        time.sleep(0.2)  # noqa: ASYNC251 -- the point: kap's loop stalls

    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            n.start_soon(hog)
            busy = await sched.probe_once(A)
    assert busy.inconclusive and not busy.open_timed_out
    up = pool.get(A)
    assert up is not None and up.stats.probes_total == 0 and sched.inconclusive_total == 1


async def test_a_published_suspect_is_probed_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A client's dial failed (the proxy publishes SUSPECT): the scheduler probes it now."""
    pool = Pool()
    pool.set_source(SOURCE_FLAG, [A, B], now=0)
    prober = ScriptedProber({A: "ok", B: "ok"})
    feed = ChangeFeed()
    sched = scheduler(pool, prober, changes=feed)
    async with trio.open_nursery() as nursery:
        await nursery.start(sched.run)
        await trio.sleep(1.5)
        feed.publish(pool.record_dial_failure(A, now=trio.current_time(), error="refused"))
        await trio.sleep(0.25)
        nursery.cancel_scope.cancel()
    assert prober.calls[A] == [0.0, 1.0, 1.5]
    assert prober.calls[B] == [0.0, 1.0]
    assert pool.get(A).usable  # type: ignore[union-attr]  # the probe cleared the suspicion
