"""One fake kube-apiserver: its listener, its connections, and the requests on them.

A connection whose first byte is not a TLS ClientHello (0x16) is in raw mode
(``WHO\\n`` answers the fake's name, the rest is echoed through half-close).
A TLS connection speaks HTTP/1.1 (h11), or HTTP/2 when ALPN picked ``h2``
(``http2.py`` bridges each stream to the same handler). Requests are
authenticated as kube-apiserver does (client certificate or bearer token;
401/403 per request, never at the handshake), and routed to the health
endpoints (whose ``readyz`` mode tests switch at run time), the EndpointSlice
API (``listwatch.py``) or the discovery documents kubectl reads.

Rules that keep it honest: no threads; one task per connection, cancelled by
:meth:`FakeApiServer.stop`; every wait ends when the client goes away, the
fake stops, or a deadline passes; a connection's errors end that connection
and are counted, never the server.
"""

from __future__ import annotations

import functools
import re
import socket
import ssl
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs
import h11
import trio

from .http2 import H2ServerConnection
from .listwatch import serve_slices
from .objects import discovery_document, status
from .pki import PkiFiles
from .store import SliceStore
from .wire import RECEIVE_SIZE, send, send_json, until_client_closes

READYZ_MODES = ("200", "500", "slow", "hang", "close")
HEALTH_PATHS = ("/readyz", "/livez", "/healthz")
TLS_HANDSHAKE_BYTE = 0x16
WHO = b"WHO\n"

HANDSHAKE_TIMEOUT = 10.0  # generous: a loaded 2-core CI box still handshakes in ms
IDLE_TIMEOUT = 120.0  # an idle keep-alive connection is closed after this

_SLICES_PATH = re.compile(
    r"^/apis/discovery\.k8s\.io/v1/(?:namespaces/(?P<ns>[^/]+)/)?endpointslices(?:/(?P<name>[^/]+))?$"
)


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
    # HTTP/2 (http2.py): offered over ALPN unless ``http2`` is off;
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
            await send_json(conn, tls, refusal["code"], refusal)
        elif method != "GET":
            await send_json(
                conn, tls, 405, status(405, "MethodNotAllowed", f"{method} is not supported")
            )
        elif path in HEALTH_PATHS or path.startswith(tuple(p + "/" for p in HEALTH_PATHS)):
            await self._health(conn, tls, path)
        elif (m := _SLICES_PATH.match(path)) is not None:
            await serve_slices(conn, tls, self.store, m["ns"], m["name"], query)
        elif (doc := discovery_document(path, self.address)) is not None:
            await send_json(conn, tls, 200, doc)
        else:
            await send_json(
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
            await until_client_closes(tls)
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
            await send(conn, tls, 500, body.encode(), "text/plain; charset=utf-8")
        else:
            await send(conn, tls, 200, b"ok", "text/plain; charset=utf-8")
