"""kap.address.loops_back: which upstream is kap itself (a table; no sockets)."""

from __future__ import annotations

import pytest

from kap.address import Address, loops_back

LOCAL = {"127.0.0.1", "127.0.0.2", "10.0.0.5", "::1", "fd00::5"}


@pytest.mark.parametrize(
    ("upstream", "listen", "loops"),
    [
        ("127.0.0.1:6445", ("127.0.0.1", 6445), True),
        ("127.0.0.1:6443", ("127.0.0.1", 6445), False),  # the apiserver on the same node
        ("10.0.0.5:6445", ("127.0.0.1", 6445), False),  # another address than kap's
        ("10.0.0.5:6445", ("0.0.0.0", 6445), True),  # a wildcard accepts on every local one
        ("127.0.0.2:6445", ("0.0.0.0", 6445), True),
        ("10.0.0.9:6445", ("0.0.0.0", 6445), False),  # not this host's
        ("[::1]:6445", ("0.0.0.0", 6445), False),  # 0.0.0.0 is IPv4 only
        ("[::1]:6445", ("::", 6445), True),
        ("127.0.0.1:6445", ("::", 6445), True),  # '::' is dual-stack
        ("[::ffff:127.0.0.1]:6445", ("127.0.0.1", 6445), True),
        ("[fd00::5]:6445", ("fd00::5", 6445), True),
        ("localhost:6445", ("127.0.0.1", 6445), False),  # names are not resolved
        ("127.0.0.1:6445", ("127.0.0.1", 0), False),  # kernel-chosen: cannot be named
    ],
)
def test_loops_back(upstream: str, listen: tuple[str, int], loops: bool) -> None:
    assert loops_back(Address.parse(upstream), *listen, LOCAL.__contains__) is loops
