"""The health server: a minimal HTTP/1.1 server (h11 on trio) for probes and operators.

``GET /healthz`` and ``GET /readyz`` answer 200 (kap is alive, and by the
seed's rule ready too: with no healthy upstream it still tries the default
Service and every upstream, so taking it out of rotation would only hurt);
``/upstreams`` and ``/metrics`` render the current state. Nothing here can
hurt the data path: every request has a read deadline, its size is bounded,
the number of connections is capped, and junk, slow or oversized requests
cost only their own connection.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import attrs
import h11
import trio
from loguru import logger

from kap.address import Address

# Bound on the request head (request line + headers). kubelet's and
# Prometheus' requests are a few hundred bytes; 8 KiB is what most servers allow.
MAX_REQUEST_BYTES = 8 * 1024
# A whole request head must arrive within this: defeats slowloris.
REQUEST_DEADLINE = 5.0
# Connections held at once. kubelet's probes and a scraper need a handful; at
# the cap, the connection that has waited longest for a request is closed to
# make room, so idle or slow connections can never lock out /healthz.
MAX_CONNECTIONS = 256
# An answer must be taken by the client within this (a slow reader costs only its connection).
SEND_DEADLINE = 5.0
# After rejecting a request, at most this much of the rest is read and dropped.
LINGER_BYTES = 64 * 1024

Handler = Callable[[], tuple[str, bytes]]
# What ends one connection and nothing else: a client that left, or bytes that are not HTTP/1.1.
CONNECTION_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError, OSError)


@attrs.define
class HealthServer:
    """Serve ``routes`` (path -> handler returning content type and body) on host:port."""

    host: str
    port: int
    routes: Mapping[str, Handler]
    request_deadline: float = REQUEST_DEADLINE
    max_connections: int = MAX_CONNECTIONS
    # Connections that ended on an error (a client that left mid-request, or
    # spoke something that is not HTTP/1.1): counted, only that connection ends.
    connection_errors_total: int = 0
    accepted_total: int = 0
    _active: int = attrs.field(default=0, alias="_active")
    # Connections waiting for a request head, oldest first: the eviction order.
    _waiting: dict[int, trio.CancelScope] = attrs.field(factory=dict, alias="_waiting")

    async def run(
        self, *, task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            listeners = await trio.open_tcp_listeners(self.port, host=self.host or None)
        except OSError as e:
            where = f"{self.host or '*'}:{self.port}"
            raise OSError(e.errno, f"health server cannot listen on {where}: {e.strerror}") from e
        sockname = listeners[0].socket.getsockname()
        bound = Address(sockname[0], sockname[1])
        async with trio.open_nursery() as nursery:
            task_status.started(bound)
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    @property
    def open_connections(self) -> int:
        return self._active

    async def _handle(self, stream: trio.SocketStream) -> None:
        if self._active >= self.max_connections and self._waiting:
            oldest = next(iter(self._waiting))
            self._waiting.pop(oldest).cancel()
        self._active += 1
        self.accepted_total += 1
        try:
            await self._serve(stream)
        except (
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            h11.ProtocolError,
            OSError,
        ) as e:
            # The client went away or spoke nonsense: only its connection ends.
            self.connection_errors_total += 1
            logger.debug("health connection ended on an error", error=repr(e))
        finally:
            self._active -= 1
            with trio.move_on_after(0.1) as scope:
                scope.shield = True
                await stream.aclose()

    async def _serve(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
        key = id(stream)
        while True:
            request = None
            with trio.move_on_after(self.request_deadline) as scope:
                self._waiting[key] = scope
                try:
                    request = await self._next_request(stream, conn)
                finally:
                    self._waiting.pop(key, None)
            if request is None:
                return
            status, ctype, body = self._respond(request)
            headers = [
                ("Content-Type", ctype),
                ("Content-Length", str(len(body))),
                ("Cache-Control", "no-store"),
            ]
            if status == 405:
                headers.append(("Allow", "GET, HEAD"))
            # A client that does not read its answers (pipelined requests, a
            # zero window) is closed at the deadline: only its connection ends.
            with trio.move_on_after(SEND_DEADLINE) as sending:
                await _send(stream, conn, h11.Response(status_code=status, headers=headers))
                if request.method != b"HEAD":
                    await _send(stream, conn, h11.Data(data=body))
                await _send(stream, conn, h11.EndOfMessage())
            if sending.cancelled_caught:
                self.connection_errors_total += 1
                logger.debug("health connection closed: the answer was not read in time")
                return
            if conn.our_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _next_request(
        self, stream: trio.SocketStream, conn: h11.Connection
    ) -> h11.Request | None:
        """The next request head, after draining its (ignored) body; None to close."""
        request: h11.Request | None = None
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as e:
                await self._reject(stream, conn, e)
                return None
            if event is h11.NEED_DATA:
                data = await stream.receive_some(MAX_REQUEST_BYTES)
                conn.receive_data(data)
                if not data and conn.their_state is h11.IDLE:
                    return None
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.EndOfMessage):
                return request
            elif isinstance(event, h11.ConnectionClosed):
                return None

    async def _reject(
        self, stream: trio.SocketStream, conn: h11.Connection, e: h11.RemoteProtocolError
    ) -> None:
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        status = e.error_status_hint
        body = f"{status} {_reason(status)}\n".encode()
        with trio.move_on_after(SEND_DEADLINE):
            await _send(
                stream,
                conn,
                h11.Response(
                    status_code=status,
                    headers=[
                        ("Content-Length", str(len(body))),
                        ("Connection", "close"),
                        ("Content-Type", "text/plain"),
                    ],
                ),
            )
            await _send(stream, conn, h11.Data(data=body))
            await _send(stream, conn, h11.EndOfMessage())
            # Lingering close: closing with unread request bytes would send a
            # RST that can overtake the answer, so read a bounded amount first.
            await stream.send_eof()
            budget = LINGER_BYTES
            while budget > 0 and (chunk := await stream.receive_some(MAX_REQUEST_BYTES)):
                budget -= len(chunk)

    def _respond(self, request: h11.Request) -> tuple[int, str, bytes]:
        path = _path(request.target)
        handler = self.routes.get(path)
        if handler is None:
            return 404, "text/plain", b"404 not found\n"
        if request.method not in (b"GET", b"HEAD"):
            return 405, "text/plain", b"405 method not allowed\n"
        try:
            ctype, body = handler()
        except Exception:
            logger.exception("health handler failed", path=path)
            return 500, "text/plain", b"500 internal error\n"
        return 200, ctype, body


def _path(target: bytes) -> str:
    """The path of a request target: origin-form, or absolute-form (``http://host/path``).

    RFC 9112 3.2.2: a server must accept the absolute-form, which a client
    speaking through an HTTP proxy sends (and some probes always do).
    """
    for scheme in (b"http://", b"https://"):
        if target[: len(scheme)].lower() == scheme:
            rest = target[len(scheme) :]
            slash = rest.find(b"/")
            target = rest[slash:] if slash >= 0 else b"/"
            break
    return target.split(b"?", 1)[0].decode("ascii", "replace")


async def _send(stream: trio.SocketStream, conn: h11.Connection, event: h11.Event) -> None:
    data = conn.send(event)
    if data:
        await stream.send_all(data)


def _reason(status: int) -> str:
    return {400: "bad request", 431: "request header fields too large"}.get(status, "error")
