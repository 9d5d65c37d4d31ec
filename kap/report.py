"""What ``/upstreams`` and ``/metrics`` show: rendered from the state, read-only.

Nothing here changes the pool (go-loadbalancer's ``IsRouteHealthy`` advanced
the round-robin cursor on every health query; kap's reports never do). The
Prometheus side is a custom collector over a private registry, so there is no
global metrics state and a scrape costs one pass over the upstreams.
"""

from __future__ import annotations

import functools
import json
import platform
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import attrs

from kap.address import Address
from kap.build import BuildInfo, build_info
from kap.pool import Pool, Upstream
from kap.probe_results import PingOutcome, ProbeOutcome
from kap.problems import find_problems

if TYPE_CHECKING:  # imported at the first scrape: 36 ms kept out of start-up
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import GaugeMetricFamily, Metric

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


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


@attrs.define(eq=False)
class KapCollector:
    """Prometheus collector reading the pool and the counters at scrape time."""

    pool: Pool
    counters: Counters
    build: BuildInfo = attrs.field(factory=build_info)

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        ups = self.pool.upstreams
        label = ["upstream"]

        def gauge(name: str, doc: str, value: Callable[[Upstream], float]) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=label)
            for u in ups:
                g.add_metric([str(u.address)], value(u))
            return g

        def counter(name: str, doc: str, value: Callable[[Upstream], float]) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=label)
            for u in ups:
                c.add_metric([str(u.address)], value(u))
            return c

        yield gauge(
            "kap_upstream_healthy",
            "1 if the upstream is usable for new connections.",
            lambda u: float(u.usable),
        )
        yield gauge("kap_upstream_score", "Health score, -3..3; usable at >= 0.", lambda u: u.score)
        yield gauge(
            "kap_upstream_tier",
            "Latency tier 0..5 (-1 before the first probe).",
            lambda u: -1 if u.tier is None else u.tier,
        )
        yield gauge(
            "kap_upstream_active_connections",
            "Client connections open to the upstream.",
            lambda u: u.active_connections,
        )
        yield counter(
            "kap_upstream_connections",
            "Client connections relayed to the upstream.",
            lambda u: u.stats.connections_total,
        )
        yield counter(
            "kap_upstream_dial_failures",
            "Failed client dials to the upstream.",
            lambda u: u.stats.dial_failures_total,
        )
        yield counter(
            "kap_upstream_probe_failures",
            "Failed /readyz probes.",
            lambda u: u.stats.probe_failures_total,
        )
        results = CounterMetricFamily(
            "kap_upstream_probe_results",
            "/readyz probes by result: ok, refused (401/403 to kap's credentials), "
            "unauthenticated (401/403, kap presented none), not_ready, timeout, error.",
            labels=["upstream", "result"],
        )
        for u in ups:
            for outcome in ProbeOutcome:  # every result, 0 included: rate() sees the first
                results.add_metric([str(u.address), outcome.value], u.stats.probe_results[outcome])
        yield results
        pings = CounterMetricFamily(
            "kap_upstream_pings",
            "HTTP/2 PINGs on the probe connection by result: ok, timeout, error.",
            labels=["upstream", "result"],
        )
        for u in ups:
            for ping in PingOutcome:
                pings.add_metric([str(u.address), ping.value], u.stats.ping_results[ping])
        yield pings
        yield counter(
            "kap_upstream_transitions",
            "Changes between usable and unusable.",
            lambda u: u.stats.transitions_total,
        )
        hist = HistogramMetricFamily(
            "kap_upstream_probe_duration_seconds", "Duration of /readyz probes.", labels=label
        )
        for u in ups:
            h = u.stats.probe_duration
            buckets = [(_bound(bound), float(n)) for bound, n in h.cumulative()]
            buckets.append(("+Inf", float(h.count)))
            hist.add_metric([str(u.address)], buckets, h.sum)
        yield hist

        c = self.counters
        yield CounterMetricFamily(
            "kap_connections_accepted", "Client connections accepted.", value=c.accepted_total()
        )
        yield CounterMetricFamily(
            "kap_connections_no_upstream",
            "Clients closed because no upstream answered.",
            value=c.no_upstream_total(),
        )
        yield CounterMetricFamily(
            "kap_connections_failover",
            "Clients served by a later candidate after a failed dial.",
            value=c.failovers_total(),
        )
        yield CounterMetricFamily(
            "kap_connections_passive_failures",
            "Connections an upstream reset or closed unanswered (counted against it).",
            value=c.passive_failures_total(),
        )
        yield GaugeMetricFamily(
            "kap_connections_active", "Client connections open.", value=c.active_connections()
        )
        yield CounterMetricFamily(
            "kap_health_connection_errors",
            "Health-port connections that ended on an error (a client that left mid-request).",
            value=c.health_connection_errors_total(),
        )
        b = CounterMetricFamily("kap_bytes", "Bytes relayed.", labels=["direction"])
        b.add_metric(["up"], c.bytes_up())
        b.add_metric(["down"], c.bytes_down())
        yield b
        yield GaugeMetricFamily("kap_upstreams", "Upstreams in the pool.", value=len(ups))
        yield GaugeMetricFamily(
            "kap_upstreams_healthy", "Usable upstreams.", value=sum(u.usable for u in ups)
        )
        yield from _certificates(c)
        info = GaugeMetricFamily(
            "kap_build_info", "kap's version and revision, and Python's version.",
            labels=["version", "revision", "python"],
        )  # fmt: skip
        info.add_metric([self.build.version, self.build.revision, platform.python_version()], 1)
        yield info
        discovery = c.discovery()
        # Absent, not 0, when discovery is off (on purpose or for want of
        # credentials): KapDiscoveryFailing must not fire on a choice.
        if discovery is not None and discovery.get("mode") != "off":
            yield GaugeMetricFamily(
                "kap_discovery_up",
                "1 while the last EndpointSlice list or watch succeeded, else 0.",
                value=float(discovery_up(discovery)),
            )
            yield CounterMetricFamily(
                "kap_discovery_errors",
                "Failed EndpointSlice lists and watches.",
                value=discovery.get("errors_total", 0),
            )
            last = discovery.get("last_success_unix")
            yield GaugeMetricFamily(
                "kap_discovery_last_success_timestamp_seconds",
                "Unix time of the last successful EndpointSlice list or watch event.",
                value=0.0 if last is None else float(last),
            )


def discovery_up(status: dict[str, Any]) -> bool:
    """Discovery's last list or watch succeeded (its ``status()``): none failed since."""
    return status.get("last_success_unix") is not None and status.get("failing_since_unix") is None


def _certificates(c: Counters) -> Iterator[Metric]:
    """The expiry of the certificates in kap's TLS context; absent while unknown."""
    from prometheus_client.core import GaugeMetricFamily

    for name, doc, value in (
        ("kap_client_certificate_expiry_timestamp_seconds",
         "Unix time the client certificate kap presents expires.", c.client_cert_expiry_unix()),
        ("kap_ca_certificate_expiry_timestamp_seconds",
         "Unix time the first certificate of kap's CA bundle expires.", c.ca_cert_expiry_unix()),
    ):  # fmt: skip
        if value is not None:
            yield GaugeMetricFamily(name, doc, value=value)


def _bound(value: float) -> str:
    return repr(float(value))


def metrics_registry(pool: Pool, counters: Counters) -> CollectorRegistry:
    """kap's own registry (no global state): its collector, and the ``process_*`` series.

    ``prometheus_client`` is imported here, at the first scrape (``kap.app``).
    """
    from prometheus_client import CollectorRegistry, ProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(KapCollector(pool, counters))
    ProcessCollector(registry=registry)
    return registry


def metrics_text(registry: CollectorRegistry) -> bytes:
    from prometheus_client import generate_latest

    return generate_latest(registry)
