"""What kap reports: the /upstreams document and the /metrics registry (no I/O)."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import attrs
import pytest
from test_monitoring import promtool  # noqa: F401  -- the fixture

from kap.address import Address
from kap.metrics import metrics_registry, metrics_text
from kap.pool import Pool
from kap.probe_results import PingOutcome, ProbeOutcome
from kap.report import Counters, UpstreamReport, upstreams_document, upstreams_json


def _scrape(pool: Pool, counters: Counters) -> str:
    return metrics_text(metrics_registry(pool, counters)).decode()


def metric_samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


DISCOVERY_OK = {"mode": "watch", "last_success_unix": 1.0e9, "failing_since_unix": None}


DISCOVERY_FAILING = {"mode": "backoff", "last_success_unix": 1.0e9, "failing_since_unix": 1.1e9}


DISCOVERY_STARTING = {"mode": "starting", "last_success_unix": None, "failing_since_unix": None}


DISCOVERY_OFF = {"mode": "off", "last_success_unix": None, "last_error": "no credentials"}


@pytest.mark.parametrize(
    ("discovery", "up"),
    [(DISCOVERY_OK, 1.0), (DISCOVERY_FAILING, 0.0), (DISCOVERY_STARTING, 0.0),
     (DISCOVERY_OFF, None), (None, None)],
)  # fmt: skip
def test_discovery_up_is_absent_when_discovery_is_off(
    discovery: dict[str, Any] | None, up: float | None
) -> None:
    samples = metric_samples(_scrape(Pool(), Counters(discovery=lambda: discovery)))
    assert samples.get("kap_discovery_up") == up
    if up is None:  # every discovery series is absent, not 0
        assert not [n for n in samples if n.startswith("kap_discovery_")]


def test_metrics_pass_promtool_and_carry_the_new_series(promtool: str) -> None:  # noqa: F811
    pool = Pool()
    a = Address("10.0.0.1", 6443)
    pool.set_source("flag", [a], now=0.0)
    pool.record_probe(a, ok=True, now=1.0, latency=0.001, duration=0.002)
    pool.record_probe(a, ok=True, now=1.0, latency=0.001, duration=0.002)
    pool.record_probe(a, ok=True, now=1.0, latency=0.001, duration=0.002)
    pool.get(a).stats.probe_results[ProbeOutcome.REFUSED] += 2  # type: ignore[union-attr]
    pool.get(a).stats.ping_results[PingOutcome.TIMEOUT] += 1  # type: ignore[union-attr]
    counters = Counters(
        discovery=lambda: DISCOVERY_OK,
        client_cert_expiry_unix=lambda: 1.9e9,
        ca_cert_expiry_unix=lambda: 2.0e9,
    )
    text = _scrape(pool, counters)
    samples = metric_samples(text)
    up = 'upstream="10.0.0.1:6443"'
    assert samples[f'kap_upstream_probe_results_total{{result="refused",{up}}}'] == 2
    for outcome in ProbeOutcome:  # all six, 0 included, so rate() sees the first
        assert f'kap_upstream_probe_results_total{{result="{outcome}",{up}}}' in samples
    assert samples[f'kap_upstream_pings_total{{result="timeout",{up}}}'] == 1
    assert samples[f"kap_upstream_transitions_total{{{up}}}"] == 1
    assert samples["kap_client_certificate_expiry_timestamp_seconds"] == 1.9e9
    assert samples["kap_ca_certificate_expiry_timestamp_seconds"] == 2.0e9
    assert samples["kap_discovery_up"] == 1
    [info] = [n for n in samples if n.startswith("kap_build_info{")]
    assert 'python="3.' in info and "revision=" in info and "version=" in info
    for name in ("process_resident_memory_bytes", "process_open_fds", "process_max_fds",
                 "process_cpu_seconds_total"):  # fmt: skip
        assert name in samples, name
    done = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert not (done.stdout + done.stderr).strip(), done.stdout + done.stderr


def test_certificates_absent_when_unknown() -> None:
    samples = metric_samples(_scrape(Pool(), Counters()))
    assert not [n for n in samples if "certificate" in n]


def test_the_metrics_table_lists_exactly_what_kap_exports() -> None:
    from test_monitoring import documented_metrics

    pool = Pool()
    pool.set_source("flag", [Address("10.0.0.1", 6443)], now=0.0)
    counters = Counters(
        discovery=lambda: DISCOVERY_OK,
        client_cert_expiry_unix=lambda: 1.9e9,
        ca_cert_expiry_unix=lambda: 2.0e9,
    )
    exported = {
        line.split()[2]
        for line in _scrape(pool, counters).splitlines()
        if line.startswith("# TYPE ")
    }
    assert exported == documented_metrics()


# ---------------------------------------------------------------- /upstreams

A = Address("10.0.0.1", 6443)


def test_an_upstream_report_counts_time_from_the_clock_it_is_given() -> None:
    pool = Pool()
    pool.set_source("flag", [A], now=0.0)
    pool.record_probe(A, ok=True, now=1.0, latency=0.0012345)
    u = pool.get(A)
    assert u is not None
    u.unhealthy_since, u.held_until, u.remove_at = 2.0, 30.0, 5.0
    r = UpstreamReport.of(u, now=10.0, protocol="h2")
    assert (r.address, r.sources, r.probed, r.latency_ms, r.protocol) == (
        "10.0.0.1:6443",
        ["flag"],
        True,
        1.234,  # milliseconds, rounded to the microsecond
        "h2",
    )
    assert (r.unhealthy_for_s, r.held_down_for_s, r.removal_in_s) == (8.0, 20.0, 0.0)
    assert r.probes_total == 1 and r.healthy is False  # held down


def test_upstreams_json_is_the_document_with_every_contract_field() -> None:
    pool = Pool()
    pool.set_source("flag", [A], now=0.0)
    pool.record_probe(A, ok=True, now=1.0, latency=0.001)
    counters = Counters(
        accepted_total=lambda: 7,
        bytes_up=lambda: 10,
        bytes_down=lambda: 20,
        discovery=lambda: DISCOVERY_OK,
        probe_protocol=lambda address: "http/1.1",
    )
    doc = json.loads(upstreams_json(pool, counters, now=2.0))
    (upstream,) = doc["upstreams"]
    assert set(upstream) == {f.name for f in attrs.fields(UpstreamReport)}
    assert (upstream["healthy"], upstream["protocol"]) == (True, "http/1.1")
    assert doc["connections"]["accepted_total"] == 7
    assert doc["bytes"] == {"up": 10, "down": 20}
    assert doc["discovery"] == DISCOVERY_OK
    assert doc["fallback_service"] is None and doc["best_tier"] == pool.best_tier()
    assert doc["problems"] == []


def test_without_discovery_the_document_has_no_discovery_key() -> None:
    doc = upstreams_document(Pool(), Counters(), now=0.0, wall=0.0)
    assert "discovery" not in doc and doc["upstreams"] == []
