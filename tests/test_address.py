"""Addresses: host:port forms, what is refused and why, lists, and which is kap itself (no I/O)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kap.address import Address, AddressError, loops_back, parse_list


@pytest.mark.parametrize(
    ("text", "host", "port", "rendered"),
    [
        ("10.0.0.1:6443", "10.0.0.1", 6443, "10.0.0.1:6443"),
        (" 10.0.0.1:6443 ", "10.0.0.1", 6443, "10.0.0.1:6443"),
        ("[fd00::1]:6443", "fd00::1", 6443, "[fd00::1]:6443"),
        ("[FD00:0::1]:443", "fd00::1", 443, "[fd00::1]:443"),
        ("api.example.com:443", "api.example.com", 443, "api.example.com:443"),
        ("API.Example.COM.:443", "api.example.com", 443, "api.example.com:443"),
        ("localhost:1", "localhost", 1, "localhost:1"),
    ],
)
def test_addresses_parse_and_render(text: str, host: str, port: int, rendered: str) -> None:
    a = Address.parse(text)
    assert (a.host, a.port, str(a)) == (host, port, rendered)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "10.0.0.1",
        "10.0.0.1:",
        ":6443",
        "10.0.0.1:0",
        "10.0.0.1:65536",
        "10.0.0.1:http",
        "fd00::1:6443",
        "[fd00::1]",
        "[10.0.0.1]:6443",
        "[nothex]:1",
        "bad_host:1",
        "-bad.host:1",
        "300.1.1.1:6443",
    ],
)
def test_bad_addresses_are_rejected_with_a_reason(text: str) -> None:
    with pytest.raises(AddressError) as err:
        Address.parse(text)
    assert str(err.value)
    assert "\n" not in str(err.value)


@given(st.ip_addresses(), st.integers(1, 65535))
def test_ip_addresses_round_trip(ip: object, port: int) -> None:
    a = Address.from_ip(str(ip), port)
    assert Address.parse(str(a)) == a


def test_address_lists_skip_blanks_and_duplicates() -> None:
    assert parse_list(" 10.0.0.1:1, ,10.0.0.2:2,10.0.0.1:1,") == [
        Address("10.0.0.1", 1),
        Address("10.0.0.2", 2),
    ]


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
