"""Per-upstream counters and the probe-duration histogram (no I/O)."""

from __future__ import annotations

import pytest

from kap.stats import PROBE_BUCKETS, Histogram, UpstreamStats


@pytest.mark.parametrize(
    ("values", "at", "cumulative"),
    [
        ([0.0001], 0.0001, 1),  # a value on a bound counts in that bucket (le)
        ([0.00011], 0.0001, 0),
        ([0.00011], 0.00025, 1),
        ([0.0002, 0.003, 0.2], 0.005, 2),
        ([10.0], 5.0, 0),  # past the last bound: only in +Inf (count)
    ],
)
def test_histogram_buckets_are_cumulative_upper_bounds(
    values: list[float], at: float, cumulative: int
) -> None:
    h = Histogram()
    for v in values:
        h.observe(v)
    assert dict(h.cumulative())[at] == cumulative
    assert h.count == len(values) and h.sum == pytest.approx(sum(values))


def test_probe_counters() -> None:
    s = UpstreamStats()
    s.probed(ok=True, duration=0.001)
    s.probed(ok=False, duration=None)  # a failed open has no request duration
    assert (s.probes_total, s.probe_failures_total, s.probe_duration.count) == (2, 1, 1)
    assert [b for b, _ in s.probe_duration.cumulative()] == list(PROBE_BUCKETS)
