"""Per-upstream counters and histograms: what ``/upstreams`` and ``/metrics`` show.

Kept apart from the pool's decision state (``kap.upstream.Upstream``): nothing
here decides anything, so a new counter never touches a rule of the pool,
and the pool's rules never read a counter. The pool updates an upstream's
``UpstreamStats`` at the moment it records what the counter counts;
``kap.report`` reads them.
"""

from __future__ import annotations

import bisect
from collections import Counter

import attrs

# Buckets of kap_upstream_probe_duration_seconds: the tier boundaries and the
# steps between them, up to the largest sensible --health-timeout.
PROBE_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)


@attrs.define
class Histogram:
    """A Prometheus histogram's state: per-bucket counts (not cumulative), sum, count."""

    bounds: tuple[float, ...] = PROBE_BUCKETS
    counts: list[int] = attrs.field()
    sum: float = 0.0
    count: int = 0

    @counts.default
    def _zeros(self) -> list[int]:
        return [0] * len(self.bounds)

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.bounds, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or under it) per bucket, without +Inf."""
        out, total = [], 0
        for bound, n in zip(self.bounds, self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out


@attrs.define
class UpstreamStats:
    """Everything counted about one upstream since it joined the pool."""

    connections_total: int = 0  # client connections relayed to it
    dial_failures_total: int = 0  # failed client dials
    probes_total: int = 0  # recorded probes (inconclusive ones are not)
    probe_failures_total: int = 0
    transitions_total: int = 0  # usable <-> unusable
    # kap_upstream_probe_results_total: /readyz probes by kap.probe_results.ProbeOutcome,
    # kap_upstream_pings_total: HTTP/2 PINGs by PingOutcome (the prober counts both)
    probe_results: Counter[str] = attrs.field(factory=Counter)
    ping_results: Counter[str] = attrs.field(factory=Counter)
    probe_duration: Histogram = attrs.field(factory=Histogram)

    def probed(self, *, ok: bool, duration: float | None) -> None:
        self.probes_total += 1
        if not ok:
            self.probe_failures_total += 1
        if duration is not None:
            self.probe_duration.observe(duration)
