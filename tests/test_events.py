"""The change feed: typed kinds, subscriptions that end with their block, order kept."""

from __future__ import annotations

import pytest

from kap.address import Address
from kap.events import MEMBERSHIP, Change, ChangeFeed, ChangeKind

A, B = Address("10.0.0.1", 6443), Address("10.0.0.2", 6443)


def test_each_subscriber_gets_only_the_kinds_it_asked_for_in_publishing_order() -> None:
    feed = ChangeFeed()
    everything: list[Change] = []
    membership: list[Change] = []
    changes = [
        Change(A, ChangeKind.ADDED, "from flag"),
        Change(A, ChangeKind.HEALTHY, "score 2"),
        Change(B, ChangeKind.ADDED, "from flag"),
        Change(A, ChangeKind.REMOVED, "removal grace over"),
    ]
    with feed.subscribe(everything.append), feed.subscribe(membership.append, *MEMBERSHIP):
        feed.publish(changes)
    assert everything == changes
    assert [(c.address, c.kind) for c in membership] == [
        (A, ChangeKind.ADDED),
        (B, ChangeKind.ADDED),
        (A, ChangeKind.REMOVED),
    ]


def test_a_subscription_ends_with_its_block_even_on_error() -> None:
    feed = ChangeFeed()
    seen: list[Change] = []
    with pytest.raises(RuntimeError), feed.subscribe(seen.append):
        raise RuntimeError
    feed.publish([Change(A, ChangeKind.SUSPECT, "dial failed")])
    assert seen == []


def test_subscribers_are_called_in_the_order_they_subscribed() -> None:
    feed = ChangeFeed()
    calls: list[str] = []
    with (
        feed.subscribe(lambda c: calls.append("log")),
        feed.subscribe(lambda c: calls.append("act"), ChangeKind.SUSPECT),
    ):
        feed.publish([Change(A, ChangeKind.SUSPECT, "x"), Change(B, ChangeKind.TIER, "y")])
    assert calls == ["log", "act", "log"]


def test_every_kind_has_the_word_the_logs_use() -> None:
    assert {k.value for k in ChangeKind} >= {"added", "removed", "healthy", "never-healthy"}
    assert len({k.value for k in ChangeKind}) == len(ChangeKind)
