"""The fake apiserver's HTTP/2 side: a connection that picked ``h2`` over ALPN.

kube-apiserver speaks HTTP/2 to every client that offers it, and kap's
probes then check it with PINGs between two ``/readyz``. This serves such a
connection the way Go's HTTP/2 server (kube-apiserver's) does, in the parts
kap depends on:

* every stream is one request, answered by the fake's own HTTP/1.1 handler
  (``FakeApiServer.respond_h2``) through a bridge: the request is handed to it
  as h11 events, and what it writes is parsed back and sent as HEADERS and
  DATA frames, so HTTP/1.1 and HTTP/2 clients see the same apiserver;
* PINGs are acked (unless ``FakeApiServer.ack_pings`` is off) and counted;
* GOAWAY(NO_ERROR) after ``FakeApiServer.h2_idle_goaway`` seconds without an
  open stream (kube-apiserver: 90 s; a PING does not reset it) and when the
  fake stops or drops its connections; ``FakeApiServer.goaway(code)`` sends
  one with any code now. The connection is closed after a GOAWAY.

Rules that keep it honest: one reader task per connection and one task per
stream, all in the connection's nursery; writes go through one lock.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Any

import attrs
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h11
import hyperframe.frame
import trio

if TYPE_CHECKING:
    from .server import FakeApiServer

RECEIVE_SIZE = 65536
# Headers of HTTP/1.1 that HTTP/2 forbids (RFC 9113 section 8.2.2).
_HOP_BY_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"upgrade", b"proxy-connection"}
# A GOAWAY is flushed before the connection closes, within this (loopback).
GOAWAY_FLUSH = 1.0


@attrs.define(eq=False)
class H2ServerConnection:
    """One HTTP/2 connection of a fake apiserver."""

    fake: FakeApiServer
    tls: trio.SSLStream[trio.SocketStream]
    user: str | None  # the client certificate's user
    _conn: h2.connection.H2Connection = attrs.field(init=False)
    _lock: trio.Lock = attrs.field(factory=trio.Lock)
    _window: trio.Event = attrs.field(factory=trio.Event)
    _streams: dict[int, _Stream] = attrs.field(factory=dict)
    _idle_since: float = attrs.field(init=False)
    _done: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    goaway_sent: int | None = None
    _goaway_code: int = h2.errors.ErrorCodes.NO_ERROR  # what the GOAWAY on closing says

    def __attrs_post_init__(self) -> None:
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self._conn = h2.connection.H2Connection(config=config)
        receive_ping = self._conn._receive_ping_frame
        fake = self.fake

        def ping_frame(frame: Any) -> Any:
            """Count PINGs; drop the ack when the fake is told not to answer them."""
            frames, events = receive_ping(frame)
            if "ACK" not in frame.flags:
                fake.pings += 1
                if not fake.ack_pings:
                    frames = []
            return frames, events

        self._conn._frame_dispatch_table[hyperframe.frame.PingFrame] = ping_frame
        self._idle_since = trio.current_time()

    async def serve(self) -> None:
        """Until the client closes, a GOAWAY is sent, or the fake stops (then a GOAWAY)."""
        self._conn.initiate_connection()
        await self._flush()
        self.fake._h2_connections.add(self)
        try:
            with self._done:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._idle_goaway)
                    await self._read(nursery)
                    nursery.cancel_scope.cancel()
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            # The client reset the connection: it ends, as an HTTP/1.1 one would.
            self.fake.connection_errors += 1
        finally:
            self.fake._h2_connections.discard(self)
            for stream in self._streams.values():
                stream.gone.set()
            if self.goaway_sent is None:
                with trio.CancelScope(shield=True), trio.move_on_after(GOAWAY_FLUSH):
                    await self._send_goaway(self._goaway_code)

    def goaway(self, code: int) -> None:
        """Send GOAWAY(code) and close, soon (from outside the connection's tasks)."""
        self._goaway_code = code
        self._done.cancel()

    async def _read(self, nursery: trio.Nursery) -> None:
        while True:
            data = await self.tls.receive_some(RECEIVE_SIZE)
            if not data:
                return
            try:
                events = self._conn.receive_data(bytes(data))
            except h2.exceptions.ProtocolError:
                self.fake.connection_errors += 1
                await self._flush()
                return
            for event in events:
                if isinstance(event, h2.events.RequestReceived):
                    stream = _Stream(self, event.stream_id, event.headers)
                    self._streams[event.stream_id] = stream
                    nursery.start_soon(self._answer, stream)
                elif isinstance(event, h2.events.DataReceived):
                    self._conn.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
                elif isinstance(event, (h2.events.StreamReset, h2.events.StreamEnded)):
                    if isinstance(event, h2.events.StreamReset):
                        self._end(event.stream_id)
                elif isinstance(event, h2.events.WindowUpdated):
                    self._window.set()
                    self._window = trio.Event()
                elif isinstance(event, h2.events.ConnectionTerminated):
                    self.goaway_sent = -1  # the client's GOAWAY: no need to send ours
                    return
            await self._flush()

    async def _answer(self, stream: _Stream) -> None:
        try:
            if await self.fake.respond_h2(stream.server, stream, stream.request(), self.user):
                await stream.finish()
            else:  # the handler ends the connection ("close" mode)
                self._done.cancel()
        except (
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            h2.exceptions.StreamClosedError,
        ):
            pass
        finally:
            self._end(stream.stream_id)

    def _end(self, stream_id: int) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            stream.gone.set()
        if not self._streams:
            self._idle_since = trio.current_time()

    async def _idle_goaway(self) -> None:
        """GOAWAY(NO_ERROR) and close after ``h2_idle_goaway`` seconds without a stream."""
        limit = self.fake.h2_idle_goaway
        if limit is None or math.isinf(limit):
            return
        while True:
            due = self._idle_since + limit
            if not self._streams and trio.current_time() >= due:
                self._done.cancel()
                return
            await trio.sleep(max(0.01, due - trio.current_time()))

    async def _send_goaway(self, code: int) -> None:
        self.goaway_sent = code
        self.fake.goaways_sent.append(code)
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self._conn.close_connection(error_code=code)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._flush()

    async def send_headers(self, stream_id: int, headers: list[tuple[bytes, bytes]]) -> None:
        self._conn.send_headers(stream_id, headers)
        await self._flush()

    async def send_data(self, stream_id: int, data: bytes, *, end: bool = False) -> None:
        """Send ``data`` as the flow-control windows allow."""
        view = memoryview(data)
        while view:
            window = min(
                self._conn.local_flow_control_window(stream_id), self._conn.max_outbound_frame_size
            )
            if window <= 0:
                await self._window.wait()
                continue
            chunk, view = view[:window], view[window:]
            self._conn.send_data(stream_id, bytes(chunk), end_stream=end and not view)
            await self._flush()
        if end and not data:
            self._conn.end_stream(stream_id)
            await self._flush()

    async def _flush(self) -> None:
        async with self._lock:
            data = self._conn.data_to_send()
            if data:
                await self.tls.send_all(data)


@attrs.define(eq=False)
class _Stream:
    """One request: a ``trio.abc.Stream`` stand-in for the HTTP/1.1 handler.

    ``send_all`` takes the HTTP/1.1 bytes the handler writes and sends them as
    frames; ``receive_some`` returns b"" once the client reset the stream or
    the connection ended (how a hung handler or a watch notices it).
    """

    connection: H2ServerConnection
    stream_id: int
    headers: list[tuple[bytes, bytes]]
    server: h11.Connection = attrs.field(factory=lambda: h11.Connection(h11.SERVER))
    _client: h11.Connection = attrs.field(factory=lambda: h11.Connection(h11.CLIENT))
    gone: trio.Event = attrs.field(factory=trio.Event)
    _ended: bool = False

    @property
    def path(self) -> str:
        return dict(self.headers).get(b":path", b"/").decode("latin-1")

    def request(self) -> h11.Request:
        """The HTTP/2 request as h11 events fed to the handler's h11 connection."""
        pseudo = dict(self.headers)
        headers = [(b"host", pseudo.get(b":authority", b"localhost"))]
        headers += [(k, v) for k, v in self.headers if not k.startswith(b":")]
        request = h11.Request(
            method=pseudo.get(b":method", b"GET"),
            target=pseudo.get(b":path", b"/"),
            headers=headers,
        )
        self.server.receive_data(
            self._client.send(request) + (self._client.send(h11.EndOfMessage()) or b"")
        )
        event = self.server.next_event()
        assert isinstance(event, h11.Request)
        self.server.next_event()  # EndOfMessage (a GET has no body)
        return event

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.gone.is_set():
            raise trio.BrokenResourceError("stream reset by the client")
        self._client.receive_data(bytes(data))
        while True:
            event = self._client.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Response):
                headers = [(b":status", str(event.status_code).encode())]
                headers += [
                    (k.lower(), v) for k, v in event.headers if k.lower() not in _HOP_BY_HOP
                ]
                await self.connection.send_headers(self.stream_id, headers)
            elif isinstance(event, h11.Data):
                await self.connection.send_data(self.stream_id, bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                await self.finish()
                return

    async def finish(self) -> None:
        if not self._ended and not self.gone.is_set():
            self._ended = True
            await self.connection.send_data(self.stream_id, b"", end=True)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await self.gone.wait()
        return b""
