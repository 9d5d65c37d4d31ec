"""``kap check``'s verdicts: from the facts gathered to one row each (tables, no I/O)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kap.check_report import (
    Credentials,
    DiscoveryFacts,
    Row,
    UpstreamFacts,
    certificate_row,
    discovery_row,
    exit_status,
    render,
    upstream_row,
)

TOKEN = Credentials(origin="flags", presented=True, kind="token")


NONE = Credentials(origin="none", presented=False, kind="none")


def facts(**fields: Any) -> UpstreamFacts:
    base: dict[str, Any] = {
        "address": "10.0.0.1:6443",
        "sources": ("flag",),
        "tls_name": "kubernetes.default.svc",
        "connect_ms": 1.0,
        "tls_ms": 3.0,
        "status": 200,
        "latency_ms": 2.0,
    }
    return UpstreamFacts(**(base | fields))


@pytest.mark.parametrize(
    ("upstream", "creds", "ok", "result", "says"),
    [
        (facts(), TOKEN, True, "ok", "/readyz 200 in 2.0ms (TCP 1.0ms, TLS verified as kubernetes"),
        (facts(connect_ms=None, connect_error="Connection refused"), TOKEN, False,
         "unreachable", "TCP connect failed: Connection refused"),
        (facts(tls_ms=None, tls_error="certificate verify failed: unable to get local issuer "
               "certificate"), TOKEN, False, "tls", "certificate verify failed"),
        (facts(status=None, request_error="no answer within 1s"), TOKEN, False, "no-answer",
         "GET /readyz: no answer within 1s"),
        (facts(status=401), TOKEN, False, "refused", "credentials refused"),
        (facts(status=403), TOKEN, False, "refused", "credentials refused"),
        (facts(status=403), NONE, True, "alive", "kap presents no credentials"),
        (facts(status=500, body="[+]ping ok\n[-]etcd failed: reason withheld\n"), TOKEN, False,
         "not-ready", "not ready (etcd failed: reason withheld)"),
        (facts(latency_ms=250.0), TOKEN, False, "slow", "slower than --health-timeout"),
        (facts(status=404), TOKEN, False, "error", "unexpected answer"),
    ],
)  # fmt: skip
def test_upstream_verdicts(
    upstream: UpstreamFacts, creds: Credentials, ok: bool, result: str, says: str
) -> None:
    row = upstream_row(upstream, creds, health_timeout=0.1)
    assert (row.ok, row.data["result"]) == (ok, result)
    assert says in row.detail
    assert (row.fix is None) == ok


@pytest.mark.parametrize(
    ("discovery", "ok", "says"),
    [
        (DiscoveryFacts(on_purpose_off=True), True, "off on purpose"),
        (DiscoveryFacts(off_reasons=(("no CA", "--ca-file"),)), False, "kap would turn it off"),
        (DiscoveryFacts(), False, "no upstream answered"),
        (DiscoveryFacts(via="a:1", status=200, addresses=("a:1", "b:1")), True, "a:1, b:1"),
        (DiscoveryFacts(via="a:1", status=200), False, "no ready apiserver"),
        (DiscoveryFacts(via="a:1", status=401), False, "credentials refused"),
        (DiscoveryFacts(via="a:1", status=403, message="forbidden"), False, "RBAC"),
        (DiscoveryFacts(via="a:1", status=500), False, "HTTP 500"),
        (DiscoveryFacts(via="a:1", error="Connection refused"), False, "Connection refused"),
    ],
)
def test_discovery_verdicts(discovery: DiscoveryFacts, ok: bool, says: str) -> None:
    row = discovery_row(discovery, TOKEN, namespace="default", resource="endpointslices")
    assert row.ok == ok and says in row.detail, row


@pytest.mark.parametrize(
    ("what", "days", "ok", "says"),
    [
        ("cert", 365.0, True, "expires in 365 days"),
        ("cert", 3.0, False, "expires in 3 days"),
        ("cert", -1.0, False, "expired"),
        ("ca", 3.0, True, "expires in 3 days"),  # a CA about to expire is the cluster's matter
    ],
)
def test_certificate_verdicts(what: str, days: float, ok: bool, says: str) -> None:
    now = 1_800_000_000.0
    row = certificate_row(what, "/x", subject="CN=a", not_after_unix=now + days * 86400,
                          count=1, error=None, now_unix=now, fix="renew")  # fmt: skip
    assert (row.ok, row.fix is None) == (ok, ok) and says in row.detail, row


# ---- output (no I/O) -------------------------------------------------------------

GOOD = Row("upstream", "10.0.0.1:6443", True, "/readyz 200", data={"sources": ("flag",)})
BAD = Row("discovery", "via 10.0.0.1:6443", False, "HTTP 403 " + "x" * 300, fix="grant RBAC")


def test_the_table_lists_every_row_then_warnings_then_one_fix_line_per_failure() -> None:
    out = render([GOOD, BAD], ["w1"], "table", "flags", "token")
    lines = out.splitlines()
    assert lines[0] == "settings: flags; credentials: token"
    assert lines[1].split() == ["CHECK", "TARGET", "RESULT", "DETAIL"]
    assert lines[2].split()[:3] == ["upstream", "10.0.0.1:6443", "ok"]
    assert lines[3].split()[:3] == ["discovery", "via", "10.0.0.1:6443"] and "FAIL" in lines[3]
    assert "x" * 300 not in out  # the detail is shortened in the table
    assert lines[4:] == [
        "warning: w1",
        "fix discovery via 10.0.0.1:6443: grant RBAC",
        "1 of 2 checks failed: kap would not work as it is",
    ]
    assert exit_status([GOOD, BAD]) == 1


def test_wide_shows_sources_and_the_whole_detail_and_json_is_the_rows() -> None:
    wide = render([GOOD, BAD], [], "wide", "flags", "token")
    assert "SOURCES" in wide.splitlines()[1] and "x" * 300 in wide
    doc = json.loads(render([GOOD], [], "json", "flags", "token"))
    assert doc["ok"] is True and doc["checks"][0]["sources"] == ["flag"]
    assert render([GOOD], [], "table", "s", "c").endswith("all 1 checks passed\n")
    assert exit_status([GOOD]) == 0
