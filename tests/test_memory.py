"""When kap gives memory back (pure policy; the trim itself is a glibc call)."""

from __future__ import annotations

import pytest

from kap.memory import TRIM_EVERY_ACCEPTED, TrimPolicy


@pytest.mark.parametrize(
    ("steps", "trims"),
    [
        # (active, accepted_total) per housekeeping tick -> trim after each?
        ([(10, 10), (5, 20)], [False, False]),  # small: never worth it
        ([(5000, 5000), (4000, 5000), (2000, 5000)], [False, False, True]),  # below half the peak
        ([(5000, 5000), (0, 5000), (0, 5000)], [False, True, False]),  # once, not every tick
        ([(30, TRIM_EVERY_ACCEPTED - 1), (30, TRIM_EVERY_ACCEPTED)], [False, True]),  # churn
        ([(900, TRIM_EVERY_ACCEPTED)], [False]),  # churn, but many still open: later
        ([(5, 999), (0, 999), (0, 1000), (0, 1000)], [False, False, True, False]),  # work done
    ],
)
def test_trim_policy(steps: list[tuple[int, int]], trims: list[bool]) -> None:
    policy = TrimPolicy()
    assert [policy.observe(a, t) for a, t in steps] == trims
