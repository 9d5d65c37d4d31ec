"""What is wrong with a running kap right now, as a few short sentences.

``/upstreams`` can show every apiserver ``healthy`` while kap's credentials
are refused (a 401 proves the apiserver alive) and discovery has been failing
for an hour; ``problems`` names such silent failures at the top of the
document, ``kap status`` exits 1 on them and kap logs each change of the list.

Pure: the inputs are the report's own values and the wall clock as numbers,
so the rules are tested with tables. The rules:

* No upstream usable: none is usable for new connections, once every known
  upstream has had its first probe (right after start, or after discovery
  added an address, nothing has been probed yet: that is no problem). An
  empty pool is one.
* Credentials refused: N upstreams answer kap's probes with 401/403, while
  kap presents credentials. Without them on purpose (no CA, so kap presents
  nothing: ``unauthenticated``), a 401 is expected and no problem of its own;
  discovery being off says why.
* Discovery off: it stopped for a reason (no credentials, no CA); turned off
  on purpose (``--discovery=false``), it is absent from the report.
* Discovery failing: since its first failure after the last success.
* Client certificate: expires within ``cert_warn_days`` (or has expired).

A sentence stays the same while the condition lasts (no "for 5 s" that ticks),
so the list changes, and kap logs, only when something happens.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

# The same 7 days as the monitoring mixin's warning alert on the client
# certificate (KapClientCertificateExpiringSoon): `kap status` and the page agree.
CERT_WARN_DAYS = 7.0
DAY = 86400.0


class UpstreamState(Protocol):
    """What the rules read of an upstream (``kap.report.UpstreamReport`` has it)."""

    @property
    def healthy(self) -> bool: ...
    @property
    def auth_refused(self) -> bool: ...
    @property
    def probes_total(self) -> int: ...


def find_problems(
    upstreams: Sequence[UpstreamState],
    discovery: Mapping[str, Any] | None,
    *,
    now_unix: float,
    client_cert_expiry_unix: float | None = None,
    cert_warn_days: float = CERT_WARN_DAYS,
    unauthenticated: bool = False,
) -> list[str]:
    """The problems, most urgent first.

    Args:
      upstreams: every upstream in the pool.
      discovery: the report's ``discovery`` object; None when it is off on purpose.
      now_unix: the wall clock (the certificate's expiry is wall time).
      client_cert_expiry_unix: when the client certificate kap presents
        expires; None when kap presents none or it is not known.
      cert_warn_days: how long before the expiry it becomes a problem.
      unauthenticated: kap presents no credentials on purpose (no CA), so
        its probes' 401/403 are expected.
    """
    out: list[str] = []
    if not upstreams:
        out.append("no upstream usable: kap knows no upstream")
    elif not any(u.healthy for u in upstreams) and all(u.probes_total > 0 for u in upstreams):
        out.append(f"no upstream usable (0 of {len(upstreams)})")
    refused = 0 if unauthenticated else sum(u.auth_refused for u in upstreams)
    if refused:
        out.append(f"credentials refused by {refused} of {len(upstreams)} upstreams")
    if discovery is not None:
        if discovery.get("mode") == "off":
            out.append(f"discovery is off: {discovery.get('last_error') or 'unknown reason'}")
        elif (since := discovery.get("failing_since_unix")) is not None:
            out.append(f"discovery failing since {utc(since)}")
    if client_cert_expiry_unix is not None:
        left = client_cert_expiry_unix - now_unix
        if left <= 0:
            out.append(f"client certificate expired at {utc(client_cert_expiry_unix)}")
        elif left < cert_warn_days * DAY:
            days = int(left // DAY)
            when = "in less than a day" if days == 0 else f"in {days} day{'s' * (days != 1)}"
            out.append(f"client certificate expires {when} ({utc(client_cert_expiry_unix)})")
    return out


def utc(unix: float) -> str:
    """RFC 3339 in UTC to the second, as in kap's log lines."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix))
