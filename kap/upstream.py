"""One upstream as the pool sees it: what it decides from, and the arithmetic of its health.

``Upstream`` holds the decision state of one apiserver address (its counters
are ``kap.stats.UpstreamStats``); the functions are the score bounds, latency
tiers, flap damping and fast-confirmation pause, pure functions of their
arguments. ``kap.pool`` applies them (its module docstring states the rules).
Each constant says where its number comes from; the pool takes the tier
thresholds as a constructor argument, so a test can put every latency in one
tier.
"""

from __future__ import annotations

import bisect

import attrs

from kap.address import Address
from kap.stats import UpstreamStats

SCORE_MIN = -3  # go-loadbalancer upstream.List defaults (peers.md b)
SCORE_MAX = 3
SCORE_INITIAL = 1

# Lower bounds of tiers 1..5 in seconds: go-loadbalancer's calcTier decades.
TIER_THRESHOLDS = (100e-6, 1e-3, 10e-3, 100e-3, 1.0)
# A tier boundary must be passed by this factor before the tier changes: 1.5
# keeps a 0.9-1.1 ms jitter around the 1 ms boundary in one tier while a real
# 10x change still moves at once.
HYSTERESIS = 1.5

# Flap damping: a second fall within FLAP_WINDOW holds the upstream down for
# HOLD_BASE seconds, each further one doubles it, up to HOLD_MAX. A real
# apiserver restart falls once and is back as soon as its probes pass; a
# rolling upgrade restarts each apiserver once, minutes apart.
FLAP_WINDOW = 300.0
HOLD_BASE = 10.0
HOLD_MAX = 120.0

# Fast confirmation (HAProxy's fastinter): a failing upstream that is still
# usable by score is probed again after this share of the interval (or one
# timeout, when shorter) instead of a whole interval.
FAST_CONFIRM_SHARE = 0.25


def hold_down(recent_falls: int) -> float:
    """Seconds an upstream's recovery waits after its ``recent_falls``-th fall in the window."""
    if recent_falls <= 1:
        return 0.0
    return min(HOLD_MAX, HOLD_BASE * 2.0 ** (recent_falls - 2))


def fast_delay(interval: float, timeout: float) -> float:
    """Pause before a confirming probe of a failing upstream (see ``Pool.confirm_delay``)."""
    return min(interval * FAST_CONFIRM_SHARE, timeout)


def raw_tier(latency: float, thresholds: tuple[float, ...] = TIER_THRESHOLDS) -> int:
    """The decade tier of a latency, without hysteresis."""
    return bisect.bisect_right(thresholds, latency)


def next_tier(
    current: int | None, latency: float, thresholds: tuple[float, ...] = TIER_THRESHOLDS
) -> int:
    """The tier after a successful probe of ``latency`` seconds.

    Moving up needs the latency to be ``HYSTERESIS`` times past the boundary,
    moving down needs it ``HYSTERESIS`` times under it; in between the tier
    stays. The first measurement sets the raw tier.
    """
    if current is None:
        return raw_tier(latency, thresholds)
    up = bisect.bisect_right(thresholds, latency / HYSTERESIS)
    down = bisect.bisect_right(thresholds, latency * HYSTERESIS)
    if up > current:
        return up
    if down < current:
        return down
    return current


@attrs.define(eq=False)
class Upstream:
    """What the pool decides from about one apiserver address (counters: ``stats``)."""

    address: Address
    sources: set[str] = attrs.field(factory=set)
    score: int = SCORE_INITIAL
    tier: int | None = None
    probed_ok: bool = False
    latency: float | None = None
    last_error: str | None = None
    auth_refused: bool = False
    # The last failure was an HTTP answer (a /readyz 500 of an apiserver that is
    # shutting down): it is alive and closes its own connections, so kap does
    # not drain them. Timeouts and connection errors leave this False.
    failing_answered: bool = False
    suspect: bool = False
    held_until: float | None = None
    falls: list[float] = attrs.field(factory=list)  # times of recent falls, for damping
    unhealthy_since: float | None = None
    remove_at: float | None = None
    active_connections: int = 0  # only upstreams with clients are drained
    order: int = 0  # insertion order: round-robin and report order
    stats: UpstreamStats = attrs.field(factory=UpstreamStats)

    @property
    def usable(self) -> bool:
        return self.probed_ok and self.score >= 0 and not self.suspect and self.held_until is None

    @property
    def tier_key(self) -> tuple[bool, int]:
        """Sorts by tier, an upstream not measured yet after every measured one."""
        return (self.tier is None, self.tier or 0)
