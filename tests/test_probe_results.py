"""Probe and PING results classified: tables (no I/O)."""

from __future__ import annotations

import pytest

from kap.probe_results import PingOutcome, ProbeOutcome, classify, classify_ping

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
