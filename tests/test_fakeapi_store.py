"""The fake's object store and selectors (store.py, selection.py, objects.py), without I/O.

No socket and no event loop: what the list/watch handlers rely on, checked
as tables.
"""

from __future__ import annotations

import pytest
from fakeapi import SliceStore, endpoint_slice, parse_label_selector

# ------------------------------------------------------------- SliceStore


def test_store_bumps_one_resource_version_per_change() -> None:
    store = SliceStore(resource_version=100)
    a = store.put(endpoint_slice("a", [("10.0.0.1", True)]))
    b = store.put(endpoint_slice("b", [("10.0.0.2", True)]))
    assert (a["metadata"]["resourceVersion"], b["metadata"]["resourceVersion"]) == ("101", "102")
    store.delete("a")
    assert store.resource_version == 103
    assert [s["metadata"]["name"] for s in store.items()] == ["b"]


def test_store_replace_all_leaves_unchanged_slices_alone() -> None:
    store = SliceStore()
    store.replace_all([endpoint_slice("a", [("10.0.0.1", True)])])
    before = store.resource_version
    store.replace_all([endpoint_slice("a", [("10.0.0.1", True)])])
    assert store.resource_version == before
    store.replace_all([endpoint_slice("b", [("10.0.0.2", True)])])
    assert [s["metadata"]["name"] for s in store.items()] == ["b"]
    assert store.resource_version == before + 2


def test_endpoint_slice_guesses_the_address_type() -> None:
    six = endpoint_slice("k", [("fd00::1", True)], ports=[(None, 443)])
    assert six["addressType"] == "IPv6"
    assert six["ports"] == [{"protocol": "TCP", "port": 443}]
    assert endpoint_slice("k", [("10.0.0.1", False)])["endpoints"][0]["conditions"] == {
        "ready": False
    }


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ("", {}, True),
        (
            "kubernetes.io/service-name=kubernetes",
            {"kubernetes.io/service-name": "kubernetes"},
            True,
        ),
        ("kubernetes.io/service-name==kubernetes", {"kubernetes.io/service-name": "other"}, False),
        ("a!=b", {}, True),
        ("a!=b", {"a": "b"}, False),
        ("a in (x, y),b", {"a": "y", "b": ""}, True),
        ("a in (x,y)", {"a": "z"}, False),
        ("a notin (x)", {}, True),
        ("!a", {"a": "1"}, False),
        ("a,!b", {"a": "1"}, True),
    ],
)
def test_label_selectors_match_like_kube_apiserver(
    selector: str, labels: dict[str, str], expected: bool
) -> None:
    assert parse_label_selector(selector)(labels) is expected
