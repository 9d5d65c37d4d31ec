"""What a probe's answer says, as one word: ``kap_upstream_probe_results_total{result}``.

A 401 or 403 counts as alive in the pool (the apiserver answered), so the
health series alone cannot show kap's credentials refused; this series can,
and KapCredentialsRefused fires on it. The rules (tests/test_metrics.py holds
them in a table):

* ``ok``: HTTP 200.
* ``refused``: 401 or 403 to the credentials kap presented. Something to fix.
* ``unauthenticated``: 401 or 403 when kap presented none on purpose (no
  credentials given, or no CA to verify the apiserver with, so none are
  sent). A configuration, not a fault: no alert reads it.
* ``not_ready``: any other HTTP status (500 while the apiserver starts).
* ``timeout``: the connection did not open, or no answer came, in time.
* ``error``: anything else (refused connection, TLS failure, reset).

HTTP/2 PINGs, which check a kept-alive connection between two ``/readyz``,
are counted apart (``kap_upstream_pings_total{result}``): ``ok`` (acked),
``timeout`` (no ack in time), ``error`` (the connection failed).

Pure: the probe's facts in, the word out.
"""

from __future__ import annotations

import enum

# The apiserver answered but refused the request's authentication or authorization.
AUTH_STATUSES = (401, 403)


class ProbeOutcome(enum.StrEnum):
    OK = "ok"
    REFUSED = "refused"
    UNAUTHENTICATED = "unauthenticated"
    NOT_READY = "not_ready"
    TIMEOUT = "timeout"
    ERROR = "error"


def classify(*, status: int | None, timed_out: bool, authenticated: bool) -> ProbeOutcome:
    """The outcome of one probe.

    Args:
      status: the HTTP status of the answer; None when none came.
      timed_out: no answer (or no connection) within the probe's deadline.
      authenticated: kap presented a token or client certificate
        (``CredentialFiles.authenticated``).
    """
    if status is None:
        return ProbeOutcome.TIMEOUT if timed_out else ProbeOutcome.ERROR
    if status == 200:
        return ProbeOutcome.OK
    if status in AUTH_STATUSES:
        return ProbeOutcome.REFUSED if authenticated else ProbeOutcome.UNAUTHENTICATED
    return ProbeOutcome.NOT_READY


class PingOutcome(enum.StrEnum):
    OK = "ok"
    TIMEOUT = "timeout"
    ERROR = "error"


def classify_ping(*, ok: bool, timed_out: bool) -> PingOutcome:
    """The outcome of one HTTP/2 PING."""
    if ok:
        return PingOutcome.OK
    return PingOutcome.TIMEOUT if timed_out else PingOutcome.ERROR
