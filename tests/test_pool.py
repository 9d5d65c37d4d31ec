"""The pool's rules, as tables and properties (no I/O, no clock)."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kap.address import Address
from kap.events import ChangeKind
from kap.pool import SCORE_MAX, SCORE_MIN, SOURCE_DISCOVERY, SOURCE_FLAG, Pool
from kap.upstream import (
    FLAP_WINDOW,
)

A, B, C, D = (Address(f"10.0.0.{i}", 6443) for i in range(1, 5))
SVC = Address("10.96.0.1", 443)


def pool_of(*addrs: Address, **kw: object) -> Pool:
    p = Pool(**kw)  # type: ignore[arg-type]
    p.set_source(SOURCE_FLAG, addrs, now=0.0)
    return p


def ok(p: Pool, addr: Address, latency: float = 0.0005, now: float = 0.0) -> None:
    p.record_probe(addr, ok=True, latency=latency, now=now)


def fail(p: Pool, addr: Address, now: float = 0.0) -> None:
    p.record_probe(addr, ok=False, error="boom", now=now)


# ---- scores ------------------------------------------------------------------

SCORE_TABLE = [
    # (events, score after each, usable after each)
    ("+", [2], [True]),
    ("++++", [2, 3, 3, 3], [True] * 4),
    ("+--", [2, 1, 0], [True, True, True]),
    ("+---", [2, 1, 0, -1], [True, True, True, False]),
    ("+++----", [2, 3, 3, 2, 1, 0, -1], [True] * 6 + [False]),
    ("-------", [0, -1, -2, -3, -3, -3, -3], [False] * 7),  # never probed ok: never usable
    ("+------+++", [2, 1, 0, -1, -2, -3, -3, -2, -1, 0], [True] * 3 + [False] * 6 + [True]),
    # d = failed client dial: suspect at once, until the next good probe
    ("+d", [2, 1], [True, False]),
    ("+ddd", [2, 1, 0, -1], [True, False, False, False]),
    ("+d+", [2, 1, 2], [True, False, True]),
    ("+ddd+", [2, 1, 0, -1, 0], [True, False, False, False, True]),
]


@pytest.mark.parametrize(("events", "scores", "usable"), SCORE_TABLE)
def test_score_follows_go_loadbalancer_rules(
    events: str, scores: list[int], usable: list[bool]
) -> None:
    p = pool_of(A)
    got_scores, got_usable = [], []
    for e in events:
        if e == "+":
            ok(p, A)
        elif e == "-":
            fail(p, A)
        else:
            p.record_dial_failure(A, now=0.0, error="refused")
        up = p.get(A)
        assert up is not None
        got_scores.append(up.score)
        got_usable.append(up.usable)
    assert got_scores == scores
    assert got_usable == usable


@given(st.lists(st.sampled_from("+-d"), max_size=60))
def test_score_stays_in_bounds(events: list[str]) -> None:
    p = pool_of(A)
    for e in events:
        if e == "+":
            ok(p, A)
        elif e == "-":
            fail(p, A)
        else:
            p.record_dial_failure(A, now=0.0, error="x")
        up = p.get(A)
        assert up is not None
        assert SCORE_MIN <= up.score <= SCORE_MAX


def test_new_upstream_is_not_usable_before_its_first_probe() -> None:
    p = pool_of(A, B)
    assert p.pick() is None
    ok(p, B)
    assert [p.pick() for _ in range(3)] == [p.get(B)] * 3


def test_failed_probe_keeps_the_tier() -> None:
    p = pool_of(A)
    ok(p, A, latency=5e-3)
    assert p.get(A).tier == 2  # type: ignore[union-attr]
    fail(p, A)
    assert p.get(A).tier == 2  # type: ignore[union-attr]


def test_transitions_are_reported_once() -> None:
    p = pool_of(A)
    assert [c.kind for c in p.record_probe(A, ok=True, latency=1e-4, now=0)] == [ChangeKind.HEALTHY]
    assert p.record_probe(A, ok=True, latency=1e-4, now=1) == []
    kinds = []
    for t in range(2, 8):
        kinds += [c.kind for c in p.record_probe(A, ok=False, error="x", now=t)]
    assert kinds == [ChangeKind.UNHEALTHY]
    assert p.get(A).unhealthy_since == 5  # type: ignore[union-attr]


def test_first_failures_of_a_new_upstream_are_not_transitions() -> None:
    p = pool_of(A)
    kinds = [c.kind for t in range(4) for c in p.record_probe(A, ok=False, error="x", now=t)]
    assert kinds == []
    assert p.get(A).unhealthy_since == 0  # type: ignore[union-attr]


def test_auth_refused_counts_as_alive_and_is_reported_once() -> None:
    p = pool_of(A)
    first = p.record_probe(A, ok=True, latency=1e-3, now=0, auth_refused=True, error="HTTP 403")
    second = p.record_probe(A, ok=True, latency=1e-3, now=1, auth_refused=True, error="HTTP 403")
    assert ChangeKind.AUTH in [c.kind for c in first]
    assert ChangeKind.AUTH not in [c.kind for c in second]
    assert p.get(A).usable and p.get(A).auth_refused  # type: ignore[union-attr]


# ---- pick --------------------------------------------------------------------


def test_pick_prefers_the_lowest_tier_and_round_robins_inside_it() -> None:
    p = pool_of(A, B, C)
    ok(p, A, latency=5e-3)  # tier 2
    ok(p, B, latency=0.5e-3)  # tier 1
    ok(p, C, latency=0.5e-3)  # tier 1
    picks = [p.pick().address for _ in range(6)]  # type: ignore[union-attr]
    assert picks == [B, C, B, C, B, C]


def test_pick_falls_to_the_next_tier_when_the_best_is_unusable() -> None:
    p = pool_of(A, B)
    ok(p, A, latency=5e-3)
    ok(p, B, latency=0.5e-3)
    for _ in range(3):
        fail(p, B)
    assert p.get(B).usable is False  # type: ignore[union-attr]
    assert [p.pick().address for _ in range(2)] == [A, A]  # type: ignore[union-attr]


def test_reading_state_never_moves_the_cursor() -> None:
    p = pool_of(A, B)
    ok(p, A)
    ok(p, B)
    first = p.pick()
    for _ in range(5):
        p.usable()
        p.best()  # discovery's query
        p.upstreams  # noqa: B018
        p.best_tier()
        p.addresses()
    second = p.pick()
    assert first is not None and second is not None
    assert {first.address, second.address} == {A, B}


@settings(max_examples=200)
@given(
    st.lists(
        st.tuples(st.sampled_from([A, B, C, D]), st.booleans(), st.floats(1e-6, 2.0)),
        max_size=40,
    )
)
def test_pick_returns_only_usable_upstreams_of_the_lowest_usable_tier(
    events: list[tuple[Address, bool, float]],
) -> None:
    p = pool_of(A, B, C, D)
    for addr, good, lat in events:
        if good:
            ok(p, addr, latency=lat)
        else:
            fail(p, addr)
    usable = [u for u in p.upstreams if u.usable]
    picked = p.pick()
    if not usable:
        assert picked is None
        return
    assert picked is not None and picked.usable
    assert picked.tier == min(u.tier for u in usable)  # type: ignore[type-var]


@given(st.integers(1, 4), st.integers(1, 50))
def test_round_robin_is_fair_within_a_tier(n: int, rounds: int) -> None:
    addrs = [A, B, C, D][:n]
    p = pool_of(*addrs)
    for a in addrs:
        ok(p, a, latency=0.5e-3)
    counts = Counter(p.pick().address for _ in range(n * rounds))  # type: ignore[union-attr]
    assert set(counts.values()) == {rounds}


# ---- candidates and panic mode ----------------------------------------------


def test_candidates_start_with_the_pick_then_other_usable_then_service_then_rest() -> None:
    p = pool_of(A, B, C, D, default_service=SVC)
    ok(p, B, latency=5e-3)  # usable, tier 2
    ok(p, C, latency=0.5e-3)  # usable, tier 1
    ok(p, D)
    for _ in range(4):
        fail(p, D)  # D: score -1, unusable
    # A never probed: score 1, unusable
    assert p.candidates() == [C, B, SVC, A, D]


def test_with_nothing_usable_the_service_comes_first_then_all_by_score() -> None:
    p = pool_of(A, B, C, default_service=SVC)
    fail(p, A)  # 0
    fail(p, B)
    fail(p, B)  # -1
    assert p.candidates() == [SVC, C, A, B]


def test_candidates_never_empty_while_upstreams_exist() -> None:
    p = pool_of(A)
    for _ in range(10):
        fail(p, A)
    assert p.candidates() == [A]


# ---- membership ---------------------------------------------------------------


def test_removal_waits_for_the_grace_period_and_can_be_cancelled() -> None:
    p = Pool(removal_grace=30)
    p.set_source(SOURCE_DISCOVERY, [A, B], now=0)
    ok(p, A)
    ok(p, A)
    kinds = [c.kind for c in p.set_source(SOURCE_DISCOVERY, [B], now=10)]
    assert kinds == [ChangeKind.REMOVING]
    assert p.expire(39.9) == []
    # A comes back before the grace ends: it keeps its score and counters
    assert [c.kind for c in p.set_source(SOURCE_DISCOVERY, [A, B], now=35)] == [ChangeKind.KEPT]
    assert p.expire(100) == []
    assert p.get(A).score == 3  # type: ignore[union-attr]
    p.set_source(SOURCE_DISCOVERY, [B], now=100)
    assert p.next_expiry() == 130
    assert [(c.address, c.kind) for c in p.expire(130)] == [(A, ChangeKind.REMOVED)]
    assert A not in p


def test_an_empty_update_never_empties_the_pool() -> None:
    p = Pool(removal_grace=0)
    p.set_source(SOURCE_DISCOVERY, [A, B], now=0)
    changes = p.set_source(SOURCE_DISCOVERY, [], now=1)
    assert {c.kind for c in changes} == {ChangeKind.KEPT}
    assert p.expire(100) == []
    assert len(p) == 2


def test_an_upstream_with_another_source_is_not_removed() -> None:
    p = Pool(removal_grace=0)
    p.set_source(SOURCE_FLAG, [A], now=0)
    p.set_source(SOURCE_DISCOVERY, [A, B], now=0)
    p.set_source(SOURCE_DISCOVERY, [B], now=1)
    assert p.expire(10) == []
    assert p.get(A).sources == {SOURCE_FLAG}  # type: ignore[union-attr]


def test_survivors_keep_score_tier_and_counters_across_updates() -> None:
    p = Pool()
    p.set_source(SOURCE_DISCOVERY, [A], now=0)
    ok(p, A, latency=5e-3)
    p.connection_opened(A)
    p.set_source(SOURCE_DISCOVERY, [A, B], now=1)
    up = p.get(A)
    assert up is not None
    assert (up.score, up.tier, up.stats.connections_total, up.active_connections) == (2, 2, 1, 1)
    assert p.get(B).usable is False  # type: ignore[union-attr]


def test_drain_targets_unreachable_upstreams_with_clients_only() -> None:
    p = pool_of(A, B, C)
    for a in (A, B, C):
        ok(p, a)
        p.connection_opened(a)
    for t in range(1, 5):
        p.record_probe(A, ok=False, error="timeout", now=t)  # hung
        p.record_probe(B, ok=False, error="HTTP 500", now=t, answered=True)  # shutting down
    assert [u.address for u in p.to_drain(now=14, after=10)] == [A]
    assert p.to_drain(now=12, after=10) == []
    assert p.to_drain(now=14, after=0) == []  # --drain-after 0: never
    p.connection_closed(A)
    assert p.to_drain(now=20, after=10) == []


# ---- damping and stability -------------------------------------------------------


def test_a_single_fall_recovers_as_soon_as_probes_pass() -> None:
    p = pool_of(A)
    for t in range(3):
        ok(p, A, now=t)
    for t in range(3, 7):
        fail(p, A, now=t)
    assert not p.get(A).usable  # type: ignore[union-attr]
    for t in range(7, 11):
        ok(p, A, now=t)
    assert p.get(A).usable  # type: ignore[union-attr]


def test_a_flapping_upstream_is_held_down_and_makes_few_transitions() -> None:
    """Probes fail in bursts of 4 every 8 s for 2 minutes: undamped, 30 transitions."""
    p = pool_of(A)
    times = []
    for t in range(120):
        good = (t % 8) < 4
        changes = p.record_probe(A, ok=good, latency=1e-3, error="timeout", now=float(t))
        times += [t for c in changes if c.kind in (ChangeKind.HEALTHY, ChangeKind.UNHEALTHY)]
    assert len(times) <= 10
    assert len([t for t in times if t >= 60]) <= 3  # the hold keeps growing
    assert p.get(A).stats.transitions_total == len(times)  # type: ignore[union-attr]


def test_falls_older_than_the_window_are_forgotten() -> None:
    p = pool_of(A)
    t = 0.0
    for _ in range(2):  # two falls far apart: never held
        for _ in range(4):
            ok(p, A, now=t)
            t += 1
        for _ in range(5):
            fail(p, A, now=t)
            t += 1
        t += FLAP_WINDOW
    assert p.get(A).held_until is None  # type: ignore[union-attr]


def test_traffic_prefers_stable_upstreams_within_a_tier() -> None:
    p = pool_of(A, B)
    for _ in range(3):
        ok(p, A)
        ok(p, B)
    fail(p, B)  # B: score 2, still usable, same tier
    assert [p.pick().address for _ in range(4)] == [A] * 4  # type: ignore[union-attr]
    ok(p, B)
    assert {p.pick().address for _ in range(4)} == {A, B}  # type: ignore[union-attr]


def test_passive_failure_makes_the_upstream_suspect_without_counting_a_dial() -> None:
    p = pool_of(A)
    ok(p, A)
    kinds = [c.kind for c in p.record_passive_failure(A, now=1, error="upstream reset")]
    assert kinds == [ChangeKind.UNHEALTHY, ChangeKind.SUSPECT]
    up = p.get(A)
    assert up is not None and up.stats.dial_failures_total == 0 and up.suspect


def test_nothing_is_drained_while_no_other_upstream_is_usable() -> None:
    p = pool_of(A, B)
    for a in (A, B):
        ok(p, a)
        p.connection_opened(a)
    for t in range(1, 5):
        fail(p, A, now=t)
    assert [u.address for u in p.to_drain(now=20, after=10)] == [A]
    for t in range(1, 5):
        fail(p, B, now=t)
    assert p.to_drain(now=20, after=10) == []  # what kap holds is the best it has


# ---- fast confirmation --------------------------------------------------------

CONFIRM_TABLE = [
    # (probes before, last failed, waited for the open, inconclusive, delay)
    ("+++", True, False, False, 0.1),  # on its way down: confirm after the fast delay
    ("+++", True, True, False, 0.0),  # the open budget was the pause: at once
    ("+++", False, False, False, None),  # a good probe: the regular interval
    ("+---", True, False, False, None),  # already out (score < 0): no hurry
    ("-", True, False, False, None),  # never healthy: the regular interval
    ("", False, False, True, 0.1),  # kap was busy: ask again soon
]


@pytest.mark.parametrize(("before", "failed", "waited", "inconclusive", "delay"), CONFIRM_TABLE)
def test_fast_confirmation_only_for_a_usable_upstream_that_fails(
    before: str, failed: bool, waited: bool, inconclusive: bool, delay: float | None
) -> None:
    p = pool_of(A)
    for e in before:
        (ok if e == "+" else fail)(p, A)
    got = p.confirm_delay(
        A, failed=failed, waited=waited, inconclusive=inconclusive, interval=1.0, timeout=0.1
    )
    assert got == delay


@pytest.mark.parametrize(("interval", "timeout", "delay"), [(1.0, 0.1, 0.1), (1.0, 0.5, 0.25)])
def test_fast_delay_is_a_quarter_interval_or_one_timeout(
    interval: float, timeout: float, delay: float
) -> None:
    p = pool_of(A)
    ok(p, A)
    fail(p, A)
    assert p.confirm_delay(A, failed=True, interval=interval, timeout=timeout) == delay


# ---- constructor arguments and queries --------------------------------------------


def test_tier_thresholds_are_a_constructor_argument() -> None:
    p = pool_of(A, B, tier_thresholds=(1e3, 1e4, 1e5, 1e6, 1e7))
    ok(p, A, latency=5e-3)
    ok(p, B, latency=0.5)
    assert (p.get(A).tier, p.get(B).tier) == (0, 0)  # type: ignore[union-attr]
    assert [p.pick().address for _ in range(4)] == [A, B, A, B]  # type: ignore[union-attr]


def test_probe_counters_live_in_the_stats() -> None:
    p = pool_of(A)
    p.record_probe(A, ok=True, latency=1e-3, duration=0.002, now=0)
    p.record_probe(A, ok=False, error="x", duration=0.3, now=1)
    stats = p.get(A).stats  # type: ignore[union-attr]
    assert (stats.probes_total, stats.probe_failures_total) == (2, 1)
    assert stats.probe_duration.count == 2 and stats.probe_duration.sum == pytest.approx(0.302)
    assert dict(stats.probe_duration.cumulative())[0.0025] == 1
