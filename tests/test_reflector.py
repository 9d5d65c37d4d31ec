"""Discovery as a client-go reflector: every request it sends, event by event.

Each test runs an ``EndpointSliceWatcher`` against one in-process fake
apiserver (real TLS on loopback) with the stall limit and the watch timeout
shortened through the constructor, and reads the requests the fake saw:
LISTs by how they are served (watch cache or consistent read), WATCH starts
and their query parameters.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import trio
import trio.testing
from fakeapi import FakeApiServer, PkiFiles, SliceStore, endpoint_slice
from kaptest import StartFake, wait_until

from kap.address import Address
from kap.config import Credentials
from kap.credentials import CredentialFiles
from kap.discovery import EndpointSliceWatcher
from kap.pool import Pool

HOST = "127.0.0.2"
SLICES_PATH = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"
BOOKMARKS = 0.1  # the fake's bookmark interval: a live watch is never silent for long
STALL = 0.5  # kap's stall limit in these tests: five bookmark intervals


def bounded(seconds: float) -> Callable[[Callable[..., Awaitable[None]]], Any]:
    def wrap(fn: Callable[..., Awaitable[None]]) -> Any:
        @functools.wraps(fn)
        async def run(*args: Any, **kwargs: Any) -> None:
            with trio.fail_after(seconds):
                await fn(*args, **kwargs)

        return run

    return wrap


def kube_slice(port: int, *ready: str) -> dict[str, Any]:
    return endpoint_slice("kubernetes", [(h, True) for h in ready], ports=[("https", port)])


def query(target: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(target).query).items()}


def lists(fake: FakeApiServer) -> list[dict[str, str]]:
    return [
        query(r.target)
        for r in fake.requests
        if r.target.startswith(SLICES_PATH) and "watch=true" not in r.target
    ]


def watches(fake: FakeApiServer) -> list[dict[str, str]]:
    return [
        query(r.target)
        for r in fake.requests
        if r.target.startswith(SLICES_PATH) and "watch=true" in r.target
    ]


async def start(
    nursery: trio.Nursery,
    start_fake: StartFake,
    pki: PkiFiles,
    port: int,
    store: SliceStore,
    *,
    period: float = 30.0,
    **kwargs: Any,
) -> tuple[FakeApiServer, EndpointSliceWatcher]:
    """One fake serving one slice, and a watcher asking it; returns once it discovered."""
    store.bookmark_interval = BOOKMARKS
    store.put(kube_slice(port, HOST))
    fake = await start_fake(HOST, host=HOST, port=port, require_token=pki.token)
    pool = Pool()
    address = Address(HOST, port)
    pool.set_source("flag", [address], now=0.0)
    pool.record_probe(address, ok=True, now=0.0, latency=0.001)
    creds = CredentialFiles(Credentials(ca_file=str(pki.ca_file), token_file=str(pki.token_file)))
    kwargs.setdefault("stall_limit", STALL)
    w = EndpointSliceWatcher(
        pool, creds, "", period, lambda a: None, rng=random.Random(5), **kwargs
    )
    await nursery.start(w.run)
    await wait_until(lambda: w.status()["addresses"] == [str(address)])
    return fake, w


def seen(w: EndpointSliceWatcher, store: SliceStore) -> bool:
    """The watcher has seen the store's latest version."""
    return w.status()["resource_version"] == str(store.resource_version)


@bounded(15)
async def test_one_watch_while_it_is_live_and_nothing_is_relisted(
    nursery: trio.Nursery,
    start_fake: StartFake,
    pki: PkiFiles,
    free_port: int,
    slice_store: SliceStore,
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A short --discover-period: today's poll would list and watch anew every 0.2 s.
    fake, w = await start(nursery, start_fake, pki, free_port, slice_store, period=0.2)
    for hosts in (("127.0.0.3",), ("127.0.0.3", "127.0.0.4"), ()):
        slice_store.put(kube_slice(free_port, HOST, *hosts))
        await wait_until(lambda hosts=hosts: len(w.status()["addresses"]) == 1 + len(hosts))  # type: ignore[misc]
    # Nothing marks what must not happen (a re-list, a new watch): let time pass, on
    # trio's virtual clock.
    await trio.sleep(2.0)  # ten periods, twenty bookmarks: the watch stays
    assert len(watches(fake)) == 1 and slice_store.watches_opened == 1
    assert lists(fake) == [
        {"labelSelector": "kubernetes.io/service-name=kubernetes", "resourceVersion": "0"}
    ]
    assert (slice_store.lists_from_cache, slice_store.lists_consistent) == (1, 0)
    (watch,) = watches(fake)
    assert watch["allowWatchBookmarks"] == "true"
    assert 300 <= int(watch["timeoutSeconds"]) <= 600  # client-go's 5-10 min
    assert w.errors_total == 0 and w.mode == "watch"


@bounded(15)
async def test_a_watch_that_ends_is_reopened_from_the_last_version_without_a_list(
    nursery: trio.Nursery,
    start_fake: StartFake,
    pki: PkiFiles,
    free_port: int,
    slice_store: SliceStore,
) -> None:
    fake, w = await start(nursery, start_fake, pki, free_port, slice_store, period=0.2)
    slice_store.watch_timeout = 0.3  # the server ends each watch after 0.3 s (three bookmarks)
    slice_store.end_watches()
    await wait_until(lambda: len(watches(fake)) >= 5)
    slice_store.put(kube_slice(free_port, HOST, "127.0.0.3"))
    await wait_until(lambda: len(w.status()["addresses"]) == 2)
    assert len(lists(fake)) == 1
    # Each watch starts from the last version seen (bookmarks carry it), with bookmarks.
    assert {q["allowWatchBookmarks"] for q in watches(fake)} == {"true"}
    assert all(q["resourceVersion"] != "0" for q in watches(fake))
    assert w.errors_total == 0


@bounded(15)
async def test_a_stalled_watch_is_closed_after_the_stall_limit_and_relisted_from_the_cache(
    nursery: trio.Nursery,
    start_fake: StartFake,
    pki: PkiFiles,
    free_port: int,
    slice_store: SliceStore,
) -> None:
    # A long period: only the stall can make kap list again within the test.
    fake, w = await start(nursery, start_fake, pki, free_port, slice_store, period=30.0)
    listed_rv = w.status()["resource_version"]
    slice_store.stall_watches = True  # the watch sends nothing from now on, not even bookmarks
    slice_store.put(kube_slice(free_port, HOST, "127.0.0.3"))
    await wait_until(lambda: len(w.status()["addresses"]) == 2, timeout=5)
    slice_store.stall_watches = False
    await wait_until(lambda: len(watches(fake)) == 2 and w.mode == "watch")
    relist = lists(fake)[1]
    assert relist["resourceVersion"] == listed_rv or int(relist["resourceVersion"]) >= int(
        listed_rv
    )
    assert relist["resourceVersionMatch"] == "NotOlderThan"
    assert slice_store.lists_consistent == 0
    assert w.errors_total == 0


@bounded(15)
async def test_every_list_carries_a_resource_version_except_right_after_a_410(
    nursery: trio.Nursery,
    start_fake: StartFake,
    pki: PkiFiles,
    free_port: int,
    slice_store: SliceStore,
) -> None:
    fake, w = await start(nursery, start_fake, pki, free_port, slice_store)
    # A watch that fails (the apiserver drops its connections): a new session re-lists.
    fake.drop_connections()
    await wait_until(lambda: len(lists(fake)) == 2 and w.mode == "watch")
    # 410: the version is compacted; the next list is a consistent read.
    slice_store.compact()
    slice_store.watch_410_event()
    await wait_until(lambda: len(lists(fake)) == 3 and w.mode == "watch")
    # A stall afterwards: from the cache again.
    slice_store.stall_watches = True
    slice_store.put(kube_slice(free_port, HOST, "127.0.0.3"))
    await wait_until(lambda: len(lists(fake)) == 4)
    slice_store.stall_watches = False
    got = [(q.get("resourceVersion"), q.get("resourceVersionMatch")) for q in lists(fake)]
    assert got[0] == ("0", None)
    assert got[1][0] not in (None, "0") and got[1][1] == "NotOlderThan"
    assert got[2] == (None, None)  # right after the 410: the only consistent read
    assert got[3][0] not in (None, "0") and got[3][1] == "NotOlderThan"
    assert (slice_store.lists_from_cache, slice_store.lists_consistent) == (3, 1)
    await wait_until(lambda: seen(w, slice_store))


@bounded(15)
async def test_watches_that_end_at_once_fall_back_to_listing_from_the_cache_every_period(
    nursery: trio.Nursery,
    start_fake: StartFake,
    pki: PkiFiles,
    free_port: int,
    slice_store: SliceStore,
) -> None:
    fake, w = await start(nursery, start_fake, pki, free_port, slice_store, period=0.3)
    slice_store.watch_timeout = 0  # every watch ends as soon as it opens, empty
    slice_store.end_watches()
    await wait_until(lambda: w.mode == "poll")
    await wait_until(lambda: len(lists(fake)) >= 4)
    slice_store.put(kube_slice(free_port, HOST, "127.0.0.3"))
    await wait_until(lambda: len(w.status()["addresses"]) == 2)
    # Two empty watches per period at most (no spinning), every list from the cache.
    assert len(watches(fake)) <= 2 * len(lists(fake)) + 1
    assert slice_store.lists_consistent == 0
    assert all(q["resourceVersionMatch"] == "NotOlderThan" for q in lists(fake)[1:])
    assert w.errors_total == 0


@bounded(15)
async def test_an_upstream_that_turns_unusable_is_left_at_once_not_when_its_watch_ends(
    nursery: trio.Nursery,
    start_fake: StartFake,
    pki: PkiFiles,
    free_port: int,
    slice_store: SliceStore,
) -> None:
    fake, w = await start(nursery, start_fake, pki, free_port, slice_store)
    other = await start_fake("127.0.0.3", host="127.0.0.3", port=free_port, require_token=pki.token)
    first, second = Address(HOST, free_port), Address("127.0.0.3", free_port)
    w.pool.set_source("flag", [first, second], now=0.0)
    w.pool.record_probe(second, ok=True, now=0.0, latency=0.001)
    assert w.source_upstream == first and w.mode == "watch"
    while w.pool.get(first).usable:  # type: ignore[union-attr]
        # published as the probe scheduler does: discovery subscribes to UNHEALTHY
        w.changes.publish(w.pool.record_probe(first, ok=False, now=1.0, error="refused"))
    await wait_until(lambda: w.source_upstream == second and w.mode == "watch")
    # The new session lists from the cache, at least as new as what kap had seen.
    (relist,) = lists(other)
    assert relist["resourceVersionMatch"] == "NotOlderThan"
    assert len(watches(fake)) == 1 and len(watches(other)) == 1
    assert slice_store.lists_consistent == 0 and w.errors_total == 0
