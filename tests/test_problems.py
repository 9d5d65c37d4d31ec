"""The rules of ``/upstreams``' problems, as a table (kap.problems)."""

from __future__ import annotations

from typing import Any

import attrs
import pytest

from kap.problems import DAY, find_problems

NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z


@attrs.frozen
class Up:
    healthy: bool = True
    auth_refused: bool = False
    probes_total: int = 3


DOWN = Up(healthy=False)
NEW = Up(healthy=False, probes_total=0)
REFUSED = Up(auth_refused=True)
WATCHING = {"mode": "watch", "last_error": None, "failing_since_unix": None}
FAILING = {"mode": "backoff", "last_error": "HTTP 403", "failing_since_unix": NOW - 90}
RECOVERED = {"mode": "watch", "last_error": "HTTP 403", "failing_since_unix": None}
OFF = {"mode": "off", "last_error": "no credentials", "failing_since_unix": None}

CASES: list[tuple[str, list[Up], dict[str, Any] | None, float | None, list[str]]] = [
    ("all well", [Up(), Up()], WATCHING, None, []),
    ("discovery off on purpose", [Up()], None, None, []),
    ("one of two down", [Up(), DOWN], WATCHING, None, []),
    ("all down", [DOWN, DOWN], None, None, ["no upstream usable (0 of 2)"]),
    ("empty pool", [], None, None, ["no upstream usable: kap knows no upstream"]),
    ("not probed yet", [DOWN, NEW], None, None, []),
    ("refused", [REFUSED, Up(), REFUSED], None, None, ["credentials refused by 2 of 3 upstreams"]),
    ("discovery failing", [Up()], FAILING, None, ["discovery failing since 2027-01-15T07:58:30Z"]),
    ("discovery recovered", [Up()], RECOVERED, None, []),
    ("discovery off", [Up()], OFF, None, ["discovery is off: no credentials"]),
    ("cert far", [Up()], None, NOW + 30 * DAY, []),
    ("cert 6.5 days", [Up()], None, NOW + 6.5 * DAY,
     ["client certificate expires in 6 days (2027-01-21T20:00:00Z)"]),
    ("cert 1 day", [Up()], None, NOW + 1.5 * DAY,
     ["client certificate expires in 1 day (2027-01-16T20:00:00Z)"]),
    ("cert hours", [Up()], None, NOW + 3600,
     ["client certificate expires in less than a day (2027-01-15T09:00:00Z)"]),
    ("cert expired", [Up()], None, NOW - 60,
     ["client certificate expired at 2027-01-15T07:59:00Z"]),
    ("all at once", [DOWN, Up(healthy=False, auth_refused=True)], FAILING, NOW - 1,
     ["no upstream usable (0 of 2)", "credentials refused by 1 of 2 upstreams",
      "discovery failing since 2027-01-15T07:58:30Z",
      "client certificate expired at 2027-01-15T07:59:59Z"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("upstreams", "discovery", "cert", "expected"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_problems(
    upstreams: list[Up], discovery: dict[str, Any] | None, cert: float | None, expected: list[str]
) -> None:
    assert find_problems(upstreams, discovery, now_unix=NOW, client_cert_expiry_unix=cert) == (
        expected
    )


def test_a_problem_reads_the_same_while_it_lasts() -> None:
    """Later clocks give the same sentences: the list changes (and kap logs) only on events."""
    before = find_problems([DOWN], FAILING, now_unix=NOW, client_cert_expiry_unix=NOW + 3.5 * DAY)
    after = find_problems(
        [DOWN], FAILING, now_unix=NOW + 3000, client_cert_expiry_unix=NOW + 3.5 * DAY
    )
    assert before == after


def test_the_certificate_threshold_is_an_argument() -> None:
    expiry = NOW + 20 * DAY
    assert find_problems([Up()], None, now_unix=NOW, client_cert_expiry_unix=expiry) == []
    assert find_problems(
        [Up()], None, now_unix=NOW, client_cert_expiry_unix=expiry, cert_warn_days=30
    ) == ["client certificate expires in 20 days (2027-02-04T08:00:00Z)"]


def test_401s_are_no_problem_of_their_own_when_kap_presents_no_credentials_on_purpose() -> None:
    """Without a CA kap presents nothing: the 401s are expected; discovery being off says why."""
    off = {"mode": "off", "last_error": "no CA file"}
    assert find_problems([REFUSED, Up()], off, now_unix=NOW, unauthenticated=True) == [
        "discovery is off: no CA file"
    ]
    assert find_problems([REFUSED, Up()], off, now_unix=NOW, unauthenticated=False) == [
        "credentials refused by 1 of 2 upstreams",
        "discovery is off: no CA file",
    ]
