"""An HTTP/2 probe connection: ``GET /readyz`` as one stream, and PINGs.

When the apiserver picks ``h2`` over ALPN (kube-apiserver does), the probe
connection speaks HTTP/2 with the ``h2`` package's state machine, so kap can
check a live apiserver between two ``/readyz`` with a PING frame (RFC 9113
section 6.7: the ack is mandatory and involves no handler, authentication,
audit or API Priority and Fairness).

The rules that keep it honest:

* Frames are read only by the one task that uses the connection: while it
  waits for an answer (``get``), for a PING ack (``ping``), or while it
  naps between two checks (``idle``). No reader task of its own, so nothing
  here outlives the probe loop that owns the connection.
* Every frame read is handled: SETTINGS and PING from the server are acked
  by the state machine, WINDOW_UPDATE feeds its flow control, DATA is
  acknowledged at once so the windows never close, GOAWAY is remembered
  (``goaway``) and ends the connection for new checks.
* Bounded buffers: a body keeps at most ``MAX_BODY`` bytes; frames are at
  most the default 16 KiB; the server may open no stream (no push).
* Nothing here has a deadline of its own: the caller's cancel scope is it.
"""

from __future__ import annotations

import itertools
import select

import attrs
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import trio

from kap.probe_connection import MAX_BODY, RECEIVE_SIZE, USER_AGENT, Answer, ProbeProtocolError

ALPN_H2 = "h2"


class GoAway(Exception):
    """The apiserver sent GOAWAY before the check was answered.

    ``NO_ERROR`` is an apiserver closing a connection on purpose (idle for
    90 s, ``--goaway-chance``, shutting down): reconnect, not a failure.
    """

    def __init__(self, error_code: int) -> None:
        self.error_code = error_code
        super().__init__(f"GOAWAY {error_name(error_code)}")

    @property
    def graceful(self) -> bool:
        return self.error_code == h2.errors.ErrorCodes.NO_ERROR


def error_name(code: int) -> str:
    """``PROTOCOL_ERROR`` for 1; the number for a code RFC 9113 does not name."""
    try:
        return h2.errors.ErrorCodes(code).name
    except ValueError:
        return f"error {code}"


@attrs.define(eq=False)
class Http2Connection:
    """A TLS connection to one apiserver that negotiated HTTP/2.

    ``generation`` as in ``Http11Connection``.
    """

    stream: trio.SSLStream[trio.SocketStream]
    host: str  # the :authority
    generation: int
    goaway: int | None = None  # the error code of a GOAWAY received
    closed: bool = False  # the peer closed it, or it broke
    _h2: h2.connection.H2Connection = attrs.field(init=False, alias="_h2")
    _ping_ids: itertools.count[int] = attrs.field(factory=itertools.count, alias="_ping_ids")

    def __attrs_post_init__(self) -> None:
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self._h2 = h2.connection.H2Connection(config=config)
        self._h2.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 0,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 64 * 1024,
            },
        )

    protocol = ALPN_H2

    async def start(self) -> None:
        """Send the connection preface and our SETTINGS (part of opening it)."""
        self._h2.initiate_connection()
        await self._flush()

    @property
    def reusable(self) -> bool:
        """Open, and no GOAWAY: frames waiting on the socket are normal in HTTP/2."""
        return not self.closed and self.goaway is None

    async def get(self, target: str, headers: list[tuple[str, str]]) -> Answer:
        """Send ``GET target`` as a new stream and read its answer.

        Raises:
          GoAway: the apiserver sent GOAWAY and will not answer this stream.
          ProbeProtocolError: not HTTP/2, a reset stream, or the connection ended.
          trio.BrokenResourceError: TLS error or reset.
        """
        conn = self._h2
        stream_id = conn.get_next_available_stream_id()
        request = [
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":authority", self.host.encode()),
            (b":path", target.encode()),
            (b"user-agent", USER_AGENT.encode()),
            (b"accept", b"*/*"),
            *((k.lower().encode(), v.encode()) for k, v in headers),
        ]
        conn.send_headers(stream_id, request, end_stream=True)
        sent = trio.current_time()
        await self._flush()
        status: int | None = None
        latency = 0.0
        body = bytearray()
        while True:
            for event in await self._receive(stream_id):
                if getattr(event, "stream_id", stream_id) != stream_id:
                    continue
                if isinstance(event, h2.events.ResponseReceived):
                    status, latency = _status(event.headers), trio.current_time() - sent
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data[: max(0, MAX_BODY - len(body))]
                elif isinstance(event, h2.events.StreamReset):
                    raise ProbeProtocolError(f"stream reset: {error_name(event.error_code)}")
                elif isinstance(event, h2.events.StreamEnded):
                    if status is None:
                        raise ProbeProtocolError("stream ended without an answer")
                    await self._flush()
                    return Answer(status=status, body=bytes(body), latency=latency)

    async def ping(self) -> float:
        """Send a PING and wait for its ack: the round trip in seconds.

        Raises as ``get``.
        """
        opaque = next(self._ping_ids).to_bytes(8, "big")
        self._h2.ping(opaque)
        sent = trio.current_time()
        await self._flush()
        while True:
            for event in await self._receive(None):
                if isinstance(event, h2.events.PingAckReceived) and event.ping_data == opaque:
                    return trio.current_time() - sent

    async def catch_up(self) -> None:
        """Handle the frames already waiting on the socket, without waiting for more.

        Before the connection is reused: a GOAWAY or a close that came while
        nobody read (``idle`` was not running) is noticed here, not as a
        failed check.
        """
        try:
            while self.reusable and _readable(self.stream):
                await self._receive(None)
        except (GoAway, ProbeProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            self.closed = True

    async def idle(self) -> None:
        """Read and handle frames until the connection ends (GOAWAY, close or error).

        Runs while the probe loop naps, so a GOAWAY is noticed when it comes;
        the caller's cancel scope (the nap) ends it otherwise.
        """
        try:
            while self.reusable:
                await self._receive(None)
        except (GoAway, ProbeProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            self.closed = True

    async def _receive(self, stream_id: int | None) -> list[h2.events.Event]:
        """One read from the socket, its frames handled; raises when the connection ends.

        ``stream_id`` is the stream waited for: a graceful GOAWAY that still
        covers it lets the answer come; any other GOAWAY ends the wait.
        """
        data = bytes(await self.stream.receive_some(RECEIVE_SIZE))
        if not data:
            self.closed = True
            if self.goaway is not None:
                raise GoAway(self.goaway)
            raise ProbeProtocolError("connection closed")
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            self.closed = True
            raise ProbeProtocolError(f"bad HTTP/2: {e}") from None
        for event in events:
            if isinstance(event, h2.events.DataReceived):
                self._h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.goaway = int(event.error_code or 0)
                last = event.last_stream_id
                covered = stream_id is not None and last is not None and stream_id <= last
                if self.goaway != h2.errors.ErrorCodes.NO_ERROR or not covered:
                    await self._flush()
                    raise GoAway(self.goaway)
        await self._flush()
        return events

    async def _flush(self) -> None:
        data = self._h2.data_to_send()
        if data:
            await self.stream.send_all(data)

    async def aclose(self) -> None:
        """Close; a TLS close_notify at most. The caller bounds it."""
        self.closed = True
        await self.stream.aclose()


def _readable(stream: trio.SSLStream[trio.SocketStream]) -> bool:
    """Something (or an EOF) is waiting on the socket: one ``poll``, as h11's ``reusable``."""
    poller = select.poll()
    try:
        poller.register(stream.transport_stream.socket.fileno(), select.POLLIN)
    except (OSError, ValueError):  # already closed
        return False
    return bool(poller.poll(0))


def _status(headers: list[tuple[bytes, bytes]]) -> int:
    for name, value in headers:
        if name == b":status":
            try:
                return int(value)
            except ValueError:
                break
    raise ProbeProtocolError("answer without a valid :status")
