"""``kap check``'s verdicts and output: what each finding means and what to fix.

Pure: the facts come in as plain values (what a connection, a handshake, a
``GET /readyz`` or a list of the EndpointSlices gave, what the files say),
so the rules below are tested with tables. The rules, per row:

* upstream (and the ``kubernetes`` Service when kap would bootstrap through
  it): the TCP connect, the TLS handshake verified against the name kap
  uses, then ``GET /readyz`` with kap's credentials: 200 is ok (but an
  answer slower than ``--health-timeout`` is a probe kap would fail);
  401/403 to credentials kap presented is "credentials refused" (to none,
  when kap presents none without a CA, it is only "alive"); 500 is "not
  ready"; anything else, or no answer, fails.
* discovery: ok when the ``default/kubernetes`` EndpointSlices list with
  kap's credentials and give at least one ready address, or when it is
  turned off on purpose (``--discovery=false``); 401 is credentials
  refused, 403 is RBAC (what is missing is said), anything else fails.
* credential files: each must load; a client certificate that has expired
  or expires within ``CERT_WARN_DAYS`` fails (the same days as kap's own
  problem and the monitoring mixin's warning).
* the fallback file: readable (a missing file is fine: kap creates it) and
  writable.

Exit status: 0 when every row is ok, 1 otherwise (each failing row named,
with what to fix), 2 for bad flags (decided by the caller).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from kap.problems import CERT_WARN_DAYS
from kap.status import latency, shorten, table

DETAIL_WIDTH = 100  # the table's; -o wide prints it whole
OK, FAIL = "ok", "FAIL"


@attrs.frozen
class Row:
    """One finding: a check, what it looked at, ok or not, and what to do when not."""

    check: str  # upstream, service, discovery, credentials, fallback-file
    target: str
    ok: bool
    detail: str
    fix: str | None = None
    data: Mapping[str, Any] = attrs.field(factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "check": self.check,
            "target": self.target,
            "ok": self.ok,
            "detail": self.detail,
            "fix": self.fix,
            **self.data,
        }


@attrs.frozen
class UpstreamFacts:
    """What checking one upstream found, step by step (a None step was not reached)."""

    address: str
    sources: tuple[str, ...]
    tls_name: str  # what the certificate is verified against
    connect_ms: float | None = None
    connect_error: str | None = None
    tls_ms: float | None = None
    tls_error: str | None = None
    status: int | None = None
    latency_ms: float | None = None
    request_error: str | None = None
    body: str = ""
    timed_out: bool = False  # the whole check ran out of time first


@attrs.frozen
class Credentials:
    """What kap presents: where from, and whether at all (only to verified servers)."""

    origin: str
    presented: bool  # a token or a client certificate, and a CA to verify the servers
    kind: str  # "token", "client certificate", "token and client certificate" or "none"
    # The servers' certificates are verified (a CA), credentials or not; None: as ``presented``.
    verifies: bool | None = None


def upstream_row(
    f: UpstreamFacts, creds: Credentials, *, health_timeout: float, check: str = "upstream"
) -> Row:
    """The verdict on one upstream (rules in the module docstring).

    One function on purpose: the steps (TCP, TLS, the answer, its latency) are
    a table read top to bottom, each failure returning its row, and each
    detail line names the steps that passed before it.
    """
    data: dict[str, Any] = {
        "sources": list(f.sources),
        "tls_server_name": f.tls_name,
        "connect_ms": f.connect_ms,
        "tls_ms": f.tls_ms,
        "status": f.status,
        "latency_ms": f.latency_ms,
    }
    reach = f"is the apiserver running and reachable from here at {f.address} (firewall, routes)?"

    def row(ok: bool, detail: str, fix: str | None = None, result: str = "") -> Row:
        return Row(check, f.address, ok, detail, fix, {**data, "result": result or OK})

    if f.connect_ms is None:
        why = f.connect_error or "ran out of time"
        return row(False, f"TCP connect failed: {why}", reach, "unreachable")
    steps = f"TCP {latency(f.connect_ms)}"
    if f.tls_ms is None:
        why = f.tls_error or "ran out of time"
        if "certificate verify failed" in why:
            fix = (
                f"the CA kap uses (credentials: {creds.origin}) does not verify this apiserver's "
                f"certificate for the name {f.tls_name!r}: give the cluster's CA (--ca-file) or "
                "the name its certificate carries (--tls-server-name)"
            )
            return row(False, f"TLS: {why} ({steps})", fix, "tls")
        return row(False, f"TLS handshake failed: {why} ({steps})", reach, "tls")
    verified = creds.presented if creds.verifies is None else creds.verifies
    steps += f", TLS verified as {f.tls_name}" if verified else ", TLS (not verified)"
    if f.status is None:
        why = f.request_error or "ran out of time"
        return row(False, f"GET /readyz: {why} ({steps})", reach, "no-answer")
    answer = f"/readyz {f.status} in {latency(f.latency_ms)}"
    where = f" ({steps})"
    if f.status in (401, 403):
        if not creds.presented:
            return row(True, f"alive, kap presents no credentials: {answer}{where}", None, "alive")
        fix = (
            f"the apiserver refuses kap's {creds.kind} (credentials: {creds.origin}): check that "
            "it is current and issued for this cluster (401: not valid; 403: its user may not "
            "read /readyz)"
        )
        return row(False, f"credentials refused: {answer}{where}", fix, "refused")
    if f.status == 500:
        failed = [line[3:] for line in f.body.splitlines() if line.startswith("[-]")]
        why = f" ({', '.join(failed)})" if failed else ""
        fix = "the apiserver says it is not ready: see its /readyz?verbose and its log"
        return row(False, f"not ready{why}: {answer}{where}", fix, "not-ready")
    if f.status != 200:
        return row(False, f"unexpected answer: {answer}{where}", reach, "error")
    if f.latency_ms is not None and f.latency_ms > health_timeout * 1e3:
        fix = (
            f"kap's probes give up after --health-timeout {health_timeout * 1e3:g}ms: raise it "
            "above the round trip to this apiserver"
        )
        return row(False, f"slower than --health-timeout: {answer}{where}", fix, "slow")
    return row(True, f"{answer}{where}")


@attrs.frozen
class DiscoveryFacts:
    """What listing the ``default/kubernetes`` EndpointSlices gave."""

    on_purpose_off: bool = False
    off_reasons: tuple[tuple[str, str], ...] = ()  # (why, what to give), as kap says them
    via: str | None = None  # the upstream (or Service) it listed through; None: none to ask
    via_service: bool = False
    status: int | None = None
    error: str | None = None
    message: str = ""  # the Status message of a refusal
    addresses: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()


def discovery_row(f: DiscoveryFacts, creds: Credentials, *, namespace: str, resource: str) -> Row:
    """The verdict on discovery (rules in the module docstring)."""
    what = f"{namespace}/kubernetes EndpointSlices"
    if f.on_purpose_off:
        return Row("discovery", "off", True, "off on purpose (--discovery=false)")
    if f.off_reasons:
        why = "; ".join(w for w, _ in f.off_reasons)
        give = "; ".join(g for _, g in f.off_reasons)
        return Row("discovery", "off", False, f"kap would turn it off: {why}", f"give {give}")
    if f.via is None:
        fix = (
            "give --fallback-upstreams host:port,..., a --fallback-file with entries or "
            "--kubeconfig, or run in a pod (KUBERNETES_SERVICE_HOST/PORT)"
        )
        why = f.error or "no upstream answered to list through"
        return Row("discovery", "<none>", False, why, fix)
    target = f"via {f.via}" + (" (Service)" if f.via_service else "")
    data: dict[str, Any] = {"via": f.via, "status": f.status, "addresses": list(f.addresses)}
    if f.status is None:
        fix = "see the upstream's row: discovery goes through it"
        return Row("discovery", target, False, f"list failed: {f.error}", fix, data)
    if f.status == 401:
        fix = f"the apiserver refuses kap's {creds.kind} (credentials: {creds.origin})"
        return Row("discovery", target, False, "list: 401, credentials refused", fix, data)
    if f.status == 403:
        fix = (
            f"kap's user may not list {resource} in namespace {namespace}: bind it get, list and "
            f"watch on {resource} there (deploy/rbac.yaml)"
        )
        why = f": {f.message}" if f.message else ""
        return Row("discovery", target, False, f"list: 403, RBAC forbids it{why}", fix, data)
    if f.status != 200:
        why = f": {f.message}" if f.message else ""
        fix = "the apiserver cannot list them now: see its log"
        return Row("discovery", target, False, f"list: HTTP {f.status}{why}", fix, data)
    if not f.addresses:
        fix = "the kubernetes Service has no ready endpoint: are the apiservers ready?"
        return Row("discovery", target, False, f"{what} list no ready apiserver", fix, data)
    skipped = f" ({len(f.skipped)} parts skipped: {f.skipped[0]})" if f.skipped else ""
    listed = ", ".join(f.addresses)
    return Row("discovery", target, True, f"{what}: {listed}{skipped}", None, data)


def certificate_row(
    what: str,
    path: str,
    *,
    subject: str | None,
    not_after_unix: float | None,
    count: int,
    error: str | None,
    now_unix: float,
    fix: str,
) -> Row:
    """A certificate file: it loads; a client certificate's days left (``what`` == "cert")."""
    target = f"{what} {path}"
    if error is not None or subject is None or not_after_unix is None:
        return Row("credentials", target, False, f"cannot be used: {error}", fix)
    days = (not_after_unix - now_unix) / 86400.0
    many = f"{count} certificates, first " if count > 1 else ""
    detail = f"{many}subject {subject}, expires in {days:.0f} days"
    data = {"subject": subject, "not_after_unix": not_after_unix, "days_left": round(days, 2)}
    if days <= 0:
        return Row("credentials", target, False, f"{many}subject {subject}: expired", fix, data)
    if what == "cert" and days < CERT_WARN_DAYS:
        return Row("credentials", target, False, detail, fix, data)
    return Row("credentials", target, True, detail, None, data)


# ---- output ---------------------------------------------------------------------


def render(
    rows: Sequence[Row], warnings: Sequence[str], output: str, settings: str, credentials: str
) -> str:
    """What ``kap check -o OUTPUT`` prints (ends with a newline)."""
    failing = [r for r in rows if not r.ok]
    if output == "json":
        doc = {
            "ok": not failing,
            "settings": settings,
            "credentials": credentials,
            "warnings": list(warnings),
            "checks": [r.as_json() for r in rows],
        }
        return json.dumps(doc, indent=2) + "\n"
    wide = output == "wide"
    header = ["CHECK", "TARGET", "RESULT", *(["SOURCES"] if wide else []), "DETAIL"]
    cells = [
        [
            r.check,
            r.target,
            OK if r.ok else FAIL,
            *([",".join(r.data.get("sources", ())) or "<none>"] if wide else []),
            r.detail if wide else shorten(r.detail, DETAIL_WIDTH),
        ]
        for r in rows
    ]
    lines = [f"settings: {settings}; credentials: {credentials}", *table(header, cells)]
    lines.extend(f"warning: {w}" for w in warnings)
    for r in failing:
        lines.append(f"fix {r.check} {r.target}: {r.fix or r.detail}")
    if failing:
        lines.append(f"{len(failing)} of {len(rows)} checks failed: kap would not work as it is")
    else:
        lines.append(f"all {len(rows)} checks passed")
    return "\n".join(lines) + "\n"


def exit_status(rows: Sequence[Row]) -> int:
    return 0 if all(r.ok for r in rows) else 1
