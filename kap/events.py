"""Typed changes about upstreams, and the feed that fans them out to whoever subscribed.

The pool decides and returns what changed (``Change``, of a ``ChangeKind``);
the task that asked the pool (a probe, a client's dial, the membership task)
publishes those changes on the one ``ChangeFeed`` (the membership task adds
``DISCOVERED`` for each member of a new discovered set); each consumer subscribes
to the kinds it acts on:

* the probe scheduler: ``SUSPECT`` and ``DISCOVERED`` (a ``/readyz`` of that
  upstream now), ``ADDED`` and ``REMOVED`` (start and stop probe tasks);
* discovery: ``HEALTHY``, ``UNHEALTHY``, ``REMOVED`` (leave the default
  Service for a usable upstream, and an upstream that is no longer usable);
* the app: every kind, to log it; ``REMOVED``, to drain the connections.

Delivery is synchronous, in publishing order, to the subscribers in the
order they subscribed: publishers (a client's failed dial, a probe result)
never wait and nothing is buffered, and a subscriber that has to wait for
something sets an event or cancels a scope instead. Pure Python: the pool
imports this module and no I/O.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Iterable, Iterator

import attrs

from kap.address import Address


class ChangeKind(enum.Enum):
    """What happened to an upstream; the value is the word the logs use."""

    ADDED = "added"  # a source named it; not probed yet
    REMOVING = "removing"  # its last source dropped it; removed after the grace
    KEPT = "kept"  # a removal cancelled, or an empty update ignored
    REMOVED = "removed"  # the grace passed: out of the pool, its clients drained
    HEALTHY = "healthy"  # usable again (or for the first time)
    UNHEALTHY = "unhealthy"  # was usable, is not
    NEVER_HEALTHY = "never-healthy"  # added a while ago and never passed a probe
    TIER = "tier"  # its latency tier moved
    AUTH = "auth"  # it answers but refuses kap's credentials
    SUSPECT = "suspect"  # a client's dial or connection just failed
    DISCOVERED = "discovered"  # in discovery's set, which just changed: check it now


MEMBERSHIP = frozenset({ChangeKind.ADDED, ChangeKind.REMOVED})


@attrs.frozen
class Change:
    """Something about an upstream that a consumer acts on or an operator wants in the log."""

    address: Address
    kind: ChangeKind
    reason: str


Handler = Callable[[Change], None]


@attrs.define(eq=False)
class _Subscription:
    kinds: frozenset[ChangeKind]
    handler: Handler


@attrs.define
class ChangeFeed:
    """One publisher side, many subscribers; see the module docstring."""

    _subscriptions: list[_Subscription] = attrs.field(factory=list, alias="_subscriptions")

    @contextlib.contextmanager
    def subscribe(self, handler: Handler, *kinds: ChangeKind) -> Iterator[None]:
        """Call ``handler`` with every published change of ``kinds`` (all kinds if none given).

        The subscription lasts as long as the ``with`` block: a consumer
        subscribes in its ``run`` and is gone when that ends.
        """
        sub = _Subscription(frozenset(kinds or ChangeKind), handler)
        self._subscriptions.append(sub)
        try:
            yield
        finally:
            self._subscriptions.remove(sub)

    def publish(self, changes: Iterable[Change]) -> None:
        for change in changes:
            for sub in list(self._subscriptions):
                if change.kind in sub.kinds:
                    sub.handler(change)
