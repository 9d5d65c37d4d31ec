"""The metrics for what fails silently (issue 12, section 3), through kap's own parts.

- probe results counted per upstream by a real probe, refusals told from
  credentials not presented;
- the expiry of the client and CA certificates in the TLS context kap uses
  (not the files on disk), and the problems list fed from it;
- /readyz results and PINGs counted apart.

The classification tables are in test_probe_results.py, the registry and
``promtool check metrics`` in test_report.py, reading certificates in
test_certinfo.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
from fakeapi import FakeApiServer, PkiFiles
from kaptest import get_json, make_config, start_kap, wait_until
from shortcert import issue_client_cert
from test_report import metric_samples

from kap.certinfo import earliest_not_after
from kap.credentials import CredentialFiles
from kap.sources import Credentials

# ---------------------------------------------------------------- certificates


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
        samples = metric_samples(await _get_text(bound.health, "/metrics"))
        expiry = samples["kap_client_certificate_expiry_timestamp_seconds"]
        assert expiry == expires
        nursery.cancel_scope.cancel()


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
