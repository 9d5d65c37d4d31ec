"""How a relayed session's end reads (kap/relay/outcome.py): pure, a table."""

from __future__ import annotations

import errno

import pytest

from kap.relay.outcome import Side, describe


@pytest.mark.parametrize(
    ("side", "err", "text"),
    [
        (Side.UPSTREAM, errno.ECONNRESET, "upstream reset"),
        (Side.UPSTREAM, errno.EPIPE, "upstream reset"),  # an RST after the peer's FIN
        (Side.CLIENT, errno.ECONNABORTED, "client reset"),
        (Side.CLIENT, errno.ETIMEDOUT, "client timed out"),  # keepalive / TCP_USER_TIMEOUT
        (Side.UPSTREAM, errno.EHOSTUNREACH, "upstream unreachable"),
        (Side.UPSTREAM, errno.ENOBUFS, "upstream no buffer space available"),  # strerror
        (Side.CLIENT, None, "client error"),
    ],
)
def test_socket_errors_read_as_side_and_reason(side: Side, err: int | None, text: str) -> None:
    assert describe(side, err) == text
