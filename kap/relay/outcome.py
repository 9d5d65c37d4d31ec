"""What one call of ``Relay.relay`` came to, as types rather than strings.

Either the upstream never connected (:class:`DialFailed`, with a
:class:`DialFailure` reason), or the session ran in the pump and ended
(:class:`Relayed`, with its :class:`RelayResult`). The caller (kap/proxy.py)
decides with ``isinstance``, ``reason is DialFailure.TIMEOUT`` and
``errored_side is Side.UPSTREAM``; the ``error`` strings only describe, for
logs and ``/upstreams``, and nothing compares them.
"""

from __future__ import annotations

import enum
import errno
import os
from typing import Final, TypeAlias

import attrs


class Side(enum.Enum):
    """One of the two sockets of a session."""

    CLIENT = "client"
    UPSTREAM = "upstream"


class Ending(enum.Enum):
    """How a relayed session ended."""

    CLOSED = "closed"  # both ways ended with a FIN: the clean end
    FAILED = "failed"  # a socket error on ``RelayResult.errored_side``
    STOPPED = "stopped"  # Relay.run() ended first
    BROKEN = "broken"  # a bug, or a caller closing a socket mid-session


class DialFailure(enum.Enum):
    """Why a connecting upstream never connected."""

    TIMEOUT = "timeout"  # still connecting at its ``connect_by``
    ERROR = "error"  # the connect failed with an error code (refused, unreachable, ...)
    CLOSED = "closed"  # the socket hung up without an error code


# How errnos read in RelayResult.error ("upstream reset"). EPIPE is a reset too:
# the kernel reports it for an RST received after the peer's FIN.
_REASONS: Final = {
    errno.ECONNRESET: "reset",
    errno.EPIPE: "reset",
    errno.ECONNABORTED: "reset",
    errno.ETIMEDOUT: "timed out",
    errno.ENOTCONN: "not connected",
    errno.EHOSTUNREACH: "unreachable",
    errno.ENETUNREACH: "unreachable",
}


def describe(side: Side, err: int | None) -> str:
    """``"upstream reset"``, ``"client timed out"``: a socket error, for logs."""
    if err is None:
        return f"{side.value} error"
    reason = _REASONS.get(err)
    if reason is None:
        reason = os.strerror(err).lower()
    return f"{side.value} {reason}"


@attrs.frozen
class RelayResult:
    """How one relayed session ended.

    ``bytes_up``/``bytes_down`` count bytes handed to the other side's socket
    (client->upstream and upstream->client). ``errored_side`` is set only for
    ``Ending.FAILED``. ``error`` is None for a clean close both ways, else a
    short description such as ``"upstream reset"`` or ``"relay stopped"``.
    """

    bytes_up: int
    bytes_down: int
    ending: Ending = Ending.CLOSED
    errored_side: Side | None = None
    error: str | None = None


@attrs.frozen
class Relayed:
    """The session reached the pump and ended there.

    ``connected_at`` (trio's clock) is when the upstream connected, None if the
    relay stopped while it was still connecting.
    """

    result: RelayResult
    connected_at: float | None


@attrs.frozen
class DialFailed:
    """The upstream never connected; the client socket is untouched.

    ``error`` describes it: the connect's own reason (``"Connection refused"``),
    ``"connection closed"`` or ``"connect timed out"``.
    """

    reason: DialFailure
    error: str


Outcome: TypeAlias = Relayed | DialFailed


@attrs.frozen
class Unanswered:
    """A session's upstream sent nothing within the budget after the client's first bytes.

    Reported while the session goes on (``Relay.unanswered()``), once per
    session. ``tag`` is what the caller passed to ``Relay.relay(..., tag=)``;
    ``waited`` is how long the upstream had, in seconds (the budget, or a
    little more on a busy loop).
    """

    tag: object
    waited: float


class RelayNotRunningError(RuntimeError):
    """``Relay.relay()`` was called while ``Relay.run()`` is not running."""
