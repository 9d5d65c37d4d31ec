"""Go-syntax durations (``100ms``, ``5s``, ``1m30s``), as the seed's flags use.

Pure logic. Go's ``time.ParseDuration`` accepts a sequence of decimal numbers
with units ``ns``, ``us`` (or ``µs``), ``ms``, ``s``, ``m``, ``h``, and a bare
``0``; so does this, so an operator can copy values between kap and Go peers.
"""

from __future__ import annotations

import re

_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,  # U+00B5 micro sign
    "μs": 1e-6,  # U+03BC greek mu, also accepted by Go
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


class DurationError(ValueError):
    pass


def parse_duration(text: str) -> float:
    """Seconds from a Go duration string; raise DurationError with the reason."""
    raw = text.strip()
    if raw in ("0", "+0"):
        return 0.0
    if not raw:
        raise DurationError("empty duration")
    body = raw[1:] if raw[0] in "+-" else raw
    if raw.startswith("-"):
        raise DurationError(f"{text!r}: negative durations are not allowed")
    pos, total = 0, 0.0
    while pos < len(body):
        m = _PART.match(body, pos)
        if not m:
            raise DurationError(f"{text!r}: not a duration (examples: 100ms, 5s, 1m30s)")
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos == 0:
        raise DurationError(f"{text!r}: not a duration (examples: 100ms, 5s, 1m30s)")
    return total


def format_duration(seconds: float) -> str:
    """The shortest Go-style rendering of a duration, for logs and ``--help``."""
    if seconds == 0:
        return "0s"
    if seconds < 1e-3:
        return f"{seconds * 1e6:g}us"
    if seconds < 1:
        return f"{seconds * 1e3:g}ms"
    whole_minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(int(whole_minutes), 60)
    out = ""
    if hours:
        out += f"{hours}h"
    if minutes:
        out += f"{minutes}m"
    if secs or not out:
        out += f"{secs:g}s"
    return out
