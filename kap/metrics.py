"""What ``/metrics`` shows: a custom collector over a private registry.

There is no global metrics state, and a scrape costs one pass over the
upstreams: the families are built at scrape time from the pool and the
counters (``kap.report.Counters``), read-only. docs/monitoring.md lists every
family (``tests/test_metrics.py`` holds the two together).
"""

from __future__ import annotations

import functools
import platform
from collections.abc import Callable, Iterator
from typing import Any

import attrs
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from kap.build import BuildInfo, build_info
from kap.pool import Pool, Upstream
from kap.probe_results import PingOutcome, ProbeOutcome
from kap.report import Counters

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@attrs.define(eq=False)
class KapCollector:
    """Prometheus collector reading the pool and the counters at scrape time."""

    pool: Pool
    counters: Counters
    build: BuildInfo = attrs.field(factory=build_info)

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        """Every family: per upstream, then kap as a whole, then certificates, build, discovery."""
        ups = self.pool.upstreams
        yield from _upstream_state(ups)
        yield from _upstream_counts(ups)
        yield _probe_durations(ups)
        yield from _process_families(self.counters, ups)
        yield from _certificates(self.counters)
        yield _build_info(self.build)
        yield from _discovery_families(self.counters.discovery())


def _per_upstream(
    family: type[GaugeMetricFamily] | type[CounterMetricFamily],
    ups: tuple[Upstream, ...],
    name: str,
    doc: str,
    value: Callable[[Upstream], float],
) -> Metric:
    """One family with a sample per upstream, labelled ``upstream``."""
    f = family(name, doc, labels=["upstream"])
    for u in ups:
        f.add_metric([str(u.address)], value(u))
    return f


def _upstream_state(ups: tuple[Upstream, ...]) -> Iterator[Metric]:
    """What each upstream is now: usable, score, tier, open connections."""
    gauge = functools.partial(_per_upstream, GaugeMetricFamily, ups)
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


def _upstream_counts(ups: tuple[Upstream, ...]) -> Iterator[Metric]:
    """What happened to each upstream: connections, dial failures, checks, transitions."""
    counter = functools.partial(_per_upstream, CounterMetricFamily, ups)
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


def _probe_durations(ups: tuple[Upstream, ...]) -> Metric:
    hist = HistogramMetricFamily(
        "kap_upstream_probe_duration_seconds", "Duration of /readyz probes.", labels=["upstream"]
    )
    for u in ups:
        h = u.stats.probe_duration
        buckets = [(_bound(bound), float(n)) for bound, n in h.cumulative()]
        buckets.append(("+Inf", float(h.count)))
        hist.add_metric([str(u.address)], buckets, h.sum)
    return hist


def _process_families(c: Counters, ups: tuple[Upstream, ...]) -> Iterator[Metric]:
    """kap as a whole: client connections, bytes, how many upstreams."""
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


def _build_info(build: BuildInfo) -> Metric:
    info = GaugeMetricFamily(
        "kap_build_info", "kap's version and revision, and Python's version.",
        labels=["version", "revision", "python"],
    )  # fmt: skip
    info.add_metric([build.version, build.revision, platform.python_version()], 1)
    return info


def _discovery_families(discovery: dict[str, Any] | None) -> Iterator[Metric]:
    """Discovery's health: absent, not 0, when discovery is off.

    Off on purpose or for want of credentials: ``KapDiscoveryFailing`` must
    not fire on a choice.
    """
    if discovery is None or discovery.get("mode") == "off":
        return
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
    """kap's own registry (no global state): its collector, and the ``process_*`` series."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(KapCollector(pool, counters))
    ProcessCollector(registry=registry)
    return registry


def metrics_text(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
