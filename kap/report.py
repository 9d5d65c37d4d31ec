"""What ``/upstreams`` shows, and the counters ``/metrics`` reads: from the state, read-only.

Nothing here changes the pool (go-loadbalancer's ``IsRouteHealthy`` advanced
the round-robin cursor on every health query; kap's reports never do). The
Prometheus side is ``kap.metrics``.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from typing import Any

import attrs

from kap.address import Address
from kap.pool import Pool, Upstream
from kap.problems import find_problems


@attrs.define
class Counters:
    """Process-wide counters that live outside the pool (filled in by the app)."""

    accepted_total: Callable[[], int] = lambda: 0
    no_upstream_total: Callable[[], int] = lambda: 0
    failovers_total: Callable[[], int] = lambda: 0
    passive_failures_total: Callable[[], int] = lambda: 0
    health_connection_errors_total: Callable[[], int] = lambda: 0
    active_connections: Callable[[], int] = lambda: 0
    bytes_up: Callable[[], int] = lambda: 0
    bytes_down: Callable[[], int] = lambda: 0
    discovery: Callable[[], dict[str, Any] | None] = lambda: None
    # Unix time the client certificate kap presents expires (None: none or unknown).
    client_cert_expiry_unix: Callable[[], float | None] = lambda: None
    # Unix time the first certificate of the CA bundle kap verifies with expires.
    ca_cert_expiry_unix: Callable[[], float | None] = lambda: None
    # kap presents no credentials on purpose (no CA): 401/403 are expected.
    unauthenticated: Callable[[], bool] = lambda: False
    # What an upstream's probe connection speaks: "h2" or "http/1.1" (None: not yet known).
    probe_protocol: Callable[[Address], str | None] = lambda address: None


@attrs.frozen
class UpstreamReport:
    """One upstream in ``/upstreams``: the JSON contract, field by field (README)."""

    address: str
    sources: list[str]
    healthy: bool  # usable for new connections
    probed: bool  # passed at least one probe since it joined
    score: int
    tier: int | None
    latency_ms: float | None
    last_error: str | None
    auth_refused: bool
    suspect: bool  # a client's dial or connection just failed; cleared by the next probe
    active_connections: int
    connections_total: int
    dial_failures_total: int
    probes_total: int
    probe_failures_total: int
    transitions_total: int
    unhealthy_for_s: float | None
    held_down_for_s: float | None  # flap damping: recovery waits this long
    removal_in_s: float | None
    protocol: str | None = None  # "h2" or "http/1.1": what its probe connection speaks

    @classmethod
    def of(cls, u: Upstream, now: float, protocol: str | None = None) -> UpstreamReport:
        def since(t: float | None) -> float | None:
            return None if t is None else round(max(0.0, now - t), 3)

        def until(t: float | None) -> float | None:
            return None if t is None else round(max(0.0, t - now), 3)

        return cls(
            address=str(u.address),
            sources=sorted(u.sources),
            healthy=u.usable,
            probed=u.probed_ok,
            score=u.score,
            tier=u.tier,
            latency_ms=None if u.latency is None else round(u.latency * 1e3, 3),
            last_error=u.last_error,
            auth_refused=u.auth_refused,
            suspect=u.suspect,
            active_connections=u.active_connections,
            connections_total=u.stats.connections_total,
            dial_failures_total=u.stats.dial_failures_total,
            probes_total=u.stats.probes_total,
            probe_failures_total=u.stats.probe_failures_total,
            transitions_total=u.stats.transitions_total,
            unhealthy_for_s=since(u.unhealthy_since),
            held_down_for_s=until(u.held_until),
            removal_in_s=until(u.remove_at),
            protocol=protocol,
        )


@functools.cache
def _converter() -> Any:
    """cattrs, imported on the first report (35 ms of imports kept out of start-up)."""
    import cattrs

    return cattrs.Converter()


def upstream_view(u: Upstream, now: float) -> dict[str, Any]:
    view: dict[str, Any] = _converter().unstructure(UpstreamReport.of(u, now))
    return view


def _problems(
    reports: list[UpstreamReport],
    discovery: dict[str, Any] | None,
    counters: Counters,
    wall: float,
) -> list[str]:
    return find_problems(
        reports,
        discovery,
        now_unix=wall,
        client_cert_expiry_unix=counters.client_cert_expiry_unix(),
        unauthenticated=counters.unauthenticated(),
    )


def current_problems(pool: Pool, counters: Counters, now: float, wall: float) -> list[str]:
    """The ``problems`` list of ``/upstreams`` (see ``kap.problems``), without the rest."""
    reports = [UpstreamReport.of(u, now) for u in pool.upstreams]
    return _problems(reports, counters.discovery(), counters, wall)


def upstreams_document(
    pool: Pool, counters: Counters, now: float, wall: float | None = None
) -> dict[str, Any]:
    """``/upstreams``; ``now`` is trio's clock, ``wall`` the Unix time (default: now)."""
    protocol = counters.probe_protocol
    reports = [UpstreamReport.of(u, now, protocol(u.address)) for u in pool.upstreams]
    discovery = counters.discovery()
    doc: dict[str, Any] = {
        "problems": _problems(reports, discovery, counters, time.time() if wall is None else wall),
        "upstreams": [_converter().unstructure(r) for r in reports],
        "fallback_service": None if pool.default_service is None else str(pool.default_service),
        "best_tier": pool.best_tier(),
        "connections": {
            "active": counters.active_connections(),
            "accepted_total": counters.accepted_total(),
            "no_upstream_total": counters.no_upstream_total(),
            "failovers_total": counters.failovers_total(),
            "passive_failures_total": counters.passive_failures_total(),
        },
        "bytes": {"up": counters.bytes_up(), "down": counters.bytes_down()},
    }
    if discovery is not None:
        doc["discovery"] = discovery
    return doc


def upstreams_json(pool: Pool, counters: Counters, now: float) -> bytes:
    return (json.dumps(upstreams_document(pool, counters, now), indent=2) + "\n").encode()
