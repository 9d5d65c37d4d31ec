"""When kap gives memory back (pure policy; the trim itself is a glibc call)."""

from __future__ import annotations

import ctypes.util

import pytest

from kap.memory import TRIM_EVERY_ACCEPTED, TrimPolicy, release_free_memory


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


def test_trimming_looks_the_c_library_up_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """find_library forks ``ldconfig -p``: never on the event loop at every trim."""
    looked_up: list[str] = []
    find_library = ctypes.util.find_library

    def counting(name: str) -> str | None:
        looked_up.append(name)
        return find_library(name)

    monkeypatch.setattr(ctypes.util, "find_library", counting)
    results = {release_free_memory() for _ in range(3)}
    assert len(results) == 1  # the same answer every time (True with glibc)
    assert len(looked_up) <= 1
