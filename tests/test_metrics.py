"""The metrics for what fails silently (issue 12, section 3).

- probe results classified as ok, refused, unauthenticated, not_ready,
  timeout, error (a table), and counted per upstream by a real probe;
- the expiry of the client and CA certificates in the TLS context kap uses
  (not the files on disk), and the problems list fed from it;
- build info, ``process_*``, transitions, ``kap_discovery_up`` (absent when
  discovery is off), all passing ``promtool check metrics``.
"""

from __future__ import annotations

import datetime
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from fakeapi import FakeApiServer, PkiFiles
from kaptest import get_json, make_config, start_kap, wait_until
from shortcert import issue_client_cert
from test_monitoring import promtool  # noqa: F401  -- the fixture

from kap.address import Address
from kap.certinfo import earliest_not_after, leaf_not_after
from kap.credentials import CredentialFiles
from kap.metrics import metrics_registry, metrics_text
from kap.pool import Pool
from kap.probe_results import PingOutcome, ProbeOutcome, classify, classify_ping
from kap.report import Counters
from kap.sources import Credentials

OK, REFUSED, UNAUTH = ProbeOutcome.OK, ProbeOutcome.REFUSED, ProbeOutcome.UNAUTHENTICATED
NOT_READY, TIMEOUT, ERROR = ProbeOutcome.NOT_READY, ProbeOutcome.TIMEOUT, ProbeOutcome.ERROR


@pytest.mark.parametrize(
    ("status", "timed_out", "authenticated", "expected"),
    [
        (200, False, True, OK),
        (200, False, False, OK),
        (401, False, True, REFUSED),
        (403, False, True, REFUSED),
        (401, False, False, UNAUTH),
        (403, False, False, UNAUTH),
        (500, False, True, NOT_READY),
        (503, False, False, NOT_READY),
        (404, False, True, NOT_READY),
        (None, True, True, TIMEOUT),
        (None, True, False, TIMEOUT),
        (None, False, True, ERROR),
        (None, False, False, ERROR),
    ],
)
def test_probe_result_classification(
    status: int | None, timed_out: bool, authenticated: bool, expected: ProbeOutcome
) -> None:
    assert classify(status=status, timed_out=timed_out, authenticated=authenticated) == expected


@pytest.mark.parametrize(
    ("ok", "timed_out", "expected"),
    [(True, False, PingOutcome.OK), (False, True, PingOutcome.TIMEOUT),
     (False, False, PingOutcome.ERROR)],
)  # fmt: skip
def test_ping_classification(ok: bool, timed_out: bool, expected: PingOutcome) -> None:
    assert classify_ping(ok=ok, timed_out=timed_out) == expected


# ---------------------------------------------------------------- certificates


def _at(days: float) -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=days)


def test_expiry_of_a_leaf_and_of_a_bundle_and_garbage_is_unknown(tmp_path: Path) -> None:
    ca = trustme.CA()
    soon = ca.issue_cert("a.test", not_after=_at(0.5))
    leaf = tmp_path / "leaf.pem"
    soon.cert_chain_pems[0].write_to_path(str(leaf))
    only = leaf_not_after(str(leaf))
    assert only is not None and abs(only - _at(0.5).timestamp()) < 5
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(ca.cert_pem.bytes() + b"# comment\n" + leaf.read_bytes())
    assert earliest_not_after(str(bundle)) == only
    assert leaf_not_after(str(bundle)) != only  # the CA comes first, and lasts longer
    broken = tmp_path / "broken.pem"
    broken.write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    assert leaf_not_after(str(broken)) is None
    assert leaf_not_after(str(tmp_path / "missing.pem")) is None


def _credentials(pki: PkiFiles, cert: Path | None, *, ca: bool = True) -> CredentialFiles:
    return CredentialFiles(
        Credentials(
            ca_file=str(pki.ca_file) if ca else None,
            cert_file=None if cert is None else str(cert),
            key_file=None if cert is None else str(cert.with_suffix(".key")),
            token_file=None,
            origin="flags",
        )
    )


def _client(pki: PkiFiles, cert: Path, days: float) -> float:
    return issue_client_cert(pki, cert, cert.with_suffix(".key"), days=days)


def test_expiry_is_that_of_the_loaded_context_not_of_the_files(
    pki: PkiFiles, tmp_path: Path
) -> None:
    cert = tmp_path / "cl.crt"
    year = _client(pki, cert, 365)
    files = _credentials(pki, cert)
    assert files.client_cert_not_after is None  # nothing loaded yet
    files.ssl_context()
    assert files.client_cert_not_after == year
    assert files.ca_not_after == earliest_not_after(str(pki.ca_file)) is not None
    expires = _client(pki, cert, 0.5)
    assert files.client_cert_not_after == year  # the file changed; the context not yet
    files.ssl_context()
    assert files.client_cert_not_after == expires
    # A certificate that no longer loads keeps the context, and its expiry.
    cert.write_text("not a certificate\n")
    files.ssl_context()
    assert files.client_cert_not_after == expires


def test_no_certificate_presented_means_no_expiry(pki: PkiFiles, tmp_path: Path) -> None:
    cert = tmp_path / "cl.crt"
    _client(pki, cert, 365)
    without_ca = _credentials(pki, cert, ca=False)  # kap presents nothing unverified
    without_ca.ssl_context()
    assert (without_ca.client_cert_not_after, without_ca.ca_not_after) == (None, None)
    without_cert = _credentials(pki, None)
    without_cert.ssl_context()
    assert without_cert.client_cert_not_after is None
    assert without_cert.ca_not_after is not None
    # Never loaded: the CA alone is used, the certificate is not presented.
    cert.write_text("garbage\n")
    broken = _credentials(pki, cert)
    broken.ssl_context()
    assert broken.client_cert_not_after is None
    assert broken.ca_not_after is not None


# ---------------------------------------------------------------- /metrics


def _scrape(pool: Pool, counters: Counters) -> str:
    return metrics_text(metrics_registry(pool, counters)).decode()


def _samples(text: str) -> dict[str, float]:
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
    samples = _samples(_scrape(Pool(), Counters(discovery=lambda: discovery)))
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
    samples = _samples(text)
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
    samples = _samples(_scrape(Pool(), Counters()))
    assert not [n for n in samples if "certificate" in n]


# ---------------------------------------------------------------- through kap


async def _probe_results(health: Any, fake: FakeApiServer) -> dict[str, float]:
    text = await _get_text(health, "/metrics")
    host, port = fake.address  # type: ignore[misc]
    mine = f'upstream="{host}:{port}"'
    return {
        line.split('result="')[1].split('"')[0]: float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith("kap_upstream_probe_results_total{") and mine in line
    }


async def _get_text(address: Any, path: str) -> str:
    import httpx2

    async with httpx2.AsyncClient(trust_env=False) as client:
        r = await client.get(f"http://{address}{path}")
        r.raise_for_status()
        return r.text


@pytest.mark.parametrize(("with_ca", "expected"), [(True, "refused"), (False, "unauthenticated")])
async def test_probes_refused_are_told_from_credentials_not_presented(
    pki: PkiFiles, with_ca: bool, expected: str
) -> None:
    fake = FakeApiServer("a", pki, require_token="not-kap-s-token")
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.run)
        host, port = fake.address  # type: ignore[misc]
        config = make_config(
            pki if with_ca else None,
            fallback_upstreams=f"{host}:{port}",
            token_file=str(pki.token_file),
        )
        _app, bound = await start_kap(nursery, config)
        await wait_until(lambda: fake.probe_count() >= 3)
        with trio.fail_after(10):
            while (await _probe_results(bound.health, fake)).get(expected, 0) < 2:
                await trio.sleep(0.05)
        results = await _probe_results(bound.health, fake)
        other = "unauthenticated" if expected == "refused" else "refused"
        assert results[other] == 0 and results["ok"] == 0
        nursery.cancel_scope.cancel()


async def test_problems_name_the_client_certificate_kap_presents(
    pki: PkiFiles, tmp_path: Path
) -> None:
    cert = tmp_path / "cl.crt"
    expires = _client(pki, cert, 0.5)
    fake = FakeApiServer("a", pki, require_client_cert=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.run)
        host, port = fake.address  # type: ignore[misc]
        config = make_config(
            pki,
            fallback_upstreams=f"{host}:{port}",
            cert_file=str(cert),
            key_file=str(cert.with_suffix(".key")),
        )
        _app, bound = await start_kap(nursery, config)
        await wait_until(lambda: fake.client_cert_requests >= 1)
        doc = await get_json(bound.health, "/upstreams")
        assert any("client certificate expires in less than a day" in p for p in doc["problems"])
        samples = _samples(await _get_text(bound.health, "/metrics"))
        expiry = samples["kap_client_certificate_expiry_timestamp_seconds"]
        assert expiry == expires
        nursery.cancel_scope.cancel()


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


async def test_readyz_results_and_pings_are_counted_apart(
    nursery: trio.Nursery,
    start_fake: Any,
    pki: PkiFiles,
    autojump_clock: trio.testing.MockClock,
) -> None:
    from test_probe_h2 import scheduler

    a = await start_fake("a")
    sched, address = scheduler(pki, a, readiness_interval=10.0)

    def stop_acking() -> None:
        a.ack_pings = False

    await nursery.start(sched.run)
    await trio.sleep(15.5)  # /readyz at 0 and 10, PINGs every second between
    stop_acking()
    await trio.sleep(1.0)  # the PING at 16 goes unacked; a /readyz follows at once
    up = sched.pool.get(address)
    assert up is not None
    assert dict(up.stats.probe_results) == {"ok": 3}  # at 0, 10, and at once after the missed PING
    assert dict(up.stats.ping_results) == {"ok": 14, "timeout": 1}  # at 1..9 and 11..15; 16
