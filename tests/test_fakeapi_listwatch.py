"""LIST and WATCH of EndpointSlices over HTTPS (tests/fakeapi/listwatch.py), and kubectl.

Every test is bounded by ``trio.fail_after``: a fake that hangs fails the
test, it never stalls the suite.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio
from fakeapi import PkiFiles, SliceStore, endpoint_slice, garbage_slices
from fakeapitest import KUBERNETES_SELECTOR, SLICES_URL, client

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
