"""A fake kube-apiserver: the upstream every kap test talks to.

kap sees an apiserver three ways, and the fake serves all three on one port:

* as a TCP peer for client traffic: a connection whose first byte is not a TLS
  ClientHello (0x16) is in *raw mode*: ``WHO\\n`` answers the fake's name, and
  everything else is echoed back, half-close included, so a data-path test sees
  which upstream served it and that FIN travels both ways;
* as an HTTPS ``/readyz`` (``/livez``, ``/healthz``) for kap's probes, whose
  behaviour tests switch at run time (``200``, ``500``, ``slow``, ``hang``,
  ``close``) and whose arrivals are timed so probe spacing can be checked;
* as the API that serves ``discovery.k8s.io/v1`` EndpointSlices, listed and
  watched the way kube-apiserver does it, with the faults discovery must
  survive (410 as an event and as an HTTP status, compaction, server-side
  watch timeouts, stalled watches, garbage and failing lists).

Several fakes may share one :class:`SliceStore`, as the apiservers of one
control plane share etcd, and may listen on ``127.0.0.2:P``, ``127.0.0.3:P``...
with one port ``P``, as the addresses of an EndpointSlice do.

The fake runs in-process (``await nursery.start(fake.run)``) or as a process
(``python -m tests.fakeapi --help``) that tests can SIGKILL or SIGSTOP; a
stopped process is the "hung apiserver whose kernel still accepts TCP".

Rules that keep it honest: no threads; one task per connection, cancelled by
:meth:`FakeApiServer.stop`; every wait ends when the client goes away, the
fake stops, or a deadline passes.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import functools
import ipaddress
import json
import math
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs
import h11
import trio

try:  # tests/ on the path: pytest, and run as a script
    from fakeh2 import H2ServerConnection
except ModuleNotFoundError:  # python -m tests.fakeapi
    from tests.fakeh2 import H2ServerConnection

READYZ_MODES = ("200", "500", "slow", "hang", "close")
HEALTH_PATHS = ("/readyz", "/livez", "/healthz")
TLS_HANDSHAKE_BYTE = 0x16
WHO = b"WHO\n"

HANDSHAKE_TIMEOUT = 10.0  # generous: a loaded 2-core CI box still handshakes in ms
IDLE_TIMEOUT = 120.0  # an idle keep-alive connection is closed after this
MAX_WATCH_SECONDS = 1800.0  # kube-apiserver's --min-request-timeout default
WATCH_BUFFER = 1000  # events queued per watch before it is dropped as too slow
RECEIVE_SIZE = 65536
SLICES_FILE_POLL = 0.1  # seconds between checks of --slices-file

GROUP = "discovery.k8s.io"
GROUP_VERSION = "discovery.k8s.io/v1"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
_SLICES_PATH = re.compile(
    r"^/apis/discovery\.k8s\.io/v1/(?:namespaces/(?P<ns>[^/]+)/)?endpointslices(?:/(?P<name>[^/]+))?$"
)

# File names inside a PKI directory (what conftest writes and --ca-dir reads).
CA_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"  # lets a test issue more certificates (expired, rotated)
SERVER_CERT_FILE = "server.crt"
SERVER_KEY_FILE = "server.key"
CLIENT_CERT_FILE = "cl.crt"
CLIENT_KEY_FILE = "cl.key"
TOKEN_FILE = "token"

_THIS_FILE = Path(__file__).resolve()  # run as a script by fake_api_process


# --------------------------------------------------------------------------- PKI


@attrs.frozen
class PkiFiles:
    """The certificate files of a test control plane, all in one directory.

    The server certificate is valid for ``kubernetes.default.svc``,
    ``kubernetes``, ``localhost``, 127.0.0.1..127.0.0.9 and ::1; the client
    certificate (CN ``system:kap``, O ``kap:nodes``) is issued by the same CA.
    """

    dir: Path

    @property
    def ca_file(self) -> Path:
        return self.dir / CA_FILE

    @property
    def server_cert_file(self) -> Path:
        return self.dir / SERVER_CERT_FILE

    @property
    def server_key_file(self) -> Path:
        return self.dir / SERVER_KEY_FILE

    @property
    def client_cert_file(self) -> Path:
        return self.dir / CLIENT_CERT_FILE

    @property
    def client_key_file(self) -> Path:
        return self.dir / CLIENT_KEY_FILE

    @property
    def token_file(self) -> Path:
        return self.dir / TOKEN_FILE

    @property
    def token(self) -> str:
        return self.token_file.read_text().strip()

    def server_ssl_context(self) -> ssl.SSLContext:
        """TLS as kube-apiserver does it: client certificates asked for, not required.

        Whether a request without one is refused is decided per request (403),
        not at the handshake, so kap can tell "alive but refused" from "dead".
        """
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self.ca_file))
        ctx.load_cert_chain(self.server_cert_file, self.server_key_file)
        ctx.verify_mode = ssl.CERT_OPTIONAL
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx

    def client_ssl_context(self, *, client_cert: bool = False) -> ssl.SSLContext:
        """A client context trusting the test CA, optionally presenting ``cl.crt``."""
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        if client_cert:
            ctx.load_cert_chain(self.client_cert_file, self.client_key_file)
        return ctx


# What a kubeadm apiserver certificate carries, plus the loopback addresses
# tests run fake apiservers on (127.0.0.1..9 share one port, as slices do).
SERVER_NAMES = (
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
    "localhost",
    *(f"127.0.0.{i}" for i in range(1, 10)),
    "::1",
)


def create_pki(directory: Path) -> PkiFiles:
    """Write a trustme CA, a server and a client certificate and a token into ``directory``.

    The client certificate has CN ``system:kap`` and O ``kap:nodes``, as a
    node's static pod would hold.
    """
    import secrets

    import trustme

    ca = trustme.CA(organization_name="kap test CA")
    ca.cert_pem.write_to_path(str(directory / CA_FILE))
    ca.private_key_pem.write_to_path(str(directory / CA_KEY_FILE))
    server = ca.issue_cert(*SERVER_NAMES, common_name="kube-apiserver")
    server.cert_chain_pems[0].write_to_path(str(directory / SERVER_CERT_FILE))
    server.private_key_pem.write_to_path(str(directory / SERVER_KEY_FILE))
    client = ca.issue_cert("kap.test", common_name="system:kap", organization_name="kap:nodes")
    client.cert_chain_pems[0].write_to_path(str(directory / CLIENT_CERT_FILE))
    client.private_key_pem.write_to_path(str(directory / CLIENT_KEY_FILE))
    (directory / TOKEN_FILE).write_text(f"kap-test-{secrets.token_hex(16)}\n")
    return PkiFiles(directory)


# ------------------------------------------------------------------ EndpointSlices


def endpoint_slice(
    name: str,
    endpoints: Iterable[tuple[str, bool]],
    *,
    ports: Iterable[tuple[str | None, int]] = (("https", 6443),),
    service: str = "kubernetes",
    namespace: str = "default",
    address_type: str | None = None,
) -> dict[str, Any]:
    """An EndpointSlice dict as kube-apiserver serves it for ``default/kubernetes``.

    Args:
      endpoints: ``(ip, ready)`` pairs, one endpoint each.
      ports: ``(name, port)`` pairs; a ``None`` name leaves the port unnamed.
      address_type: ``IPv4``/``IPv6``; guessed from the first address when unset.
    """
    endpoints = list(endpoints)
    if address_type is None:
        first = endpoints[0][0] if endpoints else "0.0.0.0"
        address_type = f"IPv{ipaddress.ip_address(first).version}"
    port_list = []
    for port_name, port in ports:
        entry: dict[str, Any] = {"protocol": "TCP", "port": port}
        if port_name is not None:
            entry["name"] = port_name
        port_list.append(entry)
    return {
        "kind": "EndpointSlice",
        "apiVersion": GROUP_VERSION,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                SERVICE_NAME_LABEL: service,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "addressType": address_type,
        "endpoints": [
            {"addresses": [ip], "conditions": {"ready": ready}} for ip, ready in endpoints
        ],
        "ports": port_list,
    }


def garbage_slices(name_prefix: str = "bad") -> list[Any]:
    """Invalid items, each labelled so a label-selected list still returns it.

    Every one of them must be skipped (and logged) by kap's parser without
    losing the valid items around it.
    """
    labels = {SERVICE_NAME_LABEL: "kubernetes"}

    def meta(suffix: str) -> dict[str, Any]:
        return {"name": f"{name_prefix}-{suffix}", "namespace": "default", "labels": labels}

    return [
        {"kind": "EndpointSlice", "metadata": meta("no-fields")},
        {"metadata": meta("wrong-types"), "addressType": 4, "endpoints": "10.0.0.1", "ports": 6443},
        {
            "metadata": meta("bad-endpoint"),
            "addressType": "IPv4",
            "endpoints": [{"addresses": [12345]}, None, {"conditions": "yes"}],
            "ports": [{"name": "https", "port": "https"}],
        },
        {
            "metadata": meta("bad-address"),
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["not-an-ip", "999.1.1.1"]}],
            "ports": [{"name": "https", "port": 70000}],
        },
        {
            "metadata": meta("huge"),
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": [f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}"]}
                for i in range(20000)
            ],
            "ports": [{"name": "https", "port": 6443}],
        },
        "not an object",
        None,
    ]


class SelectorError(ValueError):
    """A label selector the fake (and kube-apiserver) cannot parse."""


_REQUIREMENT = re.compile(
    r"^\s*(?:(?P<not>!)\s*(?P<nkey>[\w./-]+)"
    r"|(?P<key>[\w./-]+)\s*(?:(?P<op>==|!=|=)\s*(?P<value>[\w.-]*)"
    r"|\s+(?P<setop>in|notin)\s*\((?P<values>[^)]*)\))?)\s*$"
)


def parse_label_selector(selector: str) -> Callable[[dict[str, str]], bool]:
    """Compile a label selector (``a=b,c!=d,e in (f,g),h,!i``) into a predicate."""
    requirements: list[Callable[[dict[str, str]], bool]] = []
    for part in re.split(r",(?![^(]*\))", selector):
        if not part.strip():
            continue
        m = _REQUIREMENT.match(part)
        if m is None:
            raise SelectorError(f"unable to parse requirement: {part!r}")
        requirements.append(_requirement(m))
    return lambda labels: all(req(labels) for req in requirements)


def _requirement(m: re.Match[str]) -> Callable[[dict[str, str]], bool]:
    if m["not"]:
        key = m["nkey"]
        return lambda labels: key not in labels
    key, op = m["key"], m["op"] or m["setop"]
    if op in ("=", "=="):
        value = m["value"]
        return lambda labels: labels.get(key) == value
    if op == "!=":
        value = m["value"]
        return lambda labels: labels.get(key) != value
    if op in ("in", "notin"):
        values = {v.strip() for v in m["values"].split(",")}
        if op == "in":
            return lambda labels: labels.get(key) in values
        return lambda labels: key not in labels or labels[key] not in values
    return lambda labels: key in labels


def _labels_of(obj: Any) -> dict[str, str] | None:
    """An object's labels, or None when the object is too broken to have any."""
    if not isinstance(obj, dict) or not isinstance(obj.get("metadata"), dict):
        return None
    labels = obj["metadata"].get("labels")
    return labels if isinstance(labels, dict) else {}


def _name_of(obj: Any) -> tuple[str, str]:
    meta = obj.get("metadata", {}) if isinstance(obj, dict) else {}
    return meta.get("namespace", "default"), meta.get("name", "")


def status(code: int, reason: str, message: str, **details: Any) -> dict[str, Any]:
    """A ``meta/v1`` Status, the body kube-apiserver sends with every error."""
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        body["details"] = details
    return body


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
        wanted = {_name_of(o): o for o in objs}
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

    def _subscribe(self, since: int | None) -> _Subscription | None:
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
        return _Subscription(backlog, send, receive)

    def _unsubscribe(self, sub: _Subscription) -> None:
        self._watchers.discard(sub.send)
        sub.send.close()
        sub.receive.close()


@attrs.frozen
class _Subscription:
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


# ------------------------------------------------------------------------ server


@attrs.frozen
class RequestRecord:
    """One HTTPS request as the fake saw it (``user`` None = anonymous)."""

    at: float
    method: str
    target: str
    user: str | None


class _ConnectionDone(Exception):
    """The HTTP connection must end (closed by either side, or a mode said so)."""


@attrs.define
class FakeApiServer:
    """One fake kube-apiserver on ``host:port`` (port 0 lets the kernel choose).

    Attributes (test knobs, change them at any time):
      readyz: how /readyz, /livez and /healthz answer, one of READYZ_MODES.
      readyz_delay: seconds ``slow`` waits before answering 200.
      require_client_cert: requests need a client certificate from the CA (else 403).
      require_token: requests need ``Authorization: Bearer <token>`` (else 401).
        When both are set, either credential is enough.

    Observations: ``probe_times`` (path -> arrival times, trio clock),
    ``probe_count()``, ``requests``, ``connections_total``,
    ``active_connections``, ``raw_connections``, ``connection_errors``;
    what kap presented: ``tls_handshakes`` (completed), ``bearer_requests``
    (requests with an Authorization header, right or wrong),
    ``client_cert_requests`` (requests on a connection with a client certificate)
    and ``client_cert_serials`` (the serial of the client certificate each TLS
    connection presented, in order; None for none).
    """

    name: str
    pki: PkiFiles
    host: str = "127.0.0.1"
    port: int = 0
    store: SliceStore = attrs.field(factory=SliceStore)
    readyz: str = attrs.field(default="200", validator=attrs.validators.in_(READYZ_MODES))
    readyz_delay: float = 1.0
    require_client_cert: bool = False
    require_token: str | None = None
    address: tuple[str, int] | None = attrs.field(init=False, default=None)
    probe_times: dict[str, list[float]] = attrs.field(init=False, factory=dict)
    requests: list[RequestRecord] = attrs.field(init=False, factory=list)
    connections_total: int = attrs.field(init=False, default=0)
    active_connections: int = attrs.field(init=False, default=0)
    raw_connections: int = attrs.field(init=False, default=0)
    connection_errors: int = attrs.field(init=False, default=0)
    tls_handshakes: int = attrs.field(init=False, default=0)
    bearer_requests: int = attrs.field(init=False, default=0)
    client_cert_requests: int = attrs.field(init=False, default=0)
    client_cert_serials: list[int | None] = attrs.field(init=False, factory=list)
    # HTTP/2 (tests/fakeh2.py): offered over ALPN unless ``http2`` is off;
    # GOAWAY(NO_ERROR) after ``h2_idle_goaway`` seconds without a stream (as
    # kube-apiserver: 90 s); PINGs acked while ``ack_pings``.
    http2: bool = True
    h2_idle_goaway: float | None = 90.0
    ack_pings: bool = True
    h2_probe_requests: int = attrs.field(init=False, default=0)
    pings: int = attrs.field(init=False, default=0)
    goaways_sent: list[int] = attrs.field(init=False, factory=list)
    _h2_connections: set[H2ServerConnection] = attrs.field(init=False, factory=set)
    _ssl_context: ssl.SSLContext | None = attrs.field(init=False, default=None)
    _cancel_scope: trio.CancelScope | None = attrs.field(init=False, default=None)
    _connection_scopes: set[trio.CancelScope] = attrs.field(init=False, factory=set)

    def __attrs_post_init__(self) -> None:
        self._ssl_context = self.pki.server_ssl_context()
        if self.http2:
            self._ssl_context.set_alpn_protocols(["h2", "http/1.1"])

    async def run(
        self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen and serve until :meth:`stop` or cancellation.

        ``task_status.started((host, port))`` hands back the bound address.
        SO_REUSEADDR is set (by trio) so a fake restarted on the same port binds
        at once; distinct loopback addresses may share a port.
        """
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        bound = listeners[0].socket.getsockname()
        self.address = (bound[0], bound[1])
        try:
            async with trio.open_nursery() as nursery:
                self._cancel_scope = nursery.cancel_scope
                await nursery.start(
                    functools.partial(
                        trio.serve_listeners, self._handle, listeners, handler_nursery=nursery
                    )
                )
                task_status.started(self.address)
        finally:
            for listener in listeners:
                await trio.aclose_forcefully(listener)

    def stop(self) -> None:
        """Close the listener and every connection; :meth:`run` then returns."""
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()

    def drop_connections(self) -> None:
        """Close every open connection but keep listening (an apiserver's GOAWAY)."""
        for scope in list(self._connection_scopes):
            scope.cancel()

    def probe_count(self, path: str = "/readyz") -> int:
        return len(self.probe_times.get(path, []))

    def counts(self) -> dict[str, int]:
        """Requests by kind: health probes over HTTP/1.1 and HTTP/2, and PINGs."""
        probes = sum(len(times) for times in self.probe_times.values())
        return {
            "probe_h1": probes - self.h2_probe_requests,
            "probe_h2": self.h2_probe_requests,
            "ping": self.pings,
        }

    def goaway(self, error_code: int = 0) -> None:
        """GOAWAY with ``error_code`` on every HTTP/2 connection, which then closes."""
        for conn in list(self._h2_connections):
            conn.goaway(error_code)

    @property
    def url(self) -> str:
        assert self.address is not None, "not started"
        host, port = self.address
        return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"

    # -- connections -------------------------------------------------------

    async def _handle(self, stream: trio.SocketStream) -> None:
        """Serve one connection; its errors end it and are counted, nothing else."""
        self.connections_total += 1
        self.active_connections += 1
        scope = trio.CancelScope()
        self._connection_scopes.add(scope)
        try:
            with scope:
                await self._serve_connection(stream)
        except (
            trio.BrokenResourceError,  # includes TLS errors and resets under SSLStream
            trio.ClosedResourceError,
            trio.TooSlowError,  # the TLS handshake deadline
            ConnectionError,  # a reset seen by the first-byte peek
            h11.ProtocolError,
        ):
            self.connection_errors += 1
        finally:
            self._connection_scopes.discard(scope)
            self.active_connections -= 1
            await trio.aclose_forcefully(stream)

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        first = b""
        with trio.move_on_after(IDLE_TIMEOUT):
            first = await stream.socket.recv(1, socket.MSG_PEEK)
        if not first:
            return
        if first[0] != TLS_HANDSHAKE_BYTE:
            self.raw_connections += 1
            await self._serve_raw(stream)
            return
        assert self._ssl_context is not None
        tls = trio.SSLStream(stream, self._ssl_context, server_side=True, https_compatible=True)
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            await tls.do_handshake()
        self.tls_handshakes += 1
        try:
            if tls.selected_alpn_protocol() == "h2":
                await self._serve_h2(tls)
                return
            await self._serve_http(tls)
        finally:
            await trio.aclose_forcefully(tls)

    async def _serve_raw(self, stream: trio.SocketStream) -> None:
        """``WHO\\n`` -> name; then echo, ending our side after the client's FIN."""
        head = b""
        eof = False
        while len(head) < len(WHO) and WHO.startswith(head):
            data = await stream.receive_some(RECEIVE_SIZE)
            if not data:
                eof = True
                break
            head += data
        if head.startswith(WHO):
            await stream.send_all(self.name.encode() + b"\n")
            head = head[len(WHO) :]
        if head:
            await stream.send_all(head)
        while not eof:
            data = await stream.receive_some(RECEIVE_SIZE)
            if not data:
                break
            await stream.send_all(data)
        await stream.send_eof()

    async def _serve_http(self, tls: trio.SSLStream[trio.SocketStream]) -> None:
        conn = h11.Connection(h11.SERVER)
        user = self._cert_user(tls)
        serial = (tls.getpeercert() or {}).get("serialNumber")
        self.client_cert_serials.append(None if serial is None else int(str(serial), 16))
        while True:
            request = await self._next_request(conn, tls)
            if request is None:
                return
            try:
                await self._respond(conn, tls, request, user)
            except _ConnectionDone:
                return
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()

    async def _serve_h2(self, tls: trio.SSLStream[trio.SocketStream]) -> None:
        serial = (tls.getpeercert() or {}).get("serialNumber")
        self.client_cert_serials.append(None if serial is None else int(str(serial), 16))
        await H2ServerConnection(self, tls, self._cert_user(tls)).serve()

    async def respond_h2(
        self, conn: h11.Connection, stream: trio.abc.Stream, request: h11.Request, user: str | None
    ) -> bool:
        """Answer one HTTP/2 stream (``request`` as h11 gives it); False: end the connection."""
        path = urlsplit(request.target.decode("latin-1")).path.rstrip("/") or "/"
        if path in HEALTH_PATHS or path.startswith(tuple(p + "/" for p in HEALTH_PATHS)):
            self.h2_probe_requests += 1
        try:
            await self._respond(conn, stream, request, user)
        except _ConnectionDone:
            return False
        return True

    async def _next_request(self, conn: h11.Connection, tls: trio.abc.Stream) -> h11.Request | None:
        request = None
        with trio.move_on_after(IDLE_TIMEOUT):
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await tls.receive_some(RECEIVE_SIZE))
                elif isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.EndOfMessage):
                    return request
                elif isinstance(event, h11.ConnectionClosed):
                    return None
        return None

    def _cert_user(self, tls: trio.SSLStream[trio.SocketStream]) -> str | None:
        cert = tls.getpeercert()
        if not cert:
            return None
        for rdn in cert.get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    return str(value)
        return None

    # -- HTTP ----------------------------------------------------------------

    async def _respond(
        self,
        conn: h11.Connection,
        tls: trio.abc.Stream,
        request: h11.Request,
        cert_user: str | None,
    ) -> None:
        target = request.target.decode("latin-1")
        split = urlsplit(target)
        path = split.path.rstrip("/") or "/"
        query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        headers = {k.decode().lower(): v.decode("latin-1") for k, v in request.headers}
        user = self._authenticate(cert_user, headers.get("authorization", ""))
        self.bearer_requests += "authorization" in headers
        self.client_cert_requests += cert_user is not None
        method = request.method.decode()
        self.requests.append(RequestRecord(trio.current_time(), method, target, user))

        if path in HEALTH_PATHS or path.startswith(tuple(p + "/" for p in HEALTH_PATHS)):
            self.probe_times.setdefault(path, []).append(trio.current_time())
        refusal = self._refusal(user, headers, method, path)
        if refusal is not None:
            await _send_json(conn, tls, refusal["code"], refusal)
        elif method != "GET":
            await _send_json(
                conn, tls, 405, status(405, "MethodNotAllowed", f"{method} is not supported")
            )
        elif path in HEALTH_PATHS or path.startswith(tuple(p + "/" for p in HEALTH_PATHS)):
            await self._health(conn, tls, path)
        elif (m := _SLICES_PATH.match(path)) is not None:
            await self._slices(conn, tls, m["ns"], m["name"], query)
        elif (doc := self._discovery_document(path)) is not None:
            await _send_json(conn, tls, 200, doc)
        else:
            await _send_json(
                conn,
                tls,
                404,
                status(404, "NotFound", "the server could not find the requested resource"),
            )

    def _authenticate(self, cert_user: str | None, authorization: str) -> str | None:
        if self.require_token is not None and authorization == f"Bearer {self.require_token}":
            return "system:serviceaccount:kube-system:kap"
        if cert_user is not None and (self.require_client_cert or self.require_token is None):
            return cert_user
        return None

    def _refusal(
        self, user: str | None, headers: dict[str, str], method: str, path: str
    ) -> dict[str, Any] | None:
        """401/403 as kube-apiserver: bad token is 401, anonymous is 403."""
        if user is not None or not (self.require_client_cert or self.require_token):
            return None
        if self.require_token is not None and (
            "authorization" in headers or not self.require_client_cert
        ):
            return status(401, "Unauthorized", "Unauthorized")
        verb = method.lower()
        return status(
            403,
            "Forbidden",
            f'forbidden: User "system:anonymous" cannot {verb} path "{path}"',
        )

    async def _health(self, conn: h11.Connection, tls: trio.abc.Stream, path: str) -> None:
        mode = self.readyz
        if mode == "close":
            raise _ConnectionDone
        if mode == "hang":
            await _until_client_closes(tls)
            raise _ConnectionDone
        if mode == "slow":
            await trio.sleep(self.readyz_delay)
        if mode == "500":
            check = path.lstrip("/").split("/")[0]
            body = (
                "[+]ping ok\n[+]log ok\n[-]etcd failed: reason withheld\n"
                "[+]informer-sync ok\n[-]shutdown failed: reason withheld\n"
                f"{check} check failed\n"
            )
            await _send(conn, tls, 500, body.encode(), "text/plain; charset=utf-8")
        else:
            await _send(conn, tls, 200, b"ok", "text/plain; charset=utf-8")

    def _discovery_document(self, path: str) -> dict[str, Any] | None:
        """Legacy (unaggregated) discovery, just enough for kubectl to find endpointslices."""
        assert self.address is not None
        host, port = self.address
        server_address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        group_version = {"groupVersion": GROUP_VERSION, "version": "v1"}
        docs: dict[str, dict[str, Any]] = {
            "/version": {
                "major": "1",
                "minor": "32",
                "gitVersion": "v1.32.0-fake",
                "platform": "linux/amd64",
            },
            "/api": {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [
                    {"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}
                ],
            },
            "/api/v1": {"kind": "APIResourceList", "groupVersion": "v1", "resources": []},
            "/apis": {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [
                    {
                        "name": GROUP,
                        "versions": [group_version],
                        "preferredVersion": group_version,
                    }
                ],
            },
            f"/apis/{GROUP}": {
                "kind": "APIGroup",
                "apiVersion": "v1",
                "name": GROUP,
                "versions": [group_version],
                "preferredVersion": group_version,
            },
            f"/apis/{GROUP_VERSION}": {
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": GROUP_VERSION,
                "resources": [
                    {
                        "name": "endpointslices",
                        "singularName": "endpointslice",
                        "namespaced": True,
                        "kind": "EndpointSlice",
                        "verbs": ["get", "list", "watch"],
                    }
                ],
            },
        }
        return docs.get(path)

    # -- EndpointSlices --------------------------------------------------------

    async def _slices(
        self,
        conn: h11.Connection,
        tls: trio.abc.Stream,
        namespace: str | None,
        name: str | None,
        query: dict[str, str],
    ) -> None:
        store = self.store
        try:
            selection = _Selection.from_query(namespace, query)
        except SelectorError as e:
            await _send_json(conn, tls, 400, status(400, "BadRequest", str(e)))
            return
        if name is not None:
            obj = store.get(name, namespace or "default")
            if obj is None:
                msg = f'endpointslices.{GROUP} "{name}" not found'
                body = status(404, "NotFound", msg, name=name, group=GROUP, kind="endpointslices")
                await _send_json(conn, tls, 404, body)
            else:
                await _send_json(conn, tls, 200, obj)
            return
        if query.get("watch") in ("true", "1"):
            await self._watch(conn, tls, selection, query)
            return
        store.lists_served += 1
        if query.get("resourceVersion", "") == "" or query.get("resourceVersionMatch") == "Exact":
            store.lists_consistent += 1
        else:
            store.lists_from_cache += 1
        if store.list_error is not None:
            code = store.list_error
            await _send_json(conn, tls, code, status(code, "InternalError", "etcdserver: timeout"))
            return
        if store.garbage_next_list:
            store.garbage_next_list = False
            body = (
                b'{"kind":"EndpointSliceList","apiVersion":"discovery.k8s.io/v1","items":[{"metad'
            )
            await _send(conn, tls, 200, body, "application/json")
            return
        items = []
        for obj in store.items():
            if selection.sees(obj):
                item = copy.copy(obj)
                if isinstance(item, dict) and _labels_of(item) is not None:
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
        await _send_json(conn, tls, 200, body_obj)

    async def _watch(
        self,
        conn: h11.Connection,
        tls: trio.abc.Stream,
        selection: _Selection,
        query: dict[str, str],
    ) -> None:
        """Stream events as chunked NDJSON until timeout, 410, the client or stop()."""
        store = self.store
        if store.http_410_on_watch:
            msg = "too old resource version: 1 (2)"
            await _send_json(conn, tls, 410, status(410, "Expired", msg))
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
        await _conn_send(conn, tls, h11.Response(status_code=200, headers=headers, reason=b"OK"))
        stream = _WatchStream(
            conn, tls, selection, store, query.get("allowWatchBookmarks") in ("true", "1")
        )
        subscription = store._subscribe(since)
        if subscription is None:
            msg = f"too old resource version: {since} ({store.compacted_rv})"
            await stream.send("ERROR", status(410, "Expired", msg))
            await _conn_send(conn, tls, h11.EndOfMessage())
            return
        client_gone = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch_for_close, tls, client_gone, nursery.cancel_scope)
                with trio.move_on_after(timeout) as deadline:
                    await stream.follow(subscription, deadline)
                nursery.cancel_scope.cancel()
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            # The client reset the connection while an event was on its way
            # (before _watch_for_close saw it): the watch is over, not the fake.
            client_gone.set()
        finally:
            store._unsubscribe(subscription)
        if not client_gone.is_set():
            await _conn_send(conn, tls, h11.EndOfMessage())


@attrs.frozen
class _Selection:
    """What one list or watch asked for: a namespace, a label selector, a name."""

    namespace: str | None
    labels: Callable[[dict[str, str]], bool]
    name: str | None = None

    @classmethod
    def from_query(cls, namespace: str | None, query: dict[str, str]) -> _Selection:
        name = None
        for part in filter(None, query.get("fieldSelector", "").split(",")):
            key, _, value = part.partition("=")
            if key != "metadata.name":
                raise SelectorError(f'field label not supported: "{key}"')
            name = value.lstrip("=")
        return cls(namespace, parse_label_selector(query.get("labelSelector", "")), name)

    def sees(self, obj: Any) -> bool:
        """Objects too broken to carry labels are always seen: planted garbage."""
        labels = _labels_of(obj)
        if labels is None:
            return True
        namespace, name = _name_of(obj)
        if self.namespace is not None and namespace != self.namespace:
            return False
        if self.name is not None and name != self.name:
            return False
        return self.labels(labels)


@attrs.define
class _WatchStream:
    """The body of one watch response, written as kube-apiserver writes it."""

    conn: h11.Connection
    tls: trio.abc.Stream
    selection: _Selection
    store: SliceStore
    bookmarks: bool

    async def follow(self, sub: _Subscription, deadline: trio.CancelScope) -> None:
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
                await self.send("BOOKMARK", _bookmark(self.store.resource_version))
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
        await _conn_send(self.conn, self.tls, h11.Data(data=line.encode()))


def _bookmark(rv: int) -> dict[str, Any]:
    """A BOOKMARK object as kube-apiserver encodes an empty EndpointSlice."""
    return {
        "kind": "EndpointSlice",
        "apiVersion": GROUP_VERSION,
        "metadata": {"resourceVersion": str(rv), "creationTimestamp": None},
        "addressType": "",
        "endpoints": None,
    }


async def _conn_send(conn: h11.Connection, tls: trio.abc.Stream, event: h11.Event) -> None:
    data = conn.send(event)
    if data:
        await tls.send_all(data)


async def _send(
    conn: h11.Connection, tls: trio.abc.Stream, code: int, body: bytes, content_type: str
) -> None:
    headers = [
        ("Content-Type", content_type),
        ("Content-Length", str(len(body))),
        ("X-Content-Type-Options", "nosniff"),
    ]
    reason = HTTPStatus(code).phrase.encode()
    await _conn_send(conn, tls, h11.Response(status_code=code, headers=headers, reason=reason))
    await _conn_send(conn, tls, h11.Data(data=body))
    await _conn_send(conn, tls, h11.EndOfMessage())


async def _send_json(conn: h11.Connection, tls: trio.abc.Stream, code: int, obj: Any) -> None:
    # Exactly "application/json": lightkube turns errors into ApiError only then.
    await _send(conn, tls, code, json.dumps(obj).encode(), "application/json")


async def _until_client_closes(stream: trio.abc.ReceiveStream) -> None:
    """Discard input until EOF: how a hung handler notices the client gave up."""
    while await stream.receive_some(RECEIVE_SIZE):
        pass


async def _watch_for_close(
    stream: trio.abc.ReceiveStream, gone: trio.Event, scope: trio.CancelScope
) -> None:
    """Cancel ``scope`` when the client closes (or resets) its side."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await _until_client_closes(stream)
    gone.set()
    scope.cancel()


# ---------------------------------------------------------------- subprocess mode


@attrs.define
class FakeApiProcess:
    """A fake apiserver in its own process, for SIGKILL and SIGSTOP tests."""

    process: trio.Process
    name: str
    host: str
    port: int

    @property
    def url(self) -> str:
        return (
            f"https://[{self.host}]:{self.port}"
            if ":" in self.host
            else f"https://{self.host}:{self.port}"
        )

    def kill(self) -> None:
        """SIGKILL: the kernel resets its connections and refuses new ones."""
        self.process.kill()

    def pause(self) -> None:
        """SIGSTOP: hung; the kernel still completes TCP handshakes into the backlog."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)


@contextlib.asynccontextmanager
async def fake_api_process(
    name: str,
    pki: PkiFiles,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    readyz: str = "200",
    extra_args: Iterable[str] = (),
    start_timeout: float = 15.0,
    wrapper: Iterable[str] = (),
) -> AsyncIterator[FakeApiProcess]:
    """Run ``python tests/fakeapi.py`` until its ready line; SIGKILL it on exit.

    ``wrapper`` prefixes the command (``("ip", "netns", "exec", NS)`` runs the
    fake inside a network namespace).
    """
    command = [
        *wrapper,
        sys.executable,
        str(_THIS_FILE),
        *("--name", name, "--host", host, "--port", str(port)),
        *("--ca-dir", str(pki.dir), "--readyz", readyz),
        *extra_args,
    ]
    process = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE)
    assert process.stdout is not None
    try:
        with trio.fail_after(start_timeout):
            line = b""
            while not line.endswith(b"\n"):
                chunk = await process.stdout.receive_some(4096)
                if not chunk:
                    raise RuntimeError(f"fake apiserver {name} exited before it was ready")
                line += chunk
        ready = json.loads(line)
        yield FakeApiProcess(process, name, ready["host"], ready["port"])
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            with trio.move_on_after(5):
                await process.wait()
            await process.stdout.aclose()


def _read_slices_file(path: Path) -> list[dict[str, Any]] | None:
    """Slices from a JSON array (or a list object with ``items``); None if unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    items = data.get("items") if isinstance(data, dict) else data
    return items if isinstance(items, list) else None


def write_slices_file(path: Path, slices: Iterable[dict[str, Any]]) -> None:
    """Write a ``--slices-file`` atomically, so the fake never reads half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(list(slices)))
    os.replace(tmp, path)


async def _follow_slices_file(path: Path, store: SliceStore) -> None:
    """Make the store mirror ``path``, re-reading it whenever it changes."""
    seen: tuple[int, int, int] | None = None
    while True:
        try:
            st = path.stat()  # noqa: ASYNC240 -- a local file; no worker thread wanted
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            stamp = None
        if stamp is not None and stamp != seen:
            seen = stamp
            slices = _read_slices_file(path)
            if slices is None:
                print(f"fakeapi: ignoring unreadable slices file {path}", file=sys.stderr)
            else:
                store.replace_all(slices)
        await trio.sleep(SLICES_FILE_POLL)


async def _main(args: argparse.Namespace) -> None:
    fake = FakeApiServer(
        name=args.name,
        pki=PkiFiles(Path(args.ca_dir)),
        host=args.host,
        port=args.port,
        readyz=args.readyz,
        readyz_delay=args.readyz_delay,
        require_client_cert=args.require_client_cert,
        require_token=args.require_token,
    )
    async with trio.open_nursery() as nursery:
        if args.slices_file:
            path = Path(args.slices_file)
            slices = _read_slices_file(path)
            if slices is not None:
                fake.store.replace_all(slices)
            nursery.start_soon(_follow_slices_file, path, fake.store)
        host, port = await nursery.start(fake.run)
        print(
            json.dumps({"ready": True, "name": args.name, "host": host, "port": port}), flush=True
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fakeapi", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--name", required=True, help="answered to WHO in raw mode")
    parser.add_argument(
        "--ca-dir", required=True, help=f"holds {CA_FILE}, {SERVER_CERT_FILE}, {SERVER_KEY_FILE}"
    )
    parser.add_argument("--readyz", choices=READYZ_MODES, default="200")
    parser.add_argument(
        "--readyz-delay", type=float, default=1.0, help="seconds, for --readyz slow"
    )
    parser.add_argument("--require-client-cert", action="store_true")
    parser.add_argument("--require-token", default=None, metavar="TOKEN")
    parser.add_argument(
        "--slices-file", default=None, help="JSON array of EndpointSlices, followed"
    )
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(_main, args)


if __name__ == "__main__":
    main()
