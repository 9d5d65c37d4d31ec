"""The control plane's EndpointSlices: one store shared by the fakes, as etcd is.

It keeps objects, one global resourceVersion, a history of changes that
compaction trims, and the watches' channels it fans each change out to.
It does no I/O: the list/watch handlers (``listwatch.py``) read it, tests
write it, and ``tests/test_fakeapi_store.py`` checks it without a socket.

Rules that keep it honest: every change bumps the resourceVersion by one and
is recorded before it is fanned out; a watch's backlog and live channel are
taken in one synchronous step, so no change falls between them; a watch that
cannot keep up is dropped, as kube-apiserver drops it.
"""

from __future__ import annotations

import copy
import datetime
import uuid
from collections.abc import Iterable
from typing import Any

import attrs
import trio

from .objects import name_of

WATCH_BUFFER = 1000  # events queued per watch before it is dropped as too slow


@attrs.frozen
class WatchEvent:
    """One change in the store; ``prev`` lets a watch translate label moves."""

    rv: int
    type: str
    obj: Any
    prev: Any = None


@attrs.define
class SliceStore:
    """The control plane's EndpointSlices, shared by every fake that serves them.

    Each change bumps one global resourceVersion and is fanned out to every
    open watch, as etcd and the watch cache do. Attributes are the test knobs:

    Attributes:
      list_error: HTTP status every list answers with (e.g. 500) instead of a list.
      garbage_next_list: the next list body is truncated JSON (then resets).
      http_410_on_watch: watches are refused with HTTP 410 (not an event).
      watch_timeout: server-side end of every watch after this many seconds.
      stall_watches: watches stay open and send nothing at all, not even bookmarks.
      bookmark_interval: seconds between BOOKMARKs for ``allowWatchBookmarks``.
    """

    resource_version: int = 100
    compacted_rv: int = 0
    list_error: int | None = None
    garbage_next_list: bool = False
    http_410_on_watch: bool = False
    watch_timeout: float | None = None
    stall_watches: bool = False
    bookmark_interval: float = 60.0
    lists_served: int = attrs.field(init=False, default=0)
    watches_opened: int = attrs.field(init=False, default=0)
    # LISTs by how kube-apiserver serves them: from its watch cache
    # (resourceVersion "0", or a version with resourceVersionMatch=NotOlderThan)
    # or as a consistent read (no resourceVersion: one etcd read each).
    lists_from_cache: int = attrs.field(init=False, default=0)
    lists_consistent: int = attrs.field(init=False, default=0)
    _objects: dict[tuple[str, str], Any] = attrs.field(init=False, factory=dict)
    _history: list[WatchEvent] = attrs.field(init=False, factory=list)
    _watchers: set[trio.MemorySendChannel[WatchEvent]] = attrs.field(init=False, factory=set)

    def put(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create or replace a slice; returns the stored copy with its metadata."""
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        meta.setdefault("namespace", "default")
        key = (meta["namespace"], meta["name"])
        prev = self._objects.get(key)
        self.resource_version += 1
        meta["resourceVersion"] = str(self.resource_version)
        if prev is None:
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", _now_rfc3339())
            meta["generation"] = 1
        else:
            prev_meta = prev.get("metadata", {}) if isinstance(prev, dict) else {}
            meta["uid"] = prev_meta.get("uid", str(uuid.uuid4()))
            meta["creationTimestamp"] = prev_meta.get("creationTimestamp", _now_rfc3339())
            meta["generation"] = int(prev_meta.get("generation", 1)) + 1
        self._objects[key] = obj
        self._publish(WatchEvent(self.resource_version, _change(prev), obj, prev))
        return obj

    def put_raw(self, key: str, obj: Any) -> None:
        """Serve ``obj`` verbatim (no metadata added) in lists and watch events.

        For garbage: it is listed whatever the label selector says.
        """
        prev = self._objects.get(("", key))
        self.resource_version += 1
        self._objects[("", key)] = obj
        self._publish(WatchEvent(self.resource_version, _change(prev), obj, prev))

    def delete(self, name: str, namespace: str = "default") -> None:
        """Delete a slice (or a raw item by its key); unknown names are ignored."""
        key = (namespace, name) if (namespace, name) in self._objects else ("", name)
        prev = self._objects.pop(key, None)
        if prev is None:
            return
        self.resource_version += 1
        obj = copy.deepcopy(prev)
        if isinstance(obj, dict) and isinstance(obj.get("metadata"), dict):
            obj["metadata"]["resourceVersion"] = str(self.resource_version)
        self._publish(WatchEvent(self.resource_version, "DELETED", obj, prev))

    def replace_all(self, objs: Iterable[dict[str, Any]]) -> None:
        """Make the store hold exactly ``objs``; unchanged slices keep their version."""
        wanted = {name_of(o): o for o in objs}
        for key in list(self._objects):
            if key not in wanted:
                self.delete(key[1], key[0])
        for key, obj in wanted.items():
            current = self._objects.get(key)
            if current is None or _strip_server_fields(current) != _strip_server_fields(obj):
                self.put(obj)

    def get(self, name: str, namespace: str = "default") -> Any:
        return self._objects.get((namespace, name))

    def items(self) -> list[Any]:
        return list(self._objects.values())

    def compact(self, rv: int | None = None) -> None:
        """Forget history up to ``rv`` (default: now); older watches get 410."""
        self.compacted_rv = self.resource_version if rv is None else rv
        self._history = [e for e in self._history if e.rv > self.compacted_rv]

    def watch_410_event(self) -> None:
        """Send every open watch an ERROR event (410 Expired); the watch then ends."""
        self._publish(WatchEvent(self.resource_version, "ERROR", None), record=False)

    def end_watches(self) -> None:
        """End every open watch cleanly, as an apiserver restarting its watch cache."""
        for ch in list(self._watchers):
            ch.close()
        self._watchers.clear()

    @property
    def open_watches(self) -> int:
        return len(self._watchers)

    def _publish(self, event: WatchEvent, *, record: bool = True) -> None:
        if record:
            self._history.append(event)
        for ch in list(self._watchers):
            try:
                ch.send_nowait(event)
            except (trio.WouldBlock, trio.BrokenResourceError):
                # kube-apiserver drops watchers that cannot keep up.
                ch.close()
                self._watchers.discard(ch)

    def subscribe(self, since: int | None) -> Subscription | None:
        """Backlog and live channel of a watch, or None when ``since`` is compacted.

        Synchronous on purpose: no change can slip between backlog and channel.
        """
        if since is not None and since < self.compacted_rv:
            return None
        if since is None:
            backlog = [
                WatchEvent(int(_rv_of(o, self.resource_version)), "ADDED", o)
                for o in self._objects.values()
            ]
        else:
            backlog = [e for e in self._history if e.rv > since]
        send, receive = trio.open_memory_channel[WatchEvent](WATCH_BUFFER)
        self._watchers.add(send)
        self.watches_opened += 1
        return Subscription(backlog, send, receive)

    def unsubscribe(self, sub: Subscription) -> None:
        self._watchers.discard(sub.send)
        sub.send.close()
        sub.receive.close()


@attrs.frozen
class Subscription:
    """A watch's start: the changes it asked to replay, then its live channel."""

    backlog: list[WatchEvent]
    send: trio.MemorySendChannel[WatchEvent]
    receive: trio.MemoryReceiveChannel[WatchEvent]


def _now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _change(prev: Any) -> str:
    return "ADDED" if prev is None else "MODIFIED"


def _rv_of(obj: Any, default: int) -> str:
    if isinstance(obj, dict) and isinstance(obj.get("metadata"), dict):
        return str(obj["metadata"].get("resourceVersion", default))
    return str(default)


def _strip_server_fields(obj: Any) -> Any:
    obj = copy.deepcopy(obj)
    if isinstance(obj, dict) and isinstance(obj.get("metadata"), dict):
        for f in ("resourceVersion", "uid", "creationTimestamp", "generation"):
            obj["metadata"].pop(f, None)
    return obj
