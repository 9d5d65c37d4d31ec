"""Addresses: host:port forms, what is refused and why, lists (no I/O)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kap.address import Address, AddressError, parse_list


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
