"""One upstream's arithmetic: tiers with hysteresis, hold-down after falls (no I/O)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kap.address import Address
from kap.upstream import (
    HOLD_BASE,
    HOLD_MAX,
    HYSTERESIS,
    SCORE_MIN,
    Upstream,
    fast_delay,
    hold_down,
    next_tier,
    raw_tier,
)


@pytest.mark.parametrize(
    ("latency", "tier"),
    [
        (0.0, 0),
        (50e-6, 0),
        (100e-6, 1),
        (999e-6, 1),
        (1e-3, 2),
        (9.9e-3, 2),
        (10e-3, 3),
        (0.1, 4),
        (0.99, 4),
        (1.0, 5),
        (30.0, 5),
    ],
)
def test_raw_tier_uses_decade_thresholds(latency: float, tier: int) -> None:
    assert raw_tier(latency) == tier


@pytest.mark.parametrize(
    ("current", "latency", "expected"),
    [
        (None, 1.05e-3, 2),  # the first measurement sets the raw tier
        (1, 1.05e-3, 1),  # just past 1 ms: inside the dead band, stays
        (1, 1.6e-3, 2),  # clearly past: moves
        (2, 0.95e-3, 2),  # just under 1 ms: stays
        (2, 0.6e-3, 1),  # clearly under: moves
        (2, 20e-6, 0),  # big drop moves all the way
        (0, 0.5, 4),  # big rise moves all the way
        (3, 15e-3, 3),
    ],
)
def test_tier_changes_only_clearly_past_a_boundary(
    current: int | None, latency: float, expected: int
) -> None:
    assert next_tier(current, latency) == expected


@given(st.integers(0, 5), st.floats(1e-7, 100.0))
def test_tier_hysteresis_never_lands_further_than_the_raw_tier(current: int, lat: float) -> None:
    new = next_tier(current, lat)
    raw = raw_tier(lat)
    # The new tier lies between the current one and the raw one.
    assert min(current, raw) <= new <= max(current, raw)
    # Far from any boundary, the raw tier wins.
    assert next_tier(current, lat) == raw or any(
        t / HYSTERESIS <= lat < t * HYSTERESIS for t in (100e-6, 1e-3, 10e-3, 100e-3, 1.0)
    )


@pytest.mark.parametrize(
    ("falls", "hold"),
    [(0, 0), (1, 0), (2, HOLD_BASE), (3, 2 * HOLD_BASE), (4, 4 * HOLD_BASE), (20, HOLD_MAX)],
)
def test_hold_down_doubles_per_fall_up_to_a_cap(falls: int, hold: float) -> None:
    assert hold_down(falls) == hold


@pytest.mark.parametrize(
    ("interval", "timeout", "delay"),
    [(1.0, 0.1, 0.1), (1.0, 0.5, 0.25), (4.0, 5.0, 1.0), (0.2, 0.05, 0.05)],
)
def test_fast_delay_is_a_quarter_interval_or_one_timeout_whichever_is_shorter(
    interval: float, timeout: float, delay: float
) -> None:
    assert fast_delay(interval, timeout) == pytest.approx(delay)


@pytest.mark.parametrize(
    ("fields", "usable"),
    [
        ({}, False),  # never probed
        ({"probed_ok": True}, True),
        ({"probed_ok": True, "score": SCORE_MIN}, False),
        ({"probed_ok": True, "score": 0}, True),
        ({"probed_ok": True, "suspect": True}, False),
        ({"probed_ok": True, "held_until": 10.0}, False),
    ],
)
def test_usable_needs_a_good_probe_a_non_negative_score_no_suspicion_and_no_hold(
    fields: dict[str, object], usable: bool
) -> None:
    assert Upstream(Address("10.0.0.1", 6443), **fields).usable is usable  # type: ignore[arg-type]


def test_an_upstream_not_measured_yet_sorts_after_every_measured_tier() -> None:
    a = Address("10.0.0.1", 6443)
    ups = [Upstream(a), Upstream(a, tier=5), Upstream(a, tier=0)]
    assert [u.tier for u in sorted(ups, key=lambda u: u.tier_key)] == [0, 5, None]
