"""Discovery through real sockets: kap in front of fake apiservers on 127.0.0.2:P, 127.0.0.3:P...

The fakes share one SliceStore (one etcd), serve the ``default/kubernetes``
EndpointSlices and require kap's credentials. Periods and graces are short
(``PERIOD``, ``GRACE``) so every scenario takes a second or two. The
lightkube 1.0.1 traps kap avoids have their own file,
``tests/test_lightkube_traps.py`` (which borrows this file's helpers).
"""

from __future__ import annotations

import base64
import functools
import json
import random
import shutil
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
import trio
from fakeapi import FakeApiServer, PkiFiles, SliceStore, endpoint_slice, garbage_slices
from hypothesis import given, settings
from hypothesis import strategies as st
from kaptest import FAST, StartFake, get_json, make_config, start_kap, wait_until, who
from loguru import logger

from kap import kubeconfig
from kap.address import Address
from kap.app import App
from kap.config import ConfigError, Credentials, parse_config
from kap.credentials import NO_CA, CredentialFiles
from kap.discovery import BACKOFF_INITIAL, ERROR_LOG_INTERVAL, EndpointSliceWatcher, backoff_delay
from kap.pool import SOURCE_DISCOVERY, SOURCE_FILE, SOURCE_KUBECONFIG, Pool

PERIOD = "300ms"
GRACE = "500ms"
HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")
LABELS = {"kubernetes.io/service-name": "kubernetes"}
SLICES_PATH = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"


def bounded(seconds: float) -> Callable[[Callable[..., Awaitable[None]]], Any]:
    """Run the test under ``trio.fail_after(seconds)``: nothing here may hang."""

    def wrap(fn: Callable[..., Awaitable[None]]) -> Any:
        @functools.wraps(fn)
        async def run(*args: Any, **kwargs: Any) -> None:
            with trio.fail_after(seconds):
                await fn(*args, **kwargs)

        return run

    return wrap


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    """Every loguru record emitted during the test."""
    records: list[dict[str, Any]] = []
    sink = logger.add(lambda m: records.append(m.record), level="DEBUG")
    yield records
    logger.remove(sink)


def messages(records: list[dict[str, Any]], level: str | None = None) -> list[str]:
    return [r["message"] for r in records if level is None or r["level"].name == level]


def kube_slice(port: int, *ready: str, not_ready: tuple[str, ...] = ()) -> dict[str, Any]:
    eps = [(h, True) for h in ready] + [(h, False) for h in not_ready]
    return endpoint_slice("kubernetes", eps, ports=[("https", port)])


def addresses(port: int, *hosts: str) -> set[str]:
    return {f"{h}:{port}" for h in hosts}


def file_set(path: Path) -> set[str] | None:
    """The fallback file's addresses, or None while it is not a JSON array."""
    try:
        return set(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def discovered(app: App) -> set[str]:
    return {str(a) for a in app.pool.addresses(SOURCE_DISCOVERY)}


def in_pool(app: App) -> set[str]:
    return {str(a) for a in app.pool.addresses()}


def watcher(app: App) -> EndpointSliceWatcher:
    assert app.discovery is not None
    return app.discovery


def slice_requests(*fakes: FakeApiServer, watch: bool | None = None) -> list[Any]:
    out = []
    for f in fakes:
        for r in f.requests:
            is_watch = "watch=true" in r.target
            if r.target.startswith(SLICES_PATH) and (watch is None or is_watch == watch):
                out.append(r)
    return out


async def plane(
    start_fake: StartFake, port: int, hosts: tuple[str, ...], **kwargs: Any
) -> dict[str, FakeApiServer]:
    return {h: await start_fake(h, host=h, port=port, **kwargs) for h in hosts}


def disc_config(pki: PkiFiles, port: int, seeds: tuple[str, ...], **values: Any) -> Any:
    base = {
        "discovery": "true",
        "discover_period": PERIOD,
        "removal_grace": GRACE,
        "token_file": str(pki.token_file),
        "fallback_upstreams": ",".join(f"{h}:{port}" for h in seeds),
    }
    base.update(values)
    environ = base.pop("environ", None)
    return make_config(pki, environ, **base)


# ---- pure parts -----------------------------------------------------------


@pytest.mark.parametrize(
    ("failures", "u", "delay"),
    [
        (1, 0.0, 0.0),  # full jitter: the draw scales from zero
        (1, 0.5, 0.4),
        (1, 0.999999, 0.8),
        (2, 0.5, 0.8),
        (3, 0.5, 1.6),
        (10, 0.0, 0.0),
        (10, 0.5, 2.5),  # capped at 5 s
        (10, 0.999999, 5.0),
        (10_000, 0.5, 2.5),  # no overflow
        (0, 0.999999, 0.8),  # treated as the first
    ],
)
def test_backoff_doubles_with_full_jitter_up_to_the_cap(
    failures: int, u: float, delay: float
) -> None:
    got = backoff_delay(failures, initial=BACKOFF_INITIAL, cap=5.0, u=u)
    assert got == pytest.approx(delay, abs=1e-5)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(min_value=0, max_value=10_000),
    st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
    st.floats(min_value=0.8, max_value=30.0),
)
def test_backoff_draws_are_full_jitter_within_zero_and_the_cap(
    failures: int, u: float, cap: float
) -> None:
    """Thousands of nodes that lost an apiserver together spread over all of [0, cap]."""
    delay = backoff_delay(failures, initial=BACKOFF_INITIAL, cap=cap, u=u)
    ceiling = min(cap, BACKOFF_INITIAL * 2.0 ** min(max(failures, 1) - 1, 32))
    assert 0.0 <= delay <= cap
    assert delay == pytest.approx(u * ceiling)


def _pool_with(*usable: str, unusable: tuple[str, ...] = (), default: str | None = None) -> Pool:
    pool = Pool(default_service=None if default is None else Address.parse(default))
    pool.set_source("flag", [Address.parse(a) for a in (*usable, *unusable)], now=0.0)
    for a in usable:
        pool.record_probe(Address.parse(a), ok=True, now=0.0, latency=0.001)
    return pool


A, B, C = "10.0.0.1:6443", "10.0.0.2:6443", "10.0.0.3:6443"
SVC = "10.96.0.1:443"


@pytest.mark.parametrize(
    ("usable", "unusable", "default", "avoid", "asked"),
    [
        # Usable upstreams: one of the pool's best, never the Service.
        ((A, B), (), SVC, None, {A, B}),
        ((A, B), (), SVC, A, {B}),  # after a failure, another one
        ((A,), (), SVC, A, {A}),  # nothing else: the same again
        ((A,), (C,), SVC, None, {A}),
        # Nothing usable yet: the other members in turn, still never the Service.
        ((), (A, B), SVC, None, {A, B}),
        ((), (A, B), SVC, A, {B}),
        ((), (C,), SVC, None, {C}),
        # The pool holds nothing: the Service is the last resort.
        ((), (), SVC, None, {SVC}),
        ((), (), SVC, SVC, {SVC}),
        ((), (), None, None, {"None"}),
    ],
)
def test_discovery_asks_the_service_only_when_the_pool_holds_nothing(
    usable: tuple[str, ...],
    unusable: tuple[str, ...],
    default: str | None,
    avoid: str | None,
    asked: set[str],
) -> None:
    pool = _pool_with(*usable, unusable=unusable, default=default)
    rng = random.Random(3)
    gone = None if avoid is None else Address.parse(avoid)
    got = {str(pool.where_to_ask(gone, draw=rng.random(), turn=turn)) for turn in range(12)}
    assert got == asked


def test_choosing_where_to_ask_leaves_the_clients_round_robin_alone() -> None:
    alone, asked = _pool_with(A, B, C), _pool_with(A, B, C)
    expected = [alone.pick() for _ in range(7)]
    got = []
    for turn in range(7):
        asked.where_to_ask(None, draw=turn / 7, turn=turn)
        got.append(asked.pick())
    assert [u and str(u.address) for u in got] == [u and str(u.address) for u in expected]
    assert len({u and u.address for u in got}) == 3


async def test_errors_back_off_to_the_period_and_are_logged_rate_limited(
    autojump_clock: trio.testing.MockClock, logs: list[dict[str, Any]], pki: PkiFiles
) -> None:
    creds = CredentialFiles(Credentials(ca_file=str(pki.ca_file), token_file=str(pki.token_file)))
    w = EndpointSliceWatcher(Pool(), creds, "", 5.0, lambda a: None, rng=random.Random(7))
    with trio.move_on_after(120):
        await w.run()
    # Delays double from 0-0.8 s to the cap (the period, 5 s): 0-5 s each, 2.5 s on average.
    assert 120 / 5 <= w.errors_total <= 2 * 120 / 2.5
    assert w.status()["mode"] == "backoff"
    assert w.status()["last_error"] == (
        "no upstream to ask: the pool is empty and there is no kubernetes Service "
        "(KUBERNETES_SERVICE_HOST)"
    )
    errors = messages(logs, "ERROR")
    assert 1 <= len(errors) <= 120 / ERROR_LOG_INTERVAL + 1
    assert all(m == "discovery failed; keeping the current upstreams" for m in errors)


# ---- following the control plane -------------------------------------------


@bounded(15)
async def test_discovers_every_apiserver_from_one_seed_never_via_the_service(
    nursery: trio.Nursery,
    start_fake: StartFake,
    pki: PkiFiles,
    free_port: int,
    slice_store: SliceStore,
) -> None:
    fakes = await plane(start_fake, free_port, HOSTS[:3], require_token=pki.token)
    service = await start_fake("svc", host="127.0.0.9", port=free_port, require_token=pki.token)
    slice_store.put(kube_slice(free_port, *HOSTS[:3]))
    env = {"KUBERNETES_SERVICE_HOST": "127.0.0.9", "KUBERNETES_SERVICE_PORT": str(free_port)}
    app, bound = await start_kap(nursery, disc_config(pki, free_port, HOSTS[:1], environ=env))
    await wait_until(lambda: discovered(app) == addresses(free_port, *HOSTS[:3]))
    await wait_until(lambda: len(app.pool.usable()) == 3)
    assert {await who(bound.proxy) for _ in range(9)} <= set(HOSTS[:3])
    doc = (await get_json(bound.health, "/upstreams"))["discovery"]
    assert doc["slices"] == 1 and doc["errors_total"] == 0 and doc["last_error"] is None
    assert doc["source_upstream"] in addresses(free_port, *HOSTS[:3])
    assert doc["mode"] in ("list", "watch") and doc["credentials"].startswith("flags")
    assert doc["resource_version"] and doc["last_success_unix"] > 1e9
    metrics = (await httpx2.AsyncClient(trust_env=False).get(f"http://{bound.health}/metrics")).text
    assert "kap_discovery_errors_total 0.0" in metrics
    assert "kap_discovery_last_success_timestamp_seconds 1" in metrics
    # Every list and watch went to an apiserver from the pool, with the token.
    reqs = slice_requests(*fakes.values())
    assert reqs and {r.user for r in reqs} == {"system:serviceaccount:kube-system:kap"}
    assert slice_requests(service) == []
    assert "labelSelector=kubernetes.io%2Fservice-name%3Dkubernetes" in reqs[0].target


@bounded(20)
async def test_starts_without_starting_upstreams_through_the_default_service(
    nursery: trio.Nursery,
    start_fake: StartFake,
    pki: PkiFiles,
    free_port: int,
    slice_store: SliceStore,
    logs: list[dict[str, Any]],
) -> None:
    # 127.0.0.9 plays the ClusterIP: it serves the same slices (one etcd).
    fakes = await plane(start_fake, free_port, HOSTS[:3], require_token=pki.token)
    service = await start_fake("svc", host="127.0.0.9", port=free_port, require_token=pki.token)
    service_address = Address("127.0.0.9", free_port)
    slice_store.put(kube_slice(free_port, *HOSTS[:3]))
    env = {"KUBERNETES_SERVICE_HOST": "127.0.0.9", "KUBERNETES_SERVICE_PORT": str(free_port)}
    config = disc_config(pki, free_port, (), environ=env)  # no starting upstreams
    three = addresses(free_port, *HOSTS[:3])

    def never_an_upstream(done: Callable[[], bool]) -> Callable[[], bool]:
        def check() -> bool:
            assert service_address not in app.pool
            return done()

        return check

    start = trio.current_time()
    app, bound = await start_kap(nursery, config)
    w = watcher(app)
    await wait_until(never_an_upstream(lambda: discovered(app) == three), timeout=3)
    found = trio.current_time() - start
    await wait_until(never_an_upstream(lambda: len(app.pool.usable()) == 3), timeout=3)
    usable = trio.current_time() - start
    await wait_until(never_an_upstream(lambda: str(w.source_upstream) in three), timeout=3)
    left = trio.current_time() - start
    print(
        f"\ndiscovery through the Service (--discover-period {PERIOD}): set discovered "
        f"{found * 1e3:.0f} ms, 3 apiservers usable {usable * 1e3:.0f} ms, "
        f"Service left {left * 1e3:.0f} ms after start"
    )
    assert {await who(bound.proxy) for _ in range(9)} <= set(HOSTS[:3])
    # The Service was asked once, then left: the next list and watch go to the apiservers.
    asked_service = len(slice_requests(service))
    assert asked_service >= 1
    await wait_until(
        lambda: w.mode == "watch" and bool(slice_requests(*fakes.values(), watch=True))
    )
    assert len(slice_requests(service)) == asked_service
    assert slice_requests(*fakes.values(), watch=False)
    doc = await get_json(bound.health, "/upstreams")
    assert {u["address"] for u in doc["upstreams"]} == three
    assert doc["fallback_service"] == str(service_address)
    assert doc["discovery"]["errors_total"] == 0
    asks = (
        "discovery asks the kubernetes Service: the pool has no upstream yet "
        "(a last resort; it moves to a discovered apiserver once one is usable)"
    )
    assert messages(logs, "INFO").count(asks) == 1
    assert service_address not in app.pool and service.probe_count() == 0


@bounded(15)
async def test_follows_additions_and_removals_with_the_grace_period(
    nursery: trio.Nursery,
    start_fake: StartFake,
    pki: PkiFiles,
    free_port: int,
    slice_store: SliceStore,
    logs: list[dict[str, Any]],
) -> None:
    a, b, c, d = HOSTS
    await plane(start_fake, free_port, HOSTS, require_token=pki.token)
    slice_store.put(kube_slice(free_port, a, b))
    app, _ = await start_kap(nursery, disc_config(pki, free_port, (a,)))
    await wait_until(lambda: discovered(app) == addresses(free_port, a, b))
    slice_store.put(kube_slice(free_port, a, b, c))
    await wait_until(lambda: discovered(app) == addresses(free_port, a, b, c))
    await wait_until(lambda: len(app.pool.usable()) == 3)

    # b leaves the slice: kept for the grace period, then removed.
    slice_store.put(kube_slice(free_port, a, c, not_ready=(b,)))
    b_addr = Address.parse(f"{b}:{free_port}")
    await wait_until(lambda: (u := app.pool.get(b_addr)) is not None and u.remove_at is not None)
    left_at = trio.current_time()
    assert b_addr in app.pool
    await wait_until(lambda: b_addr not in app.pool, timeout=5)
    assert trio.current_time() - left_at >= 0.4  # GRACE, less the poll step
    # d comes and goes within the grace: never removed.
    slice_store.put(kube_slice(free_port, a, c, d))
    await wait_until(lambda: f"{d}:{free_port}" in discovered(app))
    slice_store.put(kube_slice(free_port, a, c))
    await wait_until(lambda: app.pool.get(Address.parse(f"{d}:{free_port}")).remove_at is not None)  # type: ignore[union-attr]
    slice_store.put(kube_slice(free_port, a, c, d))
    # Back within the grace: the removal is cancelled (a "kept" change), so none is due.
    d_addr = Address.parse(f"{d}:{free_port}")
    await wait_until(lambda: app.pool.get(d_addr).remove_at is None)  # type: ignore[union-attr]
    assert "back in discovery, removal cancelled" in [
        r["extra"]["reason"] for r in logs if r["message"] == "upstream kept"
    ]
    assert in_pool(app) == addresses(free_port, a, c, d)
    assert "discovered apiservers" in messages(logs, "INFO")
    assert "upstream removed" in messages(logs, "INFO")


@bounded(15)
async def test_never_loses_an_upstream_on_an_empty_or_garbage_result(
    nursery: trio.Nursery,
    start_fake: StartFake,
    pki: PkiFiles,
    free_port: int,
    slice_store: SliceStore,
    tmp_path: Path,
    logs: list[dict[str, Any]],
) -> None:
    a, b = HOSTS[:2]
    await plane(start_fake, free_port, (a, b), require_token=pki.token)
    slice_store.put(kube_slice(free_port, a, b))
    path = tmp_path / "fallback.json"
    app, bound = await start_kap(
        nursery, disc_config(pki, free_port, (a,), fallback_file=str(path))
    )
    both = addresses(free_port, a, b)
    await wait_until(lambda: discovered(app) == both)
    w = watcher(app)

    def rv_seen() -> bool:
        return bool(w.status()["resource_version"] == str(slice_store.resource_version))

    def garbage_seen() -> bool:
        return "skipping part of an EndpointSlice" in messages(logs, "WARNING")

    def empty_set_refused() -> bool:
        """The pool was sent the empty set and kept both (one "kept" line each)."""
        kept = [r for r in logs if r["message"] == "upstream kept"]
        return rv_seen() and sum("empty" in r["extra"]["reason"] for r in kept) == 2

    for change, seen in (
        (lambda: slice_store.put(kube_slice(free_port, not_ready=(a, b))), empty_set_refused),
        (lambda: slice_store.delete("kubernetes"), rv_seen),  # no slice at all: the same set
        (
            lambda: [slice_store.put_raw(f"g{i}", g) for i, g in enumerate(garbage_slices())],
            garbage_seen,
        ),
    ):
        change()
        await wait_until(seen)  # the watch delivered the change
        assert in_pool(app) == both
        assert all(u.remove_at is None for u in app.pool.upstreams)
        assert set(json.loads(path.read_text())) == both
    # What must NOT happen is a removal, and an unchanged (empty) set is not sent again,
    # so no event marks it: longer than the removal grace (GRACE) passes, once.
    await trio.sleep(0.6)
    assert in_pool(app) == both
    assert w.status()["addresses"] == [] and w.errors_total == 0
    assert {await who(bound.proxy) for _ in range(4)} <= {a, b}


@bounded(20)
async def test_survives_the_api_going_away_and_coming_back(
    nursery: trio.Nursery,
    start_fake: StartFake,
    pki: PkiFiles,
    free_port: int,
    slice_store: SliceStore,
    logs: list[dict[str, Any]],
) -> None:
    a, b, c = HOSTS[:3]
    fakes = await plane(start_fake, free_port, (a, b), require_token=pki.token)
    slice_store.put(kube_slice(free_port, a, b))
    app, bound = await start_kap(nursery, disc_config(pki, free_port, (a,)))
    await wait_until(lambda: discovered(app) == addresses(free_port, a, b))
    w = watcher(app)

    # The API answers errors (etcd down) and drops its watches: the set stays,
    # errors are counted.
    slice_store.list_error = 500
    for f in fakes.values():
        f.drop_connections()
    await wait_until(lambda: w.errors_total >= 2)
    assert "HTTP 500" in (w.last_error or "")
    assert discovered(app) == addresses(free_port, a, b)

    # Every apiserver gone: still the same set, and discovery keeps trying.
    for f in fakes.values():
        f.stop()
    errors = w.errors_total
    await wait_until(lambda: w.errors_total >= errors + 2)
    assert discovered(app) == addresses(free_port, a, b)

    # Back, with a third apiserver: followed within a few periods.
    slice_store.list_error = None
    await plane(start_fake, free_port, (a, b, c), require_token=pki.token)
    slice_store.put(kube_slice(free_port, a, b, c))
    await wait_until(lambda: discovered(app) == addresses(free_port, a, b, c), timeout=8)
    assert "discovery recovered" in messages(logs, "INFO")
    await wait_until(lambda: len(app.pool.usable()) == 3, timeout=5)
    assert {await who(bound.proxy) for _ in range(9)} <= {a, b, c}


async def test_a_ca_file_that_disappears_keeps_the_last_good_one_and_kap_running(
    nursery: trio.Nursery,
    start_fake: StartFake,
    pki: PkiFiles,
    free_port: int,
    slice_store: SliceStore,
    tmp_path: Path,
) -> None:
    """A CA file gone for a while (a rotation that removes before it writes) is no crash.

    New discovery sessions keep using the CA kap loaded last; nothing reads
    the file again behind kap's back.
    """
    a, b = HOSTS[:2]
    fakes = await plane(start_fake, free_port, (a, b), require_token=pki.token)
    slice_store.put(kube_slice(free_port, a))
    ca = tmp_path / "ca.crt"
    shutil.copy(pki.ca_file, ca)
    app, bound = await start_kap(nursery, disc_config(pki, free_port, (a,), ca_file=str(ca)))
    await wait_until(lambda: discovered(app) == addresses(free_port, a))
    ca.unlink()
    watches = slice_store.watches_opened
    for f in fakes.values():
        f.drop_connections()  # new sessions, each building a client
    await wait_until(lambda: slice_store.watches_opened > watches)
    slice_store.put(kube_slice(free_port, a, b))
    await wait_until(lambda: discovered(app) == addresses(free_port, a, b))
    await wait_until(lambda: len(app.pool.usable()) == 2)
    assert await who(bound.proxy) in {a, b}


@bounded(20)
async def test_writes_the_fallback_file_and_a_restart_reads_it_while_the_api_fails(
    start_fake: StartFake,
    pki: PkiFiles,
    free_port: int,
    slice_store: SliceStore,
    tmp_path: Path,
) -> None:
    await plane(start_fake, free_port, HOSTS[:3], require_token=pki.token)
    slice_store.put(kube_slice(free_port, *HOSTS[:3]))
    path = tmp_path / "fallback.json"
    three = addresses(free_port, *HOSTS[:3])
    async with trio.open_nursery() as first:
        app, _ = await start_kap(
            first, disc_config(pki, free_port, HOSTS[:1], fallback_file=str(path))
        )
        await wait_until(lambda: file_set(path) == three)
        first.cancel_scope.cancel()
    assert path.read_text() == json.dumps(sorted(three)) + "\n"

    # The node reboots while discovery cannot work: kap starts from the file alone.
    slice_store.list_error = 503
    async with trio.open_nursery() as second:
        app, bound = await start_kap(
            second, disc_config(pki, free_port, (), fallback_file=str(path))
        )
        assert {str(a) for a in app.pool.addresses(SOURCE_FILE)} == three
        await wait_until(lambda: len(app.pool.usable()) == 3)
        assert {await who(bound.proxy) for _ in range(9)} <= set(HOSTS[:3])
        await wait_until(lambda: watcher(app).errors_total >= 1)
        assert set(json.loads(path.read_text())) == three  # errors never rewrite it
        second.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("content", "level", "message"),
    [
        ('["127.0.0.2:1", "127.0', "ERROR", "ignoring the fallback file"),
        ("", "INFO", "the fallback file is empty; it is written once discovery succeeds"),
    ],
    ids=["corrupt", "empty"],
)
@bounded(15)
async def test_starts_from_a_corrupt_or_empty_fallback_file_and_repairs_it(
    nursery: trio.Nursery,
    start_fake: StartFake,
    pki: PkiFiles,
    free_port: int,
    slice_store: SliceStore,
    tmp_path: Path,
    logs: list[dict[str, Any]],
    content: str,
    level: str,
    message: str,
) -> None:
    await plane(start_fake, free_port, HOSTS[:2], require_token=pki.token)
    slice_store.put(kube_slice(free_port, *HOSTS[:2]))
    path = tmp_path / "fallback.json"
    path.write_text(content)
    await start_kap(nursery, disc_config(pki, free_port, HOSTS[:1], fallback_file=str(path)))
    assert message in messages(logs, level)
    two = addresses(free_port, *HOSTS[:2])
    await wait_until(lambda: file_set(path) == two)


@bounded(15)
async def test_static_pod_mode_authenticates_with_the_client_certificate(
    nursery: trio.Nursery,
    start_fake: StartFake,
    pki: PkiFiles,
    free_port: int,
    slice_store: SliceStore,
    tmp_path: Path,
) -> None:
    static = tmp_path / "kap"
    static.mkdir()
    for name in ("ca.crt", "cl.crt", "cl.key"):
        shutil.copy(pki.dir / name, static / name)
    fakes = await plane(start_fake, free_port, HOSTS[:2], require_client_cert=True)
    slice_store.put(kube_slice(free_port, *HOSTS[:2]))
    config = make_config(
        None,
        discovery="true",
        discover_period=PERIOD,
        as_static_pod="true",
        static_pod_dir=str(static),
        fallback_upstreams=f"{HOSTS[0]}:{free_port}",
    )
    assert config.credentials.origin == "static-pod"
    app, _ = await start_kap(nursery, config)
    await wait_until(lambda: discovered(app) == addresses(free_port, *HOSTS[:2]))
    assert {r.user for r in slice_requests(*fakes.values())} == {"system:kap"}
    assert watcher(app).status()["credentials"] == "static-pod"


@bounded(15)
async def test_token_mode_follows_a_rotated_token(
    nursery: trio.Nursery,
    start_fake: StartFake,
    pki: PkiFiles,
    free_port: int,
    slice_store: SliceStore,
    tmp_path: Path,
) -> None:
    token = tmp_path / "token"
    token.write_text("first-token\n")
    fakes = await plane(start_fake, free_port, HOSTS[:3], require_token="first-token")
    slice_store.put(kube_slice(free_port, *HOSTS[:2]))
    app, _ = await start_kap(nursery, disc_config(pki, free_port, HOSTS[:1], token_file=str(token)))
    await wait_until(lambda: discovered(app) == addresses(free_port, *HOSTS[:2]))
    # kubelet rotates the bound token; the apiservers accept only the new one.
    token.write_text("second-token-longer\n")
    for f in fakes.values():
        f.require_token = "second-token-longer"
    slice_store.put(kube_slice(free_port, *HOSTS[:3]))
    await wait_until(lambda: discovered(app) == addresses(free_port, *HOSTS[:3]), timeout=5)
    # The change came on the watch opened with the old token; the next watch
    # (the server ends this one) carries the new token.
    since = trio.current_time()
    slice_store.end_watches()
    await wait_until(lambda: any(r.at >= since for r in slice_requests(*fakes.values())))
    later = [r for r in slice_requests(*fakes.values()) if r.at >= since]
    assert {r.user for r in later} == {"system:serviceaccount:kube-system:kap"}


@bounded(15)
async def test_without_credentials_one_error_line_and_the_fallbacks_still_serve(
    nursery: trio.Nursery,
    start_fake: StartFake,
    pki: PkiFiles,
    free_port: int,
    logs: list[dict[str, Any]],
) -> None:
    await plane(start_fake, free_port, HOSTS[:2])
    raw = {
        "listen_addr": "127.0.0.1",
        "listen_port": "0",
        "health_listen": "127.0.0.1:0",
        "health_interval": "100ms",
        "health_timeout": "500ms",
        "discovery": "true",
        "ca_file": str(pki.ca_file),
        "fallback_upstreams": f"{HOSTS[0]}:{free_port},{HOSTS[1]}:{free_port}",
    }
    # No ServiceAccount on this machine: only the explicit CA is readable.
    config = parse_config(raw, environ={}, readable=lambda p: None if p == raw["ca_file"] else "no")
    app, bound = await start_kap(nursery, config)
    errors = messages(logs, "ERROR")
    assert len(errors) == 1 and errors[0].startswith("discovery is off: no credentials. Give ")
    assert watcher(app).status()["mode"] == "off"
    assert watcher(app).status()["last_error"] == "no credentials"
    await wait_until(lambda: len(app.pool.usable()) == 2)
    assert {await who(bound.proxy) for _ in range(4)} <= set(HOSTS[:2])


@bounded(15)
async def test_without_a_verifying_ca_discovery_is_off_and_says_why(
    nursery: trio.Nursery,
    start_fake: StartFake,
    pki: PkiFiles,
    free_port: int,
    slice_store: SliceStore,
    logs: list[dict[str, Any]],
) -> None:
    fakes = await plane(start_fake, free_port, HOSTS[:2], require_token=pki.token)
    slice_store.put(kube_slice(free_port, *HOSTS[:2]))
    raw = {
        **FAST,
        "discovery": "true",
        "discover_period": PERIOD,
        "token_file": str(pki.token_file),
        "fallback_upstreams": f"{HOSTS[0]}:{free_port}",
    }
    # A token, but no CA: neither given nor a ServiceAccount's on this machine.
    token = raw["token_file"]
    config = parse_config(raw, environ={}, readable=lambda p: None if p == token else "no")
    app, bound = await start_kap(nursery, config)
    errors = messages(logs, "ERROR")
    assert len(errors) == 1 and errors[0].startswith(f"discovery is off: {NO_CA}. Give --ca-file, ")
    doc = (await get_json(bound.health, "/upstreams"))["discovery"]
    assert doc["mode"] == "off"
    assert doc["last_error"] == NO_CA
    # Probes still tell it alive (a 401 is alive) and clients go there; discovery never asked.
    await wait_until(lambda: len(app.pool.usable()) == 1)
    assert await who(bound.proxy) == HOSTS[0]
    assert discovered(app) == set() and slice_requests(*fakes.values()) == []


@pytest.mark.parametrize("discovery", ["false", "true"])
@bounded(15)
async def test_with_no_upstream_source_one_error_line_names_what_to_give_and_kap_keeps_serving(
    nursery: trio.Nursery, pki: PkiFiles, logs: list[dict[str, Any]], discovery: str
) -> None:
    # No starting upstreams, no Service env; discovery off, or on with credentials.
    config = make_config(pki, discovery=discovery, token_file=str(pki.token_file))
    app, bound = await start_kap(nursery, config)
    errors = messages(logs, "ERROR")
    assert errors[0] == (
        "kap has no upstream to start from: give --fallback-upstreams host:port,..., "
        "a --fallback-file with entries, or --kubeconfig, or run in a pod "
        "(KUBERNETES_SERVICE_HOST/PORT) with discovery; kap keeps running"
    )
    assert errors[1:] in ([], ["discovery failed; keeping the current upstreams"])
    # kap goes on: its housekeeping round logs the problem, discovery tries again.
    await wait_until(lambda: "problems changed" in messages(logs, "WARNING"))
    if discovery == "true":
        await wait_until(lambda: watcher(app).errors_total >= 2)
    async with httpx2.AsyncClient(trust_env=False) as client:
        r = await client.get(f"http://{bound.health}/healthz")
    assert r.status_code == 200 and r.text == "ok\n"
    assert len(app.pool) == 0


def write_kubeconfig(path: Path, pki: PkiFiles, server: str, **extra: Any) -> None:
    cluster = {
        "server": server,
        "certificate-authority-data": base64.b64encode(pki.ca_file.read_bytes()).decode(),
        "tls-server-name": "kubernetes.default.svc",
    }
    cluster.update(extra.pop("cluster", {}))
    user = {"token": pki.token}
    user.update(extra.pop("user", {}))
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "ctx",
    }
    path.write_text(json.dumps(doc))  # JSON is YAML


@bounded(15)
async def test_kubeconfig_gives_credentials_and_one_more_seed(
    nursery: trio.Nursery,
    start_fake: StartFake,
    pki: PkiFiles,
    free_port: int,
    slice_store: SliceStore,
    tmp_path: Path,
) -> None:
    a, b, seed = HOSTS[0], HOSTS[1], HOSTS[3]
    await plane(start_fake, free_port, (a, b, seed), require_token=pki.token)
    slice_store.put(kube_slice(free_port, a, b))
    path = tmp_path / "kubeconfig"
    write_kubeconfig(path, pki, f"https://{seed}:{free_port}")
    # No --ca-file, no --token-file: the kubeconfig gives both (flags would win).
    config = disc_config(pki, free_port, (), kubeconfig=str(path), ca_file=None, token_file=None)
    app, _ = await start_kap(nursery, config)
    assert {str(x) for x in app.pool.addresses(SOURCE_KUBECONFIG)} == {f"{seed}:{free_port}"}
    await wait_until(lambda: discovered(app) == addresses(free_port, a, b))
    assert watcher(app).status()["credentials"] == "kubeconfig"
    # The seed is not in the slice: it leaves nothing, it stays a member.
    assert in_pool(app) == addresses(free_port, a, b, seed)


def test_an_unusable_kubeconfig_is_one_start_up_error_line(pki: PkiFiles, tmp_path: Path) -> None:
    path = tmp_path / "kubeconfig"
    path.write_text("clusters: [ {name: c, cluster: {server: 'https://x'\n")
    with pytest.raises(ConfigError) as err:
        disc_config(pki, 1, HOSTS[:1], kubeconfig=str(path))
    assert len(err.value.problems) == 1
    assert err.value.problems[0].startswith("invalid --kubeconfig (env KUBECONFIG): ")
    assert "not YAML" in err.value.problems[0]


# ---- kubeconfig parsing (files, no network) ----------------------------------


def test_kubeconfig_inline_data_relative_paths_and_tls_server_name(
    pki: PkiFiles, tmp_path: Path
) -> None:
    path = tmp_path / "inline"
    write_kubeconfig(path, pki, "https://[fd00::1]:6443")
    kc = kubeconfig.load(str(path))
    assert kc.seed == Address("fd00::1", 6443)
    assert kc.tls_server_name == "kubernetes.default.svc"
    assert kc.credentials.ca_file is not None
    assert Path(kc.credentials.ca_file).read_bytes() == pki.ca_file.read_bytes()
    assert kc.credentials.token_file is not None
    assert Path(kc.credentials.token_file).read_text() == pki.token
    assert kc.credentials.origin == "kubeconfig"

    shutil.copy(pki.client_cert_file, tmp_path / "cl.crt")
    shutil.copy(pki.client_key_file, tmp_path / "cl.key")
    files = tmp_path / "files"
    doc = {
        "clusters": [{"name": "c", "cluster": {"server": "https://api.example.com"}}],
        "users": [{"name": "u", "user": {"client-certificate": "cl.crt", "client-key": "cl.key"}}],
        "contexts": [{"name": "only", "context": {"cluster": "c", "user": "u"}}],
    }
    files.write_text(json.dumps(doc))
    kc = kubeconfig.load(str(files))  # no current-context: the only context
    assert kc.context == "only"
    assert kc.seed == Address("api.example.com", 443)
    assert kc.credentials.cert_file == str(tmp_path / "cl.crt")
    assert kc.tls_server_name is None


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("", "not a kubeconfig"),
        ("{{{", "not YAML"),
        ('{"clusters": []}', "not a usable kubeconfig"),
        (
            json.dumps(
                {
                    "clusters": [{"name": "c", "cluster": {"server": "https://h"}}],
                    "users": [{"name": "u", "user": {"exec": {"apiVersion": "x", "command": "y"}}}],
                    "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                    "current-context": "x",
                }
            ),
            "no client certificate or token",
        ),
        (
            json.dumps(
                {
                    "clusters": [{"name": "c", "cluster": {"certificate-authority-data": "%%"}}],
                    "users": [{"name": "u", "user": {"token": "t"}}],
                    "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                    "current-context": "x",
                }
            ),
            "not base64",
        ),
    ],
)
def test_unusable_kubeconfigs_say_why(tmp_path: Path, content: str, reason: str) -> None:
    path = tmp_path / "kubeconfig"
    path.write_text(content)
    with pytest.raises(kubeconfig.KubeconfigError, match=reason):
        kubeconfig.load(str(path))
    with pytest.raises(kubeconfig.KubeconfigError, match="cannot read"):
        kubeconfig.load(str(tmp_path / "missing"))


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("https://10.0.0.1:6443", "10.0.0.1:6443"),
        ("https://10.0.0.1", "10.0.0.1:443"),
        ("https://[fd00::1]:6443/", "[fd00::1]:6443"),
        ("https://API.example.com:443", "api.example.com:443"),
        ("http://10.0.0.1:8080", None),
        ("https://10.0.0.1:99999", None),
        ("10.0.0.1:6443", None),
    ],
)
def test_kubeconfig_server_as_a_seed(url: str, address: str | None) -> None:
    if address is None:
        with pytest.raises(ValueError, match=r"server|port"):
            kubeconfig.server_address(url)
    else:
        assert str(kubeconfig.server_address(url)) == address
