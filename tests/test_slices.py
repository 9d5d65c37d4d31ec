"""EndpointSlice parsing: tables of slices and what kap makes of them; garbage never raises."""

from __future__ import annotations

from typing import Any

import pytest
from fakeapi import endpoint_slice, garbage_slices
from hypothesis import given, settings
from hypothesis import strategies as st

from kap import slices
from kap.address import Address
from kap.slices import ParsedSlice, choose_port, parse_items, parse_slice, union


def addrs(*texts: str) -> tuple[Address, ...]:
    return tuple(Address.parse(t) for t in texts)


PORTS = [
    # (ports field, chosen port or None, reason fragment)
    ([{"name": "https", "port": 6443}], 6443, None),
    ([{"name": "metrics", "port": 9000}, {"name": "https", "port": 443}], 443, None),
    ([{"name": "a", "port": 8443}, {"name": "b", "port": 9443}], 8443, None),
    ([{"port": 7443}], 7443, None),
    ([], 6443, None),
    (None, 6443, None),
    ([{"name": "https", "port": "https"}], None, "not a number"),
    ([{"name": "https", "port": 70000}], None, "not a number"),
    ([{"name": "https", "port": 0}], None, "not a number"),
    ([{"name": "https", "port": True}], None, "not a number"),
    ([{"name": "https"}], None, "not a number"),
    (6443, None, "not a list"),
    (["https"], None, "not an object"),
    ([{"port": 1}] * 101, None, "more than 100"),
]


@pytest.mark.parametrize(("ports", "port", "reason"), PORTS)
def test_port_is_https_then_first_then_6443(ports: Any, port: int | None, reason: str) -> None:
    chosen, why = choose_port(ports)
    assert chosen == port
    if reason is None:
        assert why is None
    else:
        assert why is not None and reason in why


def one(address_type: str, endpoints: Any, ports: Any = None) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "metadata": {"name": "kubernetes", "namespace": "default"},
        "addressType": address_type,
        "endpoints": endpoints,
    }
    if ports is not None:
        obj["ports"] = ports
    return obj


SLICES = [
    # (slice, addresses, not ready, reason fragments)
    (
        one("IPv4", [{"addresses": ["10.0.0.1"]}, {"addresses": ["10.0.0.2"]}]),
        ("10.0.0.1:6443", "10.0.0.2:6443"),
        0,
        [],
    ),
    (
        one("IPv4", [{"addresses": ["10.0.0.1"], "conditions": {"ready": False}}]),
        (),
        1,
        [],
    ),
    (
        one("IPv4", [{"addresses": ["10.0.0.1"], "conditions": {"ready": None}}]),
        ("10.0.0.1:6443",),
        0,
        [],
    ),
    (
        one("IPv4", [{"addresses": ["10.0.0.1"], "conditions": {}}]),
        ("10.0.0.1:6443",),
        0,
        [],
    ),
    (
        one("IPv6", [{"addresses": ["fd00::1"]}, {"addresses": ["FD00:0:0::2"]}]),
        ("[fd00::1]:6443", "[fd00::2]:6443"),
        0,
        [],
    ),
    (
        one("IPv6", [{"addresses": ["10.0.0.1"]}, {"addresses": ["fd00::1"]}]),
        ("[fd00::1]:6443",),
        0,
        ["not IPv6"],
    ),
    (
        one("IPv4", [{"addresses": ["fd00::1"]}, {"addresses": ["999.1.1.1"]}]),
        (),
        0,
        ["not IPv4", "not an IP address"],
    ),
    (
        one("IPv4", [{"addresses": ["10.0.0.1"]}, {"addresses": ["10.0.0.1"]}]),
        ("10.0.0.1:6443",),
        0,
        [],
    ),
    (
        one("IPv4", [{"addresses": ["10.0.0.1"]}], [{"name": "https", "port": 443}]),
        ("10.0.0.1:443",),
        0,
        [],
    ),
    (
        one("IPv4", [None, {"addresses": []}, {"addresses": [1]}, {"addresses": ["10.0.0.3"]}]),
        ("10.0.0.3:6443",),
        0,
        ["is not an object", "non-empty list", "not a string"],
    ),
    (
        one("IPv4", [{"addresses": ["10.0.0.1"], "conditions": "yes"}]),
        (),
        0,
        ["conditions is not an object"],
    ),
    (
        one("IPv4", [{"addresses": ["10.0.0.1"], "conditions": {"ready": "true"}}]),
        (),
        0,
        ["not a boolean"],
    ),
    (one("IPv4", None), (), 0, []),
]


@pytest.mark.parametrize(("obj", "expected", "not_ready", "reasons"), SLICES)
def test_slice_table(
    obj: Any, expected: tuple[str, ...], not_ready: int, reasons: list[str]
) -> None:
    parsed, why = parse_slice(obj)
    assert parsed is not None
    assert parsed.key == "default/kubernetes"
    assert parsed.addresses == addrs(*expected)
    assert parsed.not_ready == not_ready
    assert len(why) == len(reasons)
    for fragment, line in zip(reasons, why, strict=True):
        assert fragment in line and "default/kubernetes" in line


SKIPPED = [
    ("not a slice", "not an object"),
    ({"metadata": {}}, "no metadata.name"),
    ({"metadata": {"name": 3}}, "no metadata.name"),
    (one("FQDN", [{"addresses": ["api.example.com"]}]), "FQDN"),
    (one("IPX", []), "not IPv4 or IPv6"),
    ({"metadata": {"name": "x"}, "endpoints": []}, "not IPv4 or IPv6"),
    (one("IPv4", "10.0.0.1"), "endpoints is not a list"),
    (one("IPv4", [{"addresses": ["10.0.0.1"]}], 6443), "ports is not a list"),
    (one("IPv4", [{"addresses": ["10.0.0.1"]}] * 1001), "more than 1000"),
]


@pytest.mark.parametrize(("obj", "reason"), SKIPPED)
def test_malformed_slices_are_skipped_whole_with_a_reason(obj: Any, reason: str) -> None:
    parsed, why = parse_slice(obj)
    assert parsed is None
    assert len(why) == 1 and reason in why[0]


def test_too_many_addresses_on_one_endpoint_skip_that_endpoint() -> None:
    obj = one("IPv4", [{"addresses": ["10.0.0.1"] * 101}, {"addresses": ["10.0.0.2"]}])
    parsed, why = parse_slice(obj)
    assert parsed is not None and parsed.addresses == addrs("10.0.0.2:6443")
    assert len(why) == 1 and "more than 100" in why[0]


def test_union_over_slices_of_both_families() -> None:
    v4 = endpoint_slice("kubernetes", [("10.0.0.1", True), ("10.0.0.2", False)])
    v6 = endpoint_slice("kubernetes-v6", [("fd00::1", True)], ports=[("https", 443)])
    parsed, why = parse_items([v4, v6])
    assert why == []
    assert set(parsed) == {"default/kubernetes", "default/kubernetes-v6"}
    assert union(parsed.values()) == sorted(addrs("10.0.0.1:6443", "[fd00::1]:443"))
    assert [str(a) for a in union(parsed.values())] == ["10.0.0.1:6443", "[fd00::1]:443"]


def test_the_fake_apiservers_garbage_is_all_skipped_and_the_good_slice_kept() -> None:
    good = endpoint_slice("kubernetes", [("10.0.0.1", True)])
    parsed, why = parse_items([*garbage_slices(), good])
    assert union(parsed.values()) == list(addrs("10.0.0.1:6443"))
    # no-fields, wrong-types, bad-endpoint (port), bad-address (port), huge, str, None
    assert len(why) == 7, why
    assert list(parsed) == ["default/kubernetes"]


def test_a_garbled_slice_keeps_its_previous_version() -> None:
    before = {"default/kubernetes": ParsedSlice("default/kubernetes", addrs("10.0.0.1:6443"))}
    garbled = one("IPv4", "nonsense")
    parsed, why = parse_items([garbled], previous=before)
    assert parsed == before and len(why) == 1
    # Without a previous version it is simply gone (and the pool ignores an empty set).
    assert parse_items([garbled])[0] == {}


def test_items_that_are_not_a_list_and_lists_past_the_cap() -> None:
    assert parse_items(None) == ({}, ["items is not a list: None"])
    many = [endpoint_slice(f"s{i}", [("10.0.0.1", True)]) for i in range(slices.MAX_SLICES + 5)]
    parsed, why = parse_items(many)
    assert len(parsed) == slices.MAX_SLICES
    assert why == [f"5 items past the first {slices.MAX_SLICES} ignored"]


def test_long_values_are_cut_in_reasons() -> None:
    _, why = parse_slice(one("IPv4", [{"addresses": ["x" * 10_000]}]))
    assert len(why) == 1 and len(why[0]) < 200


def test_resource_version_and_key_helpers() -> None:
    assert slices.resource_version({"metadata": {"resourceVersion": "12"}}) == "12"
    for bad in (None, {}, {"metadata": None}, {"metadata": {"resourceVersion": 12}}):
        assert slices.resource_version(bad) is None
    assert slices.slice_key({"metadata": {"name": "a"}}) == "default/a"
    assert slices.slice_key({"metadata": {"name": "a", "namespace": "x"}}) == "x/a"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=12,
)
# Slice-shaped garbage: the right keys with random values reach deeper code paths.
slice_shaped = st.fixed_dictionaries(
    {
        "metadata": st.one_of(json_values, st.fixed_dictionaries({"name": json_values})),
        "addressType": st.one_of(st.sampled_from(["IPv4", "IPv6", "FQDN"]), json_values),
        "endpoints": st.one_of(
            json_values,
            st.lists(
                st.one_of(
                    json_values,
                    st.fixed_dictionaries(
                        {
                            "addresses": st.one_of(
                                json_values,
                                st.lists(st.one_of(st.ip_addresses().map(str), json_values)),
                            ),
                            "conditions": st.one_of(
                                json_values, st.fixed_dictionaries({"ready": json_values})
                            ),
                        }
                    ),
                ),
                max_size=5,
            ),
        ),
        "ports": st.one_of(
            json_values,
            st.lists(st.fixed_dictionaries({"name": json_values, "port": json_values}), max_size=3),
        ),
    }
)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(json_values, slice_shaped), max_size=6))
def test_random_garbage_never_raises(items: list[Any]) -> None:
    parsed, why = parse_items(items)
    assert all(isinstance(line, str) for line in why)
    for s in parsed.values():
        for a in s.addresses:
            assert 1 <= a.port <= 65535 and a.is_ip
    union(parsed.values())


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.ip_addresses(v=4).map(str), st.booleans()), max_size=10),
    st.integers(1, 65535),
)
def test_ready_ipv4_endpoints_are_exactly_the_set(
    endpoints: list[tuple[str, bool]], port: int
) -> None:
    obj = endpoint_slice("kubernetes", endpoints, ports=[("https", port)], address_type="IPv4")
    parsed, why = parse_slice(obj)
    assert parsed is not None and why == []
    assert set(parsed.addresses) == {Address(ip, port) for ip, ready in endpoints if ready}


# ---- SliceSet: lists and events in, the ready set out only when it changes ----


def _ks(name: str, *ready: str, not_ready: tuple[str, ...] = ()) -> dict[str, Any]:
    eps = [(h, True) for h in ready] + [(h, False) for h in not_ready]
    return endpoint_slice(name, eps, ports=[("https", 6443)])


def _set(*hosts: str) -> list[Address]:
    return sorted(Address.parse(f"{h}:6443") for h in hosts)


BAD = {"metadata": {"name": "bad"}, "addressType": "FQDN"}
SLICE_STEPS = [
    # (step: ("list", items) or (event type, object), ready set handed out or None, new reasons)
    (("list", [_ks("a", "10.0.0.1")]), _set("10.0.0.1"), 0),
    (("list", [_ks("a", "10.0.0.1")]), None, 0),  # same again: nothing to hand out
    (("ADDED", _ks("b", "10.0.0.2")), _set("10.0.0.1", "10.0.0.2"), 0),
    (("MODIFIED", _ks("b", "10.0.0.2")), None, 0),
    (("BOOKMARK", {"metadata": {"resourceVersion": "9"}}), None, 0),
    (("WHATEVER", _ks("c", "10.0.0.3")), None, 0),
    (("MODIFIED", _ks("b", "10.0.0.3", not_ready=("10.0.0.2",))), _set("10.0.0.1", "10.0.0.3"), 0),
    (("ADDED", BAD), None, 1),
    (("ADDED", BAD), None, 0),  # the same reason again: not new
    (("DELETED", _ks("a")), _set("10.0.0.3"), 0),
    (("DELETED", {"metadata": {}}), None, 0),  # no name: nothing to delete
    (("list", [_ks("b", "10.0.0.3"), BAD]), None, 0),  # still skipped: not new
    (("list", [_ks("b", "10.0.0.3")]), None, 0),
    (("list", [_ks("b", "10.0.0.3"), BAD]), None, 1),  # came back after a clean list
    (("list", []), [], 0),  # empty is handed out too (the pool ignores it)
    (("list", "garbage"), None, 1),
]


def test_a_slice_set_hands_out_the_ready_set_only_when_it_changes() -> None:
    ss = slices.SliceSet()
    for i, ((kind, obj), ready, reasons) in enumerate(SLICE_STEPS):
        applied = ss.replace(obj) if kind == "list" else ss.apply(kind, obj)
        assert applied.ready == ready, i
        assert len(applied.new_reasons) == reasons, i


def test_a_slice_garbled_in_a_list_keeps_its_last_good_version() -> None:
    ss = slices.SliceSet()
    ss.replace([_ks("a", "10.0.0.1")])
    garbled = {**_ks("a", "10.0.0.1"), "addressType": "IPv9"}
    applied = ss.replace([garbled])
    assert applied.ready is None and len(applied.new_reasons) == 1
    assert ss.ready == _set("10.0.0.1")


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR"]),
            st.sampled_from("abc"),
            st.lists(st.sampled_from(["10.0.0.1", "10.0.0.2", "10.0.0.3"]), max_size=3),
        ),
        max_size=30,
    )
)
def test_a_slice_set_equals_the_union_of_what_the_events_left(
    events: list[tuple[str, str, list[str]]],
) -> None:
    ss = slices.SliceSet()
    model: dict[str, list[str]] = {}
    handed: list[Address] | None = None
    for kind, name, hosts in events:
        applied = ss.apply(kind, _ks(name, *hosts))
        if kind in ("ADDED", "MODIFIED"):
            model[name] = hosts
        elif kind == "DELETED":
            model.pop(name, None)
        want = _set(*{h for hs in model.values() for h in hs})
        if applied.ready is not None:  # handed out only when it changed
            assert applied.ready != handed
            handed = applied.ready
        if handed is not None:  # and what was handed out last is the union now
            assert handed == want


def test_the_set_is_capped_keeping_the_apiservers_slice_then_what_was_handed_out() -> None:
    """Slices of 1,000 endpoints each pass every per-slice limit: the set must still be bounded."""
    cap = slices.MAX_UPSTREAMS
    ss = slices.SliceSet()
    own = _ks("kubernetes", "192.168.0.1", "192.168.0.2")
    first = ss.replace([own, _ks("x", "192.168.0.3")])
    assert first.ready == _set("192.168.0.1", "192.168.0.2", "192.168.0.3")
    # Garbage that sorts before them (up to 1,000 slices of 1,000 would pass).
    flood = [
        _ks(f"flood-{i}", *(f"10.{i}.{j // 250}.{j % 250}" for j in range(1000))) for i in range(3)
    ]
    applied = ss.replace([*flood, own, _ks("x", "192.168.0.3")])
    assert applied.ready is not None and len(applied.ready) == cap
    assert set(_set("192.168.0.1", "192.168.0.2", "192.168.0.3")) <= set(applied.ready)
    assert applied.new_reasons == [
        f"{len(flood) * 1000 + 3} addresses, more than a control plane has: {cap} used"
    ]
    again = ss.replace([*flood, own, _ks("x", "192.168.0.3")])
    assert again.ready is None and again.new_reasons == []  # said once while it lasts
    # The flood gone, then back: said again.
    assert ss.replace([own]).ready == _set("192.168.0.1", "192.168.0.2")
    assert len(ss.replace([*flood, own]).new_reasons) == 1
