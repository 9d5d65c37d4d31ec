"""Go-style durations: tables of good and bad text, and a round trip (no I/O)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kap.durations import DurationError, format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0.0),
        ("100ms", 0.1),
        ("5s", 5.0),
        ("1m30s", 90.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        ("250us", 250e-6),
        ("250µs", 250e-6),
        ("10ns", 10e-9),
        ("2h45m", 9900.0),
        ("+3s", 3.0),
        (".5s", 0.5),
    ],
)
def test_go_durations_parse(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "s", "5x", "-1s", "1s 2s", "1.2.3s", "ms", "1m30"])
def test_bad_durations_are_rejected(text: str) -> None:
    with pytest.raises(DurationError):
        parse_duration(text)


@given(st.floats(1e-6, 1e6))
def test_format_duration_round_trips(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, rel=1e-5)
