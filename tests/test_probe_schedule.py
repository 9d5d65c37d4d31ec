"""The probe scheduler's timing, on trio's virtual clock (no real sleeps)."""

from __future__ import annotations

import itertools
import random

import attrs
import pytest
import trio
import trio.testing

from kap.address import Address
from kap.pool import SOURCE_FLAG, Change, Pool
from kap.probe import ProbeResult, ProbeScheduler, next_delay

A, B, C = (Address(f"10.0.0.{i}", 6443) for i in range(1, 4))


@attrs.define
class ScriptedProber:
    """A prober whose upstreams behave by name: 'ok', 'hang', 'slow:<s>', 'fail'."""

    behaviour: dict[Address, str]
    calls: dict[Address, list[float]] = attrs.field(factory=dict)
    forgotten: list[Address] = attrs.field(factory=list)

    async def probe(self, address: Address) -> ProbeResult:
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
        self.forgotten.append(address)

    async def aclose(self) -> None:
        pass


def scheduler(
    pool: Pool, prober: ScriptedProber, *, jitter: float = 0.0, **kw: float
) -> ProbeScheduler:
    changes: list[Change] = []
    return ProbeScheduler(
        pool=pool, prober=prober, interval=kw.get("interval", 1.0),  # type: ignore[arg-type]
        timeout=kw.get("timeout", 0.1), jitter=jitter, on_changes=changes.extend,
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


async def test_sync_follows_membership(autojump_clock: trio.testing.MockClock) -> None:
    pool = Pool(removal_grace=0)
    pool.set_source("discovery", [A], now=0)
    prober = ScriptedProber({A: "ok", B: "ok"})
    sched = scheduler(pool, prober)
    async with trio.open_nursery() as nursery:
        await nursery.start(sched.run)
        await trio.sleep(1.5)
        pool.set_source("discovery", [B], now=trio.current_time())
        pool.expire(trio.current_time())
        sched.sync()
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
    sched = scheduler(pool, prober)
    sched.on_changes = seen.extend
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
    assert [c.kind for c in seen] == ["healthy", "unhealthy", "healthy"]
    assert fall_time == pytest.approx(0.5 + 3 * sched.fast_delay, abs=0.02)


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
    assert up is not None and up.probes_total == 1 and sched.inconclusive_total == 1
