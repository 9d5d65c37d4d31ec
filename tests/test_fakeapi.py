"""The fake kube-apiserver behaves like the real one where kap can tell.

Every test is bounded by ``trio.fail_after``: a fake that hangs fails the
test, it never stalls the suite.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx2
import pytest
import trio
from fakeapi import (
    FakeApiServer,
    PkiFiles,
    SliceStore,
    endpoint_slice,
    fake_api_process,
    garbage_slices,
    parse_label_selector,
    write_slices_file,
)

REPO = Path(__file__).resolve().parent.parent
SLICES_URL = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"
KUBERNETES_SELECTOR = "labelSelector=kubernetes.io%2Fservice-name%3Dkubernetes"


def client(pki: PkiFiles, fake: FakeApiServer, **kwargs: Any) -> httpx2.AsyncClient:
    ssl_context = pki.client_ssl_context(client_cert=kwargs.pop("client_cert", False))
    kwargs.setdefault("timeout", 5.0)
    return httpx2.AsyncClient(base_url=fake.url, verify=ssl_context, trust_env=False, **kwargs)


async def who(host: str, port: int, payload: bytes = b"") -> bytes:
    """Ask a fake in raw mode who it is, send ``payload``, half-close, read all."""
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(b"WHO\n" + payload)
        await stream.send_eof()
        received = b""
        while chunk := await stream.receive_some(65536):
            received += chunk
        return received


async def eventually(condition: Callable[[], bool]) -> None:
    """Wait (2 s at most) until ``condition()`` holds: for state the fake changes itself."""
    with trio.fail_after(2):
        while True:
            if condition():
                return
            await trio.sleep(0.01)


# ------------------------------------------------------------------ /readyz


@pytest.mark.parametrize(
    ("path", "mode", "code", "body_has"),
    [
        ("/readyz", "200", 200, "ok"),
        ("/livez", "200", 200, "ok"),
        ("/healthz", "200", 200, "ok"),
        ("/readyz", "500", 500, "[-]etcd failed"),
        ("/readyz", "slow", 200, "ok"),
    ],
)
async def test_health_endpoints_answer_per_mode(
    start_fake: Any, pki: PkiFiles, path: str, mode: str, code: int, body_has: str
) -> None:
    with trio.fail_after(10):
        fake = await start_fake("a", readyz=mode, readyz_delay=0.2)
        async with client(pki, fake) as http:
            started = trio.current_time()
            response = await http.get(path)
        assert response.status_code == code
        assert body_has in response.text
        if mode == "slow":
            assert trio.current_time() - started >= 0.2
        assert fake.probe_count(path) == 1


async def test_hung_readyz_never_answers_but_keeps_the_connection(
    start_fake: Any, pki: PkiFiles
) -> None:
    with trio.fail_after(10):
        fake = await start_fake("a", readyz="hang")
        async with client(pki, fake, timeout=0.3) as http:
            with pytest.raises(httpx2.ReadTimeout):
                await http.get("/readyz")
        assert fake.probe_count() == 1
        await eventually(lambda: fake.active_connections == 0)  # it saw the client leave


async def test_close_mode_drops_the_connection_without_answering(
    start_fake: Any, pki: PkiFiles
) -> None:
    with trio.fail_after(10):
        fake = await start_fake("a", readyz="close")
        async with client(pki, fake) as http:
            with pytest.raises(httpx2.RemoteProtocolError):
                await http.get("/readyz")


async def test_mode_switches_at_run_time_and_probes_are_timed(
    start_fake: Any, pki: PkiFiles
) -> None:
    with trio.fail_after(10):
        fake = await start_fake("a")
        async with client(pki, fake) as http:
            assert (await http.get("/readyz")).status_code == 200
            fake.readyz = "500"
            assert (await http.get("/readyz")).status_code == 500
            fake.readyz = "200"
            await trio.sleep(0.05)
            assert (await http.get("/readyz")).status_code == 200
        times = fake.probe_times["/readyz"]
        assert len(times) == 3
        assert times[2] - times[1] >= 0.05
        assert fake.connections_total == 1  # keep-alive: one connection for three probes


def test_readyz_mode_is_validated(pki: PkiFiles) -> None:
    with pytest.raises(ValueError, match="readyz"):
        FakeApiServer(name="a", pki=pki, readyz="maybe")


# --------------------------------------------------------------------- auth


async def test_client_cert_required_refuses_anonymous_with_403(
    start_fake: Any, pki: PkiFiles
) -> None:
    with trio.fail_after(10):
        fake = await start_fake("a", require_client_cert=True)
        async with client(pki, fake) as http:
            response = await http.get("/readyz")
        assert response.status_code == 403
        assert response.headers["content-type"] == "application/json"
        body = response.json()
        assert body["kind"] == "Status"
        assert body["code"] == 403
        assert "system:anonymous" in body["message"]
        async with client(pki, fake, client_cert=True) as http:
            assert (await http.get("/readyz")).status_code == 200
        assert fake.requests[-1].user == "system:kap"


async def test_records_the_serial_of_each_connections_client_certificate(
    start_fake: Any, pki: PkiFiles
) -> None:
    from cryptography import x509

    serial = x509.load_pem_x509_certificate(pki.client_cert_file.read_bytes()).serial_number
    with trio.fail_after(10):
        fake = await start_fake("a", require_client_cert=True)
        async with client(pki, fake) as http:
            await http.get("/readyz")
        async with client(pki, fake, client_cert=True) as http:
            await http.get("/readyz")
            await http.get("/readyz")  # the same connection: recorded once
        assert fake.client_cert_serials == [None, serial]


async def test_token_required_refuses_missing_or_wrong_token_with_401(
    start_fake: Any, pki: PkiFiles
) -> None:
    with trio.fail_after(10):
        fake = await start_fake("a", require_token=pki.token)
        async with client(pki, fake) as http:
            assert (await http.get("/readyz")).status_code == 401
            wrong = {"Authorization": "Bearer nope"}
            response = await http.get("/readyz", headers=wrong)
            assert response.status_code == 401
            assert response.json()["reason"] == "Unauthorized"
            right = {"Authorization": f"Bearer {pki.token}"}
            assert (await http.get("/readyz", headers=right)).status_code == 200


async def test_client_cert_from_another_ca_fails_the_handshake(
    start_fake: Any, pki: PkiFiles, tmp_path: Path
) -> None:
    import trustme

    other = trustme.CA().issue_cert("intruder")
    other.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "intruder.pem"))
    ssl_context = pki.client_ssl_context()
    ssl_context.load_cert_chain(tmp_path / "intruder.pem")
    with trio.fail_after(10):
        fake = await start_fake("a", require_client_cert=True)
        async with httpx2.AsyncClient(verify=ssl_context, trust_env=False, timeout=5) as http:
            with pytest.raises(httpx2.HTTPError):
                await http.get(f"{fake.url}/readyz")
        assert fake.probe_count() == 0


# ----------------------------------------------------------------- raw mode


async def test_raw_mode_answers_who_then_echoes_through_half_close(start_fake: Any) -> None:
    with trio.fail_after(10):
        fake = await start_fake("alpha")
        assert fake.address is not None
        assert await who(*fake.address, b"hello") == b"alpha\nhello"
        assert fake.raw_connections == 1


async def test_raw_mode_echoes_when_the_first_bytes_are_not_who(start_fake: Any) -> None:
    with trio.fail_after(10):
        fake = await start_fake("a")
        assert fake.address is not None
        stream = await trio.open_tcp_stream(*fake.address)
        async with stream:
            await stream.send_all(b"WH")  # a prefix of WHO: the fake waits for more
            await trio.sleep(0.05)
            await stream.send_all(b"AT\n")
            assert await stream.receive_some(100) == b"WHAT\n"
            # Half-close: our FIN, then the fake finishes and sends its own.
            await stream.send_all(b"tail")
            await stream.send_eof()
            received = b""
            while chunk := await stream.receive_some(100):
                received += chunk
            assert received == b"tail"


async def test_raw_mode_keeps_echoing_while_the_client_side_is_open(start_fake: Any) -> None:
    with trio.fail_after(10):
        fake = await start_fake("a")
        assert fake.address is not None
        stream = await trio.open_tcp_stream(*fake.address)
        async with stream:
            await stream.send_all(b"WHO\n")
            assert await stream.receive_some(100) == b"a\n"
            for i in range(3):
                await stream.send_all(b"x" * (i + 1))
                assert await stream.receive_some(100) == b"x" * (i + 1)


async def test_several_fakes_share_one_port_on_distinct_loopback_addresses(
    start_fake: Any, free_port: int
) -> None:
    with trio.fail_after(10):
        fakes = [
            await start_fake(name, host=f"127.0.0.{i}", port=free_port)
            for i, name in [(2, "b"), (3, "c"), (4, "d")]
        ]
        assert [f.address for f in fakes] == [(f"127.0.0.{i}", free_port) for i in (2, 3, 4)]
        for i, name in [(2, "b"), (3, "c"), (4, "d")]:
            assert await who(f"127.0.0.{i}", free_port) == f"{name}\n".encode()


async def test_ipv6_loopback(start_fake: Any, pki: PkiFiles) -> None:
    if not _has_ipv6_loopback():
        pytest.skip("no ::1 on this machine")
    with trio.fail_after(10):
        fake = await start_fake("six", host="::1")
        assert fake.url.startswith("https://[::1]:")
        async with client(pki, fake) as http:
            assert (await http.get("/readyz")).text == "ok"
        assert await who("::1", fake.address[1]) == b"six\n"


def _has_ipv6_loopback() -> bool:
    import socket

    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


async def test_stop_closes_the_listener_and_every_connection(pki: PkiFiles) -> None:
    with trio.fail_after(10):
        fake = FakeApiServer(name="a", pki=pki)
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(fake.run)
            stream = await trio.open_tcp_stream(host, port)
            await stream.send_all(b"WHO\n")
            assert await stream.receive_some(100) == b"a\n"
            fake.stop()
        # run() returned: the open connection is closed, new ones are refused.
        assert await stream.receive_some(100) == b""
        await stream.aclose()
        with pytest.raises(OSError):
            await trio.open_tcp_stream(host, port)


async def test_drop_connections_keeps_listening(start_fake: Any) -> None:
    with trio.fail_after(10):
        fake = await start_fake("a")
        stream = await trio.open_tcp_stream(*fake.address)
        async with stream:
            await stream.send_all(b"WHO\n")
            assert await stream.receive_some(100) == b"a\n"
            fake.drop_connections()
            assert await stream.receive_some(100) == b""
        assert await who(*fake.address) == b"a\n"


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


# ------------------------------------------------- EndpointSlices over HTTPS


async def test_list_is_an_endpointslicelist_filtered_by_label(
    start_fake: Any, pki: PkiFiles, slice_store: SliceStore
) -> None:
    slice_store.put(endpoint_slice("kubernetes", [("127.0.0.2", True)]))
    slice_store.put(endpoint_slice("web-abc", [("10.1.0.1", True)], service="web"))
    with trio.fail_after(10):
        fake = await start_fake("a")
        async with client(pki, fake) as http:
            body = (await http.get(f"{SLICES_URL}?{KUBERNETES_SELECTOR}")).json()
            everything = (await http.get(SLICES_URL)).json()
            one = await http.get(f"{SLICES_URL}/kubernetes")
            missing = await http.get(f"{SLICES_URL}/nope")
            bad = await http.get(SLICES_URL, params={"labelSelector": "a in b"})
    assert body["kind"] == "EndpointSliceList"
    assert body["apiVersion"] == "discovery.k8s.io/v1"
    assert body["metadata"]["resourceVersion"] == str(slice_store.resource_version)
    assert [i["metadata"]["name"] for i in body["items"]] == ["kubernetes"]
    assert "kind" not in body["items"][0]  # as kube-apiserver: items carry no kind
    assert len(everything["items"]) == 2
    assert one.json()["kind"] == "EndpointSlice"
    assert one.json()["endpoints"][0]["addresses"] == ["127.0.0.2"]
    assert (missing.status_code, missing.json()["reason"]) == (404, "NotFound")
    assert bad.status_code == 400


async def test_list_failures_and_garbage(
    start_fake: Any, pki: PkiFiles, slice_store: SliceStore
) -> None:
    slice_store.put(endpoint_slice("kubernetes", [("127.0.0.2", True)]))
    for i, item in enumerate(garbage_slices()):
        slice_store.put_raw(f"garbage-{i}", item)
    with trio.fail_after(10):
        fake = await start_fake("a")
        async with client(pki, fake) as http:
            url = f"{SLICES_URL}?{KUBERNETES_SELECTOR}"
            listed = (await http.get(url)).json()
            slice_store.list_error = 500
            failed = await http.get(url)
            slice_store.list_error = None
            slice_store.garbage_next_list = True
            truncated = await http.get(url)
            again = await http.get(url)
    assert len(listed["items"]) == 1 + len(garbage_slices())
    assert failed.status_code == 500
    assert failed.json()["kind"] == "Status"
    assert truncated.status_code == 200
    with pytest.raises(ValueError):
        truncated.json()
    assert again.status_code == 200


async def test_raw_watch_streams_chunked_events_and_bookmarks(
    start_fake: Any, pki: PkiFiles, slice_store: SliceStore
) -> None:
    slice_store.put(endpoint_slice("kubernetes", [("127.0.0.2", True)]))
    slice_store.bookmark_interval = 0.1
    with trio.fail_after(10):
        fake = await start_fake("a")
        params = {
            "labelSelector": "kubernetes.io/service-name=kubernetes",
            "watch": "1",
            "allowWatchBookmarks": "true",
            "timeoutSeconds": "1",
        }
        events = []
        async with (
            client(pki, fake) as http,
            http.stream("GET", SLICES_URL, params=params) as response,
        ):
            assert response.headers["transfer-encoding"] == "chunked"
            async for line in response.aiter_lines():
                events.append(json.loads(line))
                if events[-1]["type"] == "BOOKMARK" and len(events) == 2:
                    slice_store.put(endpoint_slice("kubernetes", [("127.0.0.3", True)]))
                    slice_store.put(endpoint_slice("web", [("10.0.0.1", True)], service="web"))
                    slice_store.delete("kubernetes")
                if events[-1]["type"] == "DELETED":
                    break
    types = [e["type"] for e in events]
    assert types[0] == "ADDED"  # no resourceVersion: the current state first
    assert "BOOKMARK" in types
    bookmark = next(e for e in events if e["type"] == "BOOKMARK")["object"]
    assert bookmark["metadata"]["resourceVersion"] == str(slice_store.resource_version - 3)
    assert types[-2:] == ["MODIFIED", "DELETED"]  # "web" is filtered out


async def test_server_side_watch_timeout_ends_the_stream(
    start_fake: Any, pki: PkiFiles, slice_store: SliceStore
) -> None:
    slice_store.watch_timeout = 0.2
    with trio.fail_after(10):
        fake = await start_fake("a")
        async with client(pki, fake) as http:
            rv = (await http.get(SLICES_URL)).json()["metadata"]["resourceVersion"]
            started = trio.current_time()
            params = {"watch": "true", "resourceVersion": rv}
            async with http.stream("GET", SLICES_URL, params=params) as response:
                assert [line async for line in response.aiter_lines()] == []
            assert 0.2 <= trio.current_time() - started < 2
        assert slice_store.open_watches == 0


# ------------------------------------------------------- lightkube, under trio


def kubeconfig(fake: FakeApiServer, pki: PkiFiles, *, token: bool = False) -> Any:
    """A lightkube KubeConfig for ``fake`` with the client cert (or the token)."""
    from lightkube import KubeConfig

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
    from lightkube import AsyncClient

    clients = []

    def make(fake: FakeApiServer, *, token: bool = False) -> Any:
        kube = AsyncClient(kubeconfig(fake, pki, token=token), trust_env=False)
        clients.append(kube)
        return kube

    yield make
    for kube in clients:
        await kube.close()


KUBERNETES_LABELS = {"kubernetes.io/service-name": "kubernetes"}


async def test_lightkube_lists_then_watches_from_the_list_version(
    start_fake: Any, lightkube_for: Any, slice_store: SliceStore
) -> None:
    from lightkube.resources.discovery_v1 import EndpointSlice

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
    from lightkube.resources.discovery_v1 import EndpointSlice

    slice_store.put(endpoint_slice("kubernetes", [("127.0.0.2", True)]))
    with trio.fail_after(10):
        fake = await start_fake("a", require_token=pki.token)
        kube = lightkube_for(fake, token=True)
        got = await kube.get(EndpointSlice, "kubernetes", namespace="default")
        assert got.ports[0].name == "https"


async def test_410_error_event_is_an_api_error_in_lightkube(
    start_fake: Any, lightkube_for: Any, slice_store: SliceStore
) -> None:
    from lightkube.core.exceptions import ApiError
    from lightkube.resources.discovery_v1 import EndpointSlice

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


async def test_http_410_on_watch_is_not_an_api_error_in_lightkube(
    start_fake: Any, lightkube_for: Any, slice_store: SliceStore
) -> None:
    import httpx2
    from lightkube.core.exceptions import ApiError
    from lightkube.resources.discovery_v1 import EndpointSlice
    from lightkube.types import OnErrorAction, OnErrorResult

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


async def test_lightkube_retry_sleep_is_asyncio_and_fails_under_trio(
    start_fake: Any, lightkube_for: Any, slice_store: SliceStore
) -> None:
    from lightkube.resources.discovery_v1 import EndpointSlice
    from lightkube.types import OnErrorAction, OnErrorResult

    slice_store.http_410_on_watch = True
    with trio.fail_after(10):
        fake = await start_fake("a")
        kube = lightkube_for(fake)
        retry_later = lambda error, count: OnErrorResult(OnErrorAction.RETRY, sleep=0.1)  # noqa: E731
        with pytest.raises(RuntimeError, match="no running event loop"):
            async for _ in kube.watch(EndpointSlice, namespace="default", on_error=retry_later):
                pass


async def test_connection_errors_escape_a_retrying_lightkube_watch(
    start_fake: Any, lightkube_for: Any, slice_store: SliceStore
) -> None:
    import httpx2
    from lightkube.resources.discovery_v1 import EndpointSlice
    from lightkube.types import OnErrorAction, OnErrorResult

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


async def test_lightkube_rewatches_after_a_server_side_timeout(
    start_fake: Any, lightkube_for: Any, slice_store: SliceStore
) -> None:
    from lightkube.resources.discovery_v1 import EndpointSlice

    slice_store.watch_timeout = 0.1
    with trio.fail_after(10):
        fake = await start_fake("a")
        kube = lightkube_for(fake)

        async def change_later() -> None:
            await trio.sleep(0.5)
            slice_store.put(endpoint_slice("kubernetes", [("127.0.0.2", True)]))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(change_later)
            async for kind, _ in kube.watch(EndpointSlice, namespace="default"):
                assert kind == "ADDED"
                break
        assert slice_store.watches_opened >= 3


async def test_stalled_watch_has_no_read_deadline_in_lightkube(
    start_fake: Any, lightkube_for: Any, slice_store: SliceStore
) -> None:
    from lightkube.resources.discovery_v1 import EndpointSlice

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


async def test_one_bad_item_fails_a_whole_typed_lightkube_list(
    start_fake: Any, lightkube_for: Any, slice_store: SliceStore
) -> None:
    import msgspec
    from lightkube.resources.discovery_v1 import EndpointSlice

    slice_store.put(endpoint_slice("kubernetes", [("127.0.0.2", True)]))
    slice_store.put_raw("bad", garbage_slices()[1])
    with trio.fail_after(10):
        fake = await start_fake("a")
        kube = lightkube_for(fake)
        with pytest.raises(msgspec.ValidationError):
            _ = [s async for s in kube.list(EndpointSlice, namespace="default")]


async def test_several_fakes_serve_one_shared_store(
    start_fake: Any, lightkube_for: Any, slice_store: SliceStore, free_port: int
) -> None:
    from lightkube.resources.discovery_v1 import EndpointSlice

    with trio.fail_after(10):
        b = await start_fake("b", host="127.0.0.2", port=free_port)
        c = await start_fake("c", host="127.0.0.3", port=free_port)
        slice_store.put(endpoint_slice("kubernetes", [("127.0.0.2", True), ("127.0.0.3", True)]))
        for fake in (b, c):
            got = await lightkube_for(fake).get(EndpointSlice, "kubernetes", namespace="default")
            assert [e.addresses[0] for e in got.endpoints] == ["127.0.0.2", "127.0.0.3"]


# ------------------------------------------------------------------- kubectl


async def test_kubectl_gets_endpointslices_and_raw_readyz(
    start_fake: Any, pki: PkiFiles, slice_store: SliceStore, kubectl: Path, tmp_path: Path
) -> None:
    slice_store.put(endpoint_slice("kubernetes", [("127.0.0.2", True)]))
    with trio.fail_after(30):
        fake = await start_fake("a", require_client_cert=True)
        base = [
            str(kubectl),
            *("--server", fake.url),
            *("--certificate-authority", str(pki.ca_file)),
            *("--client-certificate", str(pki.client_cert_file)),
            *("--client-key", str(pki.client_key_file)),
            *("--cache-dir", str(tmp_path / "cache")),
            *("--kubeconfig", str(tmp_path / "kubeconfig")),  # nothing from ~/.kube
        ]
        (tmp_path / "kubeconfig").write_text("apiVersion: v1\nkind: Config\n")
        table = await trio.run_process(
            [*base, "get", "endpointslices", "-n", "default"], capture_stdout=True
        )
        as_json = await trio.run_process(
            [*base, "get", "endpointslices", "-n", "default", "kubernetes", "-o", "json"],
            capture_stdout=True,
        )
        readyz = await trio.run_process([*base, "get", "--raw", "/readyz"], capture_stdout=True)
        fake.readyz = "500"
        failing = await trio.run_process(
            [*base, "get", "--raw", "/readyz"], check=False, capture_stderr=True
        )
    assert table.stdout.split()[:3] == [b"NAME", b"AGE", b"kubernetes"]
    assert json.loads(as_json.stdout)["endpoints"][0]["addresses"] == ["127.0.0.2"]
    assert readyz.stdout.strip() == b"ok"
    assert failing.returncode != 0


# ------------------------------------------------------------ subprocess mode


async def test_subprocess_prints_its_ready_line_and_dies_on_sigkill(
    pki: PkiFiles, free_port: int
) -> None:
    with trio.fail_after(20):
        async with fake_api_process("p", pki, host="127.0.0.2", port=free_port) as proc:
            assert (proc.host, proc.port) == ("127.0.0.2", free_port)
            assert await who(proc.host, proc.port) == b"p\n"
            ssl_context = pki.client_ssl_context()
            async with httpx2.AsyncClient(verify=ssl_context, trust_env=False) as http:
                assert (await http.get(f"{proc.url}/readyz")).text == "ok"
            proc.kill()
            assert await proc.process.wait() == -signal.SIGKILL
            with pytest.raises(OSError):
                await trio.open_tcp_stream(proc.host, proc.port)


async def test_stopped_subprocess_accepts_tcp_but_never_answers(pki: PkiFiles) -> None:
    with trio.fail_after(20):
        async with fake_api_process("p", pki) as proc:
            proc.pause()
            stream = await trio.open_tcp_stream(proc.host, proc.port)  # the kernel accepts
            async with stream:
                await stream.send_all(b"WHO\n")
                with trio.move_on_after(0.3) as silent:
                    await stream.receive_some(100)
                assert silent.cancelled_caught
                proc.resume()
                assert await stream.receive_some(100) == b"p\n"


async def test_subprocess_serves_and_follows_a_slices_file(pki: PkiFiles, tmp_path: Path) -> None:
    path = tmp_path / "slices.json"
    write_slices_file(path, [endpoint_slice("kubernetes", [("127.0.0.2", True)])])
    args = ["--slices-file", str(path), "--readyz", "500"]
    with trio.fail_after(20):
        async with (
            fake_api_process("p", pki, extra_args=args) as proc,
            httpx2.AsyncClient(verify=pki.client_ssl_context(), trust_env=False) as http,
        ):
            assert (await http.get(f"{proc.url}/readyz")).status_code == 500
            listed = (await http.get(f"{proc.url}{SLICES_URL}")).json()
            assert [s["metadata"]["name"] for s in listed["items"]] == ["kubernetes"]
            write_slices_file(path, [endpoint_slice("k2", [("127.0.0.3", True)])])
            while True:
                listed = (await http.get(f"{proc.url}{SLICES_URL}")).json()
                if [s["metadata"]["name"] for s in listed["items"]] == ["k2"]:
                    break
                await trio.sleep(0.05)


def test_cli_runs_as_a_module_from_the_repository(pki: PkiFiles) -> None:
    """``python -m tests.fakeapi`` (what other tests and the demo may call)."""
    with subprocess.Popen(
        [sys.executable, "-m", "tests.fakeapi", "--name", "m", "--ca-dir", str(pki.dir)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": ""},
    ) as proc:
        try:
            assert proc.stdout is not None
            ready = json.loads(proc.stdout.readline())
            assert ready["ready"] is True
            assert ready["host"] == "127.0.0.1"
            assert ready["port"] > 0
        finally:
            proc.kill()
            proc.wait(timeout=5)
