"""lightkube 1.0.1 under trio: what works against the fake, and one section per trap.

kap's discovery uses lightkube's models and configuration but not its watch
loop, because of the traps below. Each trap is shown twice: with lightkube
and the fake alone (the trap is still there: when a lightkube upgrade fixes
one, its test here fails and says so), then with kap's watcher in front of
fake apiservers, which does not fall into it.

The first section holds what lightkube does right with the fake (lists,
watches from the list's version, tokens, several apiservers on one store):
the ground the traps stand on.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx2
import msgspec
import pytest
import trio
import trio.testing
from fakeapi import FakeApiServer, PkiFiles, SliceStore, endpoint_slice, garbage_slices
from fakeapitest import eventually
from kaptest import StartFake, start_kap, wait_until
from lightkube import ApiError, AsyncClient, KubeConfig
from lightkube.config.models import Cluster, User
from lightkube.resources.discovery_v1 import EndpointSlice
from lightkube.types import OnErrorAction, OnErrorResult, on_error_retry
from loguru import logger
from test_discovery import (
    HOSTS,
    LABELS,
    _pool_with,
    addresses,
    bounded,
    disc_config,
    discovered,
    kube_slice,
    plane,
    slice_requests,
    watcher,
)

from kap.config import Credentials
from kap.credentials import CredentialFiles
from kap.discovery import EndpointSliceWatcher


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    """Every loguru record emitted during the test."""
    records: list[dict[str, Any]] = []
    sink = logger.add(lambda m: records.append(m.record), level="DEBUG")
    yield records
    logger.remove(sink)


def kubeconfig(fake: FakeApiServer, pki: PkiFiles, *, token: bool = False) -> Any:
    """A lightkube KubeConfig for ``fake`` with the client cert (or the token)."""
    user: dict[str, str]
    if token:
        user = {"token": pki.token}
    else:
        user = {"client-certificate": str(pki.client_cert_file)}
        user["client-key"] = str(pki.client_key_file)
    cluster = {"server": fake.url, "certificate-authority": str(pki.ca_file)}
    return KubeConfig.from_dict(
        {
            "clusters": [{"name": "fake", "cluster": cluster}],
            "users": [{"name": "kap", "user": user}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "kap"}}],
            "current-context": "fake",
        }
    )


@pytest.fixture
async def lightkube_for(pki: PkiFiles) -> AsyncIterator[Any]:
    """``lightkube_for(fake, token=False)`` -> a lightkube AsyncClient, closed at the end."""
    clients = []

    def make(fake: FakeApiServer, *, token: bool = False) -> Any:
        kube = AsyncClient(kubeconfig(fake, pki, token=token), trust_env=False)
        clients.append(kube)
        return kube

    yield make
    for kube in clients:
        await kube.close()


def lightkube_client(pki: PkiFiles, url: str) -> AsyncClient:
    config = KubeConfig.from_one(
        cluster=Cluster(server=url, certificate_auth=str(pki.ca_file)), user=User(token=pki.token)
    )
    return AsyncClient(config, trust_env=False)


async def first_event(stream: Any) -> Any:
    async for event in stream:
        return event
    return None


KUBERNETES_LABELS = {"kubernetes.io/service-name": "kubernetes"}


# ---- what works -------------------------------------------------------------


async def test_lightkube_lists_then_watches_from_the_list_version(
    start_fake: Any, lightkube_for: Any, slice_store: SliceStore
) -> None:
    slice_store.put(endpoint_slice("kubernetes", [("127.0.0.2", True)]))
    slice_store.put(endpoint_slice("web", [("10.0.0.1", True)], service="web"))
    with trio.fail_after(10):
        fake = await start_fake("a", require_client_cert=True)
        kube = lightkube_for(fake)
        listing = kube.list(EndpointSlice, namespace="default", labels=KUBERNETES_LABELS)
        names = [s.metadata.name async for s in listing]
        assert names == ["kubernetes"]
        rv = listing.resourceVersion
        # Changes made after the list, before the watch starts, are replayed.
        slice_store.put(endpoint_slice("kubernetes", [("127.0.0.2", True), ("127.0.0.3", True)]))
        web_joins = endpoint_slice("web", [("10.0.0.1", True)])  # now labelled kubernetes
        slice_store.put(web_joins)
        slice_store.delete("kubernetes")
        seen = []
        watch = kube.watch(
            EndpointSlice, namespace="default", labels=KUBERNETES_LABELS, resource_version=rv
        )
        async for kind, obj in watch:
            addresses = [a for e in obj.endpoints or [] for a in e.addresses]
            seen.append((kind, obj.metadata.name, addresses))
            if len(seen) == 3:
                break
        assert seen == [
            ("MODIFIED", "kubernetes", ["127.0.0.2", "127.0.0.3"]),
            ("ADDED", "web", ["10.0.0.1"]),  # a label moving in reads as ADDED
            ("DELETED", "kubernetes", ["127.0.0.2", "127.0.0.3"]),
        ]
        assert {r.user for r in fake.requests} == {"system:kap"}


async def test_lightkube_with_a_token(
    start_fake: Any, lightkube_for: Any, pki: PkiFiles, slice_store: SliceStore
) -> None:
    slice_store.put(endpoint_slice("kubernetes", [("127.0.0.2", True)]))
    with trio.fail_after(10):
        fake = await start_fake("a", require_token=pki.token)
        kube = lightkube_for(fake, token=True)
        got = await kube.get(EndpointSlice, "kubernetes", namespace="default")
        assert got.ports[0].name == "https"


async def test_several_fakes_serve_one_shared_store(
    start_fake: Any, lightkube_for: Any, slice_store: SliceStore, free_port: int
) -> None:
    with trio.fail_after(10):
        b = await start_fake("b", host="127.0.0.2", port=free_port)
        c = await start_fake("c", host="127.0.0.3", port=free_port)
        slice_store.put(endpoint_slice("kubernetes", [("127.0.0.2", True), ("127.0.0.3", True)]))
        for fake in (b, c):
            got = await lightkube_for(fake).get(EndpointSlice, "kubernetes", namespace="default")
            assert [e.addresses[0] for e in got.endpoints] == ["127.0.0.2", "127.0.0.3"]


# ---- trap: a retry sleeps with asyncio --------------------------------------


async def test_lightkube_retry_sleep_is_asyncio_and_fails_under_trio(
    start_fake: Any, lightkube_for: Any, slice_store: SliceStore
) -> None:
    slice_store.http_410_on_watch = True
    with trio.fail_after(10):
        fake = await start_fake("a")
        kube = lightkube_for(fake)
        retry_later = lambda error, count: OnErrorResult(OnErrorAction.RETRY, sleep=0.1)  # noqa: E731
        with pytest.raises(RuntimeError, match="no running event loop"):
            async for _ in kube.watch(EndpointSlice, namespace="default", on_error=retry_later):
                pass


@bounded(15)
async def test_trap_retrying_on_error_sleeps_with_asyncio_so_kap_retries_in_trio(
    nursery: trio.Nursery,
    start_fake: StartFake,
    pki: PkiFiles,
    free_port: int,
    slice_store: SliceStore,
) -> None:
    fakes = await plane(start_fake, free_port, HOSTS[:2], require_token=pki.token)
    slice_store.put(kube_slice(free_port, *HOSTS[:2]))
    slice_store.http_410_on_watch = True
    retry_later = lambda e, n: OnErrorResult(OnErrorAction.RETRY, sleep=0.1)  # noqa: E731
    with pytest.raises(RuntimeError, match="no running event loop"):
        await first_event(
            lightkube_client(pki, fakes[HOSTS[0]].url).watch(
                EndpointSlice, namespace="default", on_error=retry_later
            )
        )
    slice_store.http_410_on_watch = False
    # kap's own loop: errors for a while, then the API answers again.
    slice_store.list_error = 500
    app, _ = await start_kap(nursery, disc_config(pki, free_port, HOSTS[:1]))
    await wait_until(lambda: watcher(app).errors_total >= 2)
    slice_store.list_error = None
    await wait_until(lambda: discovered(app) == addresses(free_port, *HOSTS[:2]))


# ---- trap: HTTP 410 on a watch is not an ApiError ---------------------------


async def test_http_410_on_watch_is_not_an_api_error_in_lightkube(
    start_fake: Any, lightkube_for: Any, slice_store: SliceStore
) -> None:
    slice_store.http_410_on_watch = True
    with trio.fail_after(10):
        fake = await start_fake("a")
        kube = lightkube_for(fake)
        with pytest.raises(httpx2.HTTPStatusError) as raised:
            async for _ in kube.watch(EndpointSlice, namespace="default", resource_version="5"):
                pass
        assert not isinstance(raised.value, ApiError)
        assert raised.value.response.status_code == 410
        # With on_error=RETRY lightkube keeps the stale version and spins.
        retry = lambda error, count: OnErrorResult(OnErrorAction.RETRY)  # noqa: E731
        with trio.move_on_after(0.5):
            async for _ in kube.watch(
                EndpointSlice, namespace="default", resource_version="5", on_error=retry
            ):
                pass
        watches = [r.target for r in fake.requests if "watch=true" in r.target]
        assert len(watches) > 5
        assert all("resourceVersion=5" in t for t in watches)


@bounded(15)
async def test_trap_http_410_on_watch_is_not_an_api_error_and_kap_does_not_spin(
    nursery: trio.Nursery,
    start_fake: StartFake,
    pki: PkiFiles,
    free_port: int,
    slice_store: SliceStore,
    autojump_clock: trio.testing.MockClock,
) -> None:
    fakes = await plane(start_fake, free_port, HOSTS[:3], require_token=pki.token)
    slice_store.put(kube_slice(free_port, *HOSTS[:2]))
    slice_store.http_410_on_watch = True
    with pytest.raises(httpx2.HTTPStatusError) as caught:
        await first_event(
            lightkube_client(pki, fakes[HOSTS[0]].url).watch(EndpointSlice, namespace="default")
        )
    assert not isinstance(caught.value, ApiError) and caught.value.response.status_code == 410

    app, _ = await start_kap(nursery, disc_config(pki, free_port, HOSTS[:1]))
    await wait_until(lambda: discovered(app) == addresses(free_port, *HOSTS[:2]))
    watches = len(slice_requests(*fakes.values(), watch=True))
    await trio.sleep(1.5)  # five periods (virtual: what must not happen is spinning)
    # Each 410 waits a backoff (full jitter, at most 0.8 s) before a consistent list: no spinning.
    assert len(slice_requests(*fakes.values(), watch=True)) - watches <= 2 * 5 + 2
    slice_store.put(kube_slice(free_port, *HOSTS[:3]))  # lists still follow changes
    await wait_until(lambda: discovered(app) == addresses(free_port, *HOSTS[:3]))
    assert watcher(app).errors_total == 0


# ---- trap: a 410 ERROR event is an ApiError ---------------------------------


async def test_410_error_event_is_an_api_error_in_lightkube(
    start_fake: Any, lightkube_for: Any, slice_store: SliceStore
) -> None:
    slice_store.put(endpoint_slice("kubernetes", [("127.0.0.2", True)]))
    with trio.fail_after(10):
        fake = await start_fake("a")
        kube = lightkube_for(fake)

        async def watch_until_410() -> None:
            async for _kind, _obj in kube.watch(EndpointSlice, namespace="default"):
                slice_store.watch_410_event()

        with pytest.raises(ApiError) as raised:
            await watch_until_410()
        assert raised.value.status.code == 410
        # A watch from a compacted version gets the same ERROR event at once.
        slice_store.compact()
        stale = str(slice_store.resource_version - 1)
        with pytest.raises(ApiError) as raised:
            await anext(aiter(kube.watch(EndpointSlice, resource_version=stale)))
        assert raised.value.status.code == 410
        assert slice_store.open_watches == 0


@bounded(15)
async def test_trap_410_error_event_is_an_api_error_and_kap_relists_at_once(
    nursery: trio.Nursery,
    start_fake: StartFake,
    pki: PkiFiles,
    free_port: int,
    slice_store: SliceStore,
) -> None:
    fakes = await plane(start_fake, free_port, HOSTS[:3], require_token=pki.token)
    slice_store.put(kube_slice(free_port, *HOSTS[:2]))
    slice_store.compact()
    with pytest.raises(ApiError) as caught:
        await first_event(
            lightkube_client(pki, fakes[HOSTS[0]].url).watch(
                EndpointSlice, namespace="default", resource_version="1"
            )
        )
    assert caught.value.status.code == 410

    # A long period: only the 410 can make kap list again this soon.
    config = disc_config(pki, free_port, HOSTS[:1], discover_period="30s")
    app, _ = await start_kap(nursery, config)
    await wait_until(lambda: discovered(app) == addresses(free_port, *HOSTS[:2]))
    w = watcher(app)
    await wait_until(lambda: w.mode == "watch" and slice_store.open_watches == 1)
    lists = slice_store.lists_served
    slice_store.compact()
    slice_store.watch_410_event()
    await wait_until(lambda: slice_store.lists_served == lists + 1, timeout=2)
    slice_store.put(kube_slice(free_port, *HOSTS[:3]))
    await wait_until(lambda: discovered(app) == addresses(free_port, *HOSTS[:3]), timeout=2)
    assert w.errors_total == 0


# ---- trap: connection errors escape a retrying watch ------------------------


async def test_connection_errors_escape_a_retrying_lightkube_watch(
    start_fake: Any, lightkube_for: Any, slice_store: SliceStore
) -> None:
    slice_store.put(endpoint_slice("kubernetes", [("127.0.0.2", True)]))
    with trio.fail_after(10):
        fake = await start_fake("a")
        kube = lightkube_for(fake)
        retry = lambda error, count: OnErrorResult(OnErrorAction.RETRY)  # noqa: E731

        async def watch_while_the_server_dies() -> None:
            async for _ in kube.watch(EndpointSlice, namespace="default", on_error=retry):
                fake.stop()  # mid-stream: a read error (retried), then a refused dial

        with pytest.raises(httpx2.ConnectError):
            await watch_while_the_server_dies()


@bounded(15)
async def test_trap_connection_errors_escape_a_retrying_watch_and_kap_moves_on(
    nursery: trio.Nursery,
    start_fake: StartFake,
    pki: PkiFiles,
    free_port: int,
    slice_store: SliceStore,
) -> None:
    closed = f"https://127.0.0.1:{free_port}"  # nothing listens on 127.0.0.1:P
    with pytest.raises(httpx2.ConnectError):
        await first_event(
            lightkube_client(pki, closed).watch(
                EndpointSlice, namespace="default", on_error=on_error_retry
            )
        )

    fakes = await plane(start_fake, free_port, HOSTS[:3], require_token=pki.token)
    slice_store.put(kube_slice(free_port, *HOSTS[:3]))
    config = disc_config(pki, free_port, HOSTS[:1], discover_period="30s")
    app, _ = await start_kap(nursery, config)
    await wait_until(lambda: discovered(app) == addresses(free_port, *HOSTS[:3]))
    w = watcher(app)
    await wait_until(lambda: w.mode == "watch" and len(app.pool.usable()) == 3)
    victim = w.source_upstream
    assert victim is not None
    fakes[victim.host].stop()  # its watch connection breaks, its port refuses
    await wait_until(lambda: w.source_upstream not in (None, victim) and w.mode == "watch")
    assert w.errors_total >= 1
    slice_store.put(kube_slice(free_port, *HOSTS[:2]))
    await wait_until(lambda: discovered(app) == addresses(free_port, *HOSTS[:2]), timeout=3)


# ---- trap: a stalled watch has no read deadline -----------------------------


async def test_stalled_watch_has_no_read_deadline_in_lightkube(
    start_fake: Any, lightkube_for: Any, slice_store: SliceStore
) -> None:
    slice_store.put(endpoint_slice("kubernetes", [("127.0.0.2", True)]))
    slice_store.stall_watches = True
    slice_store.watch_timeout = 0.1  # a stalled watch ignores it: it sends nothing at all
    with trio.fail_after(10):
        fake = await start_fake("a")
        kube = lightkube_for(fake)
        with trio.move_on_after(0.5) as waited:
            async for _ in kube.watch(EndpointSlice, namespace="default"):
                pytest.fail("a stalled watch sent an event")
        assert waited.cancelled_caught  # only our own cancel scope ended it
        await eventually(lambda: slice_store.open_watches == 0)  # it saw the client leave


@bounded(15)
async def test_trap_a_stalled_watch_has_no_read_deadline_and_kap_bounds_it(
    nursery: trio.Nursery,
    start_fake: StartFake,
    pki: PkiFiles,
    free_port: int,
    slice_store: SliceStore,
) -> None:
    fakes = await plane(start_fake, free_port, HOSTS[:3], require_token=pki.token)
    slice_store.put(kube_slice(free_port, *HOSTS[:2]))
    slice_store.stall_watches = True
    with trio.move_on_after(1.0) as scope:
        await first_event(
            lightkube_client(pki, fakes[HOSTS[0]].url).watch(EndpointSlice, namespace="default")
        )
    assert scope.cancelled_caught  # lightkube would have waited forever

    # kap: a watch silent past the stall limit is closed, and kap re-lists.
    slice_store.stall_watches = False
    slice_store.bookmark_interval = 0.1
    pool = _pool_with(f"{HOSTS[0]}:{free_port}")
    creds = CredentialFiles(Credentials(ca_file=str(pki.ca_file), token_file=str(pki.token_file)))
    w = EndpointSliceWatcher(pool, creds, "", 30.0, lambda a: None, stall_limit=0.5)
    nursery.start_soon(w.run)
    await wait_until(lambda: set(w.status()["addresses"]) == addresses(free_port, *HOSTS[:2]))
    slice_store.stall_watches = True
    slice_store.put(kube_slice(free_port, *HOSTS[:3]))
    await wait_until(lambda: len(w.status()["addresses"]) == 3, timeout=3)
    await wait_until(lambda: w.lists_total >= 3, timeout=3)  # and again, while watches stall
    # Each stalled watch was closed: no connections pile up.
    assert sum(f.active_connections for f in fakes.values()) <= 2
    assert w.errors_total == 0


# ---- trap: a watch the server ends is reopened unseen -----------------------


async def test_lightkube_rewatches_after_a_server_side_timeout(
    start_fake: Any, lightkube_for: Any, slice_store: SliceStore
) -> None:
    slice_store.watch_timeout = 0.1
    with trio.fail_after(10):
        fake = await start_fake("a")
        kube = lightkube_for(fake)

        async def change_later() -> None:  # once lightkube has re-watched, unseen
            await eventually(lambda: slice_store.watches_opened >= 3)
            slice_store.put(endpoint_slice("kubernetes", [("127.0.0.2", True)]))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(change_later)
            async for kind, _ in kube.watch(EndpointSlice, namespace="default"):
                assert kind == "ADDED"
                break
        assert slice_store.watches_opened >= 3


@bounded(15)
async def test_trap_a_watch_the_server_ends_is_reopened_unseen_so_kap_sends_each_watch_itself(
    nursery: trio.Nursery,
    start_fake: StartFake,
    pki: PkiFiles,
    free_port: int,
    slice_store: SliceStore,
) -> None:
    fakes = await plane(start_fake, free_port, HOSTS[:1], require_token=pki.token)
    slice_store.put(kube_slice(free_port, *HOSTS[:1]))
    slice_store.watch_timeout = 0.1  # the server ends every watch after 0.1 s, empty
    rv = str(slice_store.resource_version)
    with trio.move_on_after(1.0) as scope:
        await first_event(
            lightkube_client(pki, fakes[HOSTS[0]].url).watch(
                EndpointSlice, namespace="default", resource_version=rv
            )
        )
    # lightkube sent a new WATCH after each end, and its caller saw none of them.
    assert scope.cancelled_caught and slice_store.watches_opened >= 3
    # kap sends each WATCH itself and sees each end: tests/test_reflector.py.


# ---- trap: one bad item fails a whole typed list ----------------------------


async def test_one_bad_item_fails_a_whole_typed_lightkube_list(
    start_fake: Any, lightkube_for: Any, slice_store: SliceStore
) -> None:
    slice_store.put(endpoint_slice("kubernetes", [("127.0.0.2", True)]))
    slice_store.put_raw("bad", garbage_slices()[1])
    with trio.fail_after(10):
        fake = await start_fake("a")
        kube = lightkube_for(fake)
        with pytest.raises(msgspec.ValidationError):
            _ = [s async for s in kube.list(EndpointSlice, namespace="default")]


@bounded(15)
async def test_trap_one_bad_item_fails_a_typed_list_but_kap_skips_only_that_item(
    nursery: trio.Nursery,
    start_fake: StartFake,
    pki: PkiFiles,
    free_port: int,
    slice_store: SliceStore,
    logs: list[dict[str, Any]],
) -> None:
    fakes = await plane(start_fake, free_port, HOSTS[:3], require_token=pki.token)
    slice_store.put(kube_slice(free_port, *HOSTS[:2]))
    for i, item in enumerate(garbage_slices()):
        slice_store.put_raw(f"garbage-{i}", item)
    with pytest.raises(msgspec.ValidationError):
        async for _ in lightkube_client(pki, fakes[HOSTS[0]].url).list(
            EndpointSlice, namespace="default"
        ):
            pass

    app, _ = await start_kap(nursery, disc_config(pki, free_port, HOSTS[:1]))
    await wait_until(lambda: discovered(app) == addresses(free_port, *HOSTS[:2]))
    skipped = [r for r in logs if r["message"] == "skipping part of an EndpointSlice"]
    assert len(skipped) == 7  # each garbage item once, though every list repeats them
    # Garbage arriving by watch event is skipped too, and good events still apply.
    late = {"metadata": {"name": "late", "labels": LABELS}, "addressType": "IPv9"}
    slice_store.put_raw("garbage-late", late)
    slice_store.put(kube_slice(free_port, *HOSTS[:3]))
    await wait_until(lambda: discovered(app) == addresses(free_port, *HOSTS[:3]))
    assert len([r for r in logs if r["message"] == "skipping part of an EndpointSlice"]) == 8
    # A re-list brings the same garbage again: no new lines. (A 410 makes kap re-list at
    # once; its next watch opens once that list has been read.)
    watches, lists = slice_store.watches_opened, slice_store.lists_served
    slice_store.watch_410_event()
    await wait_until(lambda: slice_store.watches_opened > watches)
    assert slice_store.lists_served > lists
    assert len([r for r in logs if r["message"] == "skipping part of an EndpointSlice"]) == 8
    assert watcher(app).errors_total == 0
