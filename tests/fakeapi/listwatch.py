"""LIST and WATCH of EndpointSlices over HTTP/1.1, as kube-apiserver serves them.

A LIST is counted by how kube-apiserver would serve it (from its watch cache,
or as a consistent read from etcd) and answers the store's current version.
A WATCH is chunked NDJSON: a backlog from the asked resourceVersion (or
ADDED for every object), then live changes and, when asked, BOOKMARKs; it
ends with an ERROR event (410 Expired) when the version is compacted, at a
server-side timeout, or when the client goes away. The store's knobs
(``list_error``, ``garbage_next_list``, ``http_410_on_watch``,
``watch_timeout``, ``stall_watches``, ``bookmark_interval``) turn on the
faults kap's discovery must survive.
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import attrs
import h11
import trio

from .objects import GROUP, GROUP_VERSION, bookmark, labels_of, status
from .selection import Selection, SelectorError
from .store import SliceStore, Subscription, WatchEvent
from .wire import conn_send, send, send_json, watch_for_close

MAX_WATCH_SECONDS = 1800.0  # kube-apiserver's --min-request-timeout default


async def serve_slices(
    conn: h11.Connection,
    tls: trio.abc.Stream,
    store: SliceStore,
    namespace: str | None,
    name: str | None,
    query: dict[str, str],
) -> None:
    """GET one slice, LIST them, or WATCH them, as the query asks."""
    try:
        selection = Selection.from_query(namespace, query)
    except SelectorError as e:
        await send_json(conn, tls, 400, status(400, "BadRequest", str(e)))
        return
    if name is not None:
        obj = store.get(name, namespace or "default")
        if obj is None:
            msg = f'endpointslices.{GROUP} "{name}" not found'
            body = status(404, "NotFound", msg, name=name, group=GROUP, kind="endpointslices")
            await send_json(conn, tls, 404, body)
        else:
            await send_json(conn, tls, 200, obj)
        return
    if query.get("watch") in ("true", "1"):
        await watch(conn, tls, store, selection, query)
        return
    store.lists_served += 1
    if query.get("resourceVersion", "") == "" or query.get("resourceVersionMatch") == "Exact":
        store.lists_consistent += 1
    else:
        store.lists_from_cache += 1
    if store.list_error is not None:
        code = store.list_error
        await send_json(conn, tls, code, status(code, "InternalError", "etcdserver: timeout"))
        return
    if store.garbage_next_list:
        store.garbage_next_list = False
        body = b'{"kind":"EndpointSliceList","apiVersion":"discovery.k8s.io/v1","items":[{"metad'
        await send(conn, tls, 200, body, "application/json")
        return
    items = []
    for obj in store.items():
        if selection.sees(obj):
            item = copy.copy(obj)
            if isinstance(item, dict) and labels_of(item) is not None:
                # kube-apiserver omits kind/apiVersion on the items of a typed list.
                item.pop("kind", None)
                item.pop("apiVersion", None)
            items.append(item)
    body_obj = {
        "kind": "EndpointSliceList",
        "apiVersion": GROUP_VERSION,
        "metadata": {"resourceVersion": str(store.resource_version)},
        "items": items,
    }
    await send_json(conn, tls, 200, body_obj)


async def watch(
    conn: h11.Connection,
    tls: trio.abc.Stream,
    store: SliceStore,
    selection: Selection,
    query: dict[str, str],
) -> None:
    """Stream events as chunked NDJSON until timeout, 410, the client or stop()."""
    if store.http_410_on_watch:
        msg = "too old resource version: 1 (2)"
        await send_json(conn, tls, 410, status(410, "Expired", msg))
        return
    rv_param = query.get("resourceVersion", "")
    since = int(rv_param) if rv_param.isdigit() and rv_param != "0" else None
    timeout = MAX_WATCH_SECONDS
    if query.get("timeoutSeconds", "").isdigit():
        timeout = min(timeout, float(query["timeoutSeconds"]))
    if store.watch_timeout is not None:
        timeout = min(timeout, store.watch_timeout)
    headers = [
        ("Content-Type", "application/json"),
        ("Transfer-Encoding", "chunked"),
        ("Cache-Control", "no-cache, private"),
        # Watching for the client's FIN reads the connection outside h11,
        # so the connection is not reused after the stream.
        ("Connection", "close"),
    ]
    await conn_send(conn, tls, h11.Response(status_code=200, headers=headers, reason=b"OK"))
    stream = WatchStream(
        conn, tls, selection, store, query.get("allowWatchBookmarks") in ("true", "1")
    )
    subscription = store.subscribe(since)
    if subscription is None:
        msg = f"too old resource version: {since} ({store.compacted_rv})"
        await stream.send("ERROR", status(410, "Expired", msg))
        await conn_send(conn, tls, h11.EndOfMessage())
        return
    client_gone = trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_for_close, tls, client_gone, nursery.cancel_scope)
            with trio.move_on_after(timeout) as deadline:
                await stream.follow(subscription, deadline)
            nursery.cancel_scope.cancel()
    except* (trio.BrokenResourceError, trio.ClosedResourceError):
        # The client reset the connection while an event was on its way
        # (before watch_for_close saw it): the watch is over, not the fake.
        client_gone.set()
    finally:
        store.unsubscribe(subscription)
    if not client_gone.is_set():
        await conn_send(conn, tls, h11.EndOfMessage())


@attrs.define
class WatchStream:
    """The body of one watch response, written as kube-apiserver writes it."""

    conn: h11.Connection
    tls: trio.abc.Stream
    selection: Selection
    store: SliceStore
    bookmarks: bool

    async def follow(self, sub: Subscription, deadline: trio.CancelScope) -> None:
        """Backlog, then live events (and bookmarks) until 410 or the channel ends."""
        for event in sub.backlog:
            await self._stall_if_asked(deadline)
            await self.send_change(event)
        while True:
            event = None
            with trio.move_on_after(self.store.bookmark_interval if self.bookmarks else math.inf):
                try:
                    event = await sub.receive.receive()
                except trio.EndOfChannel:
                    return
            await self._stall_if_asked(deadline)
            if event is None:
                await self.send("BOOKMARK", bookmark(self.store.resource_version))
            elif event.type == "ERROR":
                msg = f"too old resource version: {event.rv} ({self.store.resource_version})"
                await self.send("ERROR", status(410, "Expired", msg))
                return
            else:
                await self.send_change(event)

    async def _stall_if_asked(self, deadline: trio.CancelScope) -> None:
        """A stalled watch sends nothing and never times out; the client must notice."""
        if self.store.stall_watches:
            deadline.deadline = trio.current_time() + MAX_WATCH_SECONDS
            await trio.sleep_forever()

    async def send_change(self, event: WatchEvent) -> None:
        """Send a change as this watch sees it: a label moving in is ADDED, out DELETED."""
        now = self.selection.sees(event.obj)
        before = event.prev is not None and self.selection.sees(event.prev)
        kind = event.type
        if kind == "MODIFIED" and now != before:
            kind = "ADDED" if now else "DELETED"
        if before if kind == "DELETED" else now:
            await self.send(kind, event.obj)

    async def send(self, kind: str, obj: Any) -> None:
        line = json.dumps({"type": kind, "object": obj}, separators=(",", ":")) + "\n"
        await conn_send(self.conn, self.tls, h11.Data(data=line.encode()))
