"""kap's adapters to lightkube: tolerant items, each WATCH seen, errors in one line.

Watch lines and error descriptions as tables (no I/O); list and watch against
a fake apiserver with real TLS. lightkube's own traps are in
test_lightkube_traps.py.
"""

from __future__ import annotations

from typing import Any

import httpx2
import pytest
import trio
from fakeapi import FakeApiServer, PkiFiles, SliceStore, endpoint_slice, garbage_slices
from kaptest import StartFake

from kap.address import Address
from kap.apiclient import Gone, RequestError, _event, describe, list_slices, open_client
from kap.apiclient import watch_slices as watch
from kap.config import Credentials
from kap.credentials import CredentialFiles

LABELS = {"kubernetes.io/service-name": "kubernetes"}
SLICE = {"metadata": {"name": "k", "resourceVersion": "7"}}


@pytest.mark.parametrize(
    ("line", "event"),
    [
        ('{"type": "ADDED", "object": {"metadata": {"resourceVersion": "7"}}}',
         ("ADDED", {"metadata": {"resourceVersion": "7"}}, "7")),
        ('{"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "9"}}}',
         ("BOOKMARK", {"metadata": {"resourceVersion": "9"}}, "9")),
        ('{"type": "MODIFIED", "object": 3}', ("MODIFIED", 3, None)),  # a bad item: kept
    ],
)  # fmt: skip
def test_a_watch_line_is_its_type_object_and_version(line: str, event: tuple[Any, ...]) -> None:
    assert _event(line) == event


@pytest.mark.parametrize(
    ("line", "error", "says"),
    [
        ('{"type": "ERROR", "object": {"code": 410, "message": "too old"}}', Gone, ""),
        ('{"type": "ERROR", "object": {"code": 500, "message": "etcd\\n down"}}', RequestError,
         "watch failed: HTTP 500: etcd down"),
        ('{"type": "ERROR", "object": "boom"}', RequestError, "watch failed: HTTP None: boom"),
        ('{"type": 1}', RequestError, "not a watch event"),
        ("[]", RequestError, "not a watch event"),
        ('{"type": "ADDED", "obj', RequestError, "watch failed: "),
    ],
)  # fmt: skip
def test_a_bad_or_error_line_is_an_exception(line: str, error: type, says: str) -> None:
    with pytest.raises(error) as raised:
        _event(line)
    assert says in str(raised.value) and "\n" not in str(raised.value)


def test_describe_is_one_line_with_the_status() -> None:
    request = httpx2.Request("GET", "https://a/")
    response = httpx2.Response(503, request=request)
    error = httpx2.HTTPStatusError("x", request=request, response=response)
    assert describe(error) == "HTTP 503"
    assert "\n" not in describe(OSError(111, "Connection\nrefused"))


def client_files(pki: PkiFiles) -> CredentialFiles:
    return CredentialFiles(
        Credentials(ca_file=str(pki.ca_file), token_file=str(pki.token_file), origin="flags")
    )


def where(fake: FakeApiServer) -> Address:
    assert fake.address is not None
    return Address(*fake.address)


async def test_a_list_keeps_every_item_as_it_came_and_the_token_is_sent(
    start_fake: StartFake, pki: PkiFiles, slice_store: SliceStore
) -> None:
    slice_store.put(endpoint_slice("kubernetes", [("127.0.0.2", True)]))
    slice_store.put_raw("bad", garbage_slices()[1])
    fake = await start_fake("a", require_token=pki.token)
    with trio.fail_after(10):
        async with open_client(where(fake), client_files(pki), "", "default") as client:
            items, version = await list_slices(client, "default", {}, None)
    assert version == str(slice_store.resource_version)
    assert len(items) == 2  # the garbage one too: kap.slices skips it with a log line
    assert {r.user for r in fake.requests} == {"system:serviceaccount:kube-system:kap"}


async def test_a_refused_list_is_one_request_error_line(
    start_fake: StartFake, pki: PkiFiles, slice_store: SliceStore
) -> None:
    slice_store.list_error = 500
    fake = await start_fake("a")
    with trio.fail_after(10):
        async with open_client(where(fake), client_files(pki), "", "default") as client:
            with pytest.raises(RequestError, match=r"^list failed: HTTP 500") as raised:
                await list_slices(client, "default", LABELS, "0")
    assert "\n" not in str(raised.value)


async def test_a_watch_yields_the_changes_since_its_version_and_ends_with_the_server(
    start_fake: StartFake, pki: PkiFiles, slice_store: SliceStore
) -> None:
    slice_store.put(endpoint_slice("kubernetes", [("127.0.0.2", True)]))
    start = str(slice_store.resource_version)
    slice_store.put(endpoint_slice("kubernetes", [("127.0.0.3", True)]))
    slice_store.watch_timeout = 0.2  # the server ends every watch after this
    fake = await start_fake("a")
    with trio.fail_after(10):
        async with open_client(where(fake), client_files(pki), "", "default") as client:
            seen = [
                (kind, version)
                async for kind, _obj, version in watch(client, "default", LABELS, start, 5)
            ]
    assert seen == [("MODIFIED", str(int(start) + 1))]
    assert slice_store.watches_opened == 1  # not reopened behind the caller's back
    (target,) = [r.target for r in fake.requests if "watch=true" in r.target]
    assert "allowWatchBookmarks=true" in target and "timeoutSeconds=5" in target


@pytest.mark.parametrize("how", ["http", "event"])
async def test_410_as_http_or_as_an_event_is_gone(
    start_fake: StartFake, pki: PkiFiles, slice_store: SliceStore, how: str
) -> None:
    slice_store.put(endpoint_slice("kubernetes", [("127.0.0.2", True)]))
    if how == "http":
        slice_store.http_410_on_watch = True
    else:
        slice_store.compact()
    fake = await start_fake("a")
    with trio.fail_after(10):
        async with open_client(where(fake), client_files(pki), "", "default") as client:
            with pytest.raises(Gone):
                async for _ in watch(client, "default", LABELS, "1", 5):
                    pass
