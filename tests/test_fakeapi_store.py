"""The fake's object store and selectors (store.py, selection.py, objects.py), without I/O.

No socket and no event loop: what the list/watch handlers rely on, checked
as tables.
"""

from __future__ import annotations

from typing import Any

import pytest
from fakeapi import SliceStore, endpoint_slice, parse_label_selector
from fakeapi.selection import Selection, SelectorError
from fakeapi.store import WATCH_BUFFER

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


@pytest.mark.parametrize(
    ("namespace", "query", "obj", "seen"),
    [
        (None, {}, endpoint_slice("a", [], namespace="other"), True),
        ("default", {}, endpoint_slice("a", [], namespace="other"), False),
        (None, {"fieldSelector": "metadata.name=a"}, endpoint_slice("a", []), True),
        (None, {"fieldSelector": "metadata.name==b"}, endpoint_slice("a", []), False),
        (None, {"labelSelector": "kubernetes.io/service-name=web"}, endpoint_slice("a", []), False),
        # Too broken to carry labels: planted garbage is always listed.
        ("default", {"labelSelector": "nope=1"}, {"metadata": "broken"}, True),
        ("default", {"labelSelector": "nope=1"}, None, True),
    ],
)
def test_selection_filters_by_namespace_name_and_labels(
    namespace: str | None, query: dict[str, str], obj: Any, seen: bool
) -> None:
    assert Selection.from_query(namespace, query).sees(obj) is seen


@pytest.mark.parametrize(
    "query",
    [{"fieldSelector": "spec.nodeName=n1"}, {"labelSelector": "a in b"}, {"labelSelector": "=x"}],
)
def test_selection_refuses_what_kube_apiserver_refuses(query: dict[str, str]) -> None:
    with pytest.raises(SelectorError):
        Selection.from_query("default", query)


# ------------------------------------------------------ watch fan-out


def test_a_watch_without_a_version_starts_with_every_object_as_added() -> None:
    store = SliceStore()
    store.put(endpoint_slice("a", [("10.0.0.1", True)]))
    store.put(endpoint_slice("b", [("10.0.0.2", True)]))
    sub = store.subscribe(None)
    assert sub is not None
    assert [(e.type, e.obj["metadata"]["name"]) for e in sub.backlog] == [
        ("ADDED", "a"),
        ("ADDED", "b"),
    ]
    assert [e.rv for e in sub.backlog] == [101, 102]


def test_a_watch_from_a_version_replays_the_later_changes_then_follows() -> None:
    store = SliceStore()
    store.put(endpoint_slice("a", [("10.0.0.1", True)]))
    since = store.resource_version
    store.put(endpoint_slice("a", [("10.0.0.9", True)]))
    store.delete("a")
    sub = store.subscribe(since)
    assert sub is not None
    replayed = [(e.rv, e.type) for e in sub.backlog]
    assert replayed == [(since + 1, "MODIFIED"), (since + 2, "DELETED")]
    store.put(endpoint_slice("b", [("10.0.0.2", True)]))
    live = sub.receive.receive_nowait()
    assert (live.rv, live.type, live.prev) == (since + 3, "ADDED", None)
    store.unsubscribe(sub)
    assert store.open_watches == 0


def test_a_watch_from_a_compacted_version_is_refused() -> None:
    store = SliceStore()
    store.put(endpoint_slice("a", [("10.0.0.1", True)]))
    old = store.resource_version
    store.put(endpoint_slice("a", [("10.0.0.2", True)]))
    store.compact()
    assert store.subscribe(old) is None
    sub = store.subscribe(store.resource_version)
    assert sub is not None and sub.backlog == []


def test_a_watch_that_cannot_keep_up_is_dropped_and_the_others_are_not() -> None:
    store = SliceStore()
    slow, fast = store.subscribe(None), store.subscribe(None)
    assert slow is not None and fast is not None
    for i in range(WATCH_BUFFER):
        store.put(endpoint_slice(f"s{i}", []))
        fast.receive.receive_nowait()
    assert store.open_watches == 2  # the slow one's buffer is full, not overflowing
    store.put(endpoint_slice("one-more", []))
    assert store.open_watches == 1
    assert fast.receive.receive_nowait().obj["metadata"]["name"] == "one-more"


def test_a_410_event_reaches_every_watch_but_not_the_history() -> None:
    store = SliceStore()
    since = store.resource_version
    subs = [store.subscribe(since), store.subscribe(since)]
    store.watch_410_event()
    assert [s.receive.receive_nowait().type for s in subs if s is not None] == ["ERROR", "ERROR"]
    later = store.subscribe(since)
    assert later is not None and later.backlog == []
    store.end_watches()
    assert store.open_watches == 0
