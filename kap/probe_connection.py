"""One kept-alive probe connection to an apiserver: TCP + TLS, then HTTP/1.1 with h11.

kap opens and speaks on its probe connections itself, not through an HTTP
client's pool, because a probe's two deadlines must bound what they measure
(``kap/probe_schedule.py``): opening the connection (TCP connect and TLS handshake) is
one step, each ``GET /readyz`` on the open connection another, and the caller
puts each under its own cancel scope. ``open_tls`` offers ``h2`` and
``http/1.1`` over ALPN (the probe's TLS context says so); when the apiserver
picks ``h2``, ``kap/probe_h2.py``'s ``Http2Connection`` (same ``get``, plus
PINGs) sits on the TLS stream instead of ``Http11Connection``.

Nothing here has a deadline of its own: the caller's cancel scope is it.
"""

from __future__ import annotations

import select
import ssl

import attrs
import h11
import trio

from kap.address import Address

# Enough of a /readyz body for an error line (kube-apiserver's verbose answer
# is a few hundred bytes); the rest of a larger body is read and dropped.
MAX_BODY = 4096
RECEIVE_SIZE = 16384
USER_AGENT = "kap-probe"
ALPN_HTTP11 = "http/1.1"


class ProbeProtocolError(Exception):
    """The apiserver's answer was not usable HTTP, or the connection ended mid-answer."""


@attrs.frozen
class Answer:
    """One HTTP answer to a probe."""

    status: int
    body: bytes  # at most MAX_BODY bytes
    latency: float  # seconds from sending the request to receiving the response headers


@attrs.define(eq=False)
class Http11Connection:
    """A TLS connection to one apiserver, one HTTP/1.1 request at a time.

    ``generation`` is the credentials' generation the TLS context had when the
    connection opened, so the owner can reopen after a rotation.
    """

    stream: trio.SSLStream[trio.SocketStream]
    host: str  # the Host header
    generation: int
    _h11: h11.Connection = attrs.field(factory=lambda: h11.Connection(h11.CLIENT), alias="_h11")

    protocol = ALPN_HTTP11

    @property
    def reusable(self) -> bool:
        """Idle and still open: no request half done, and the peer has not closed it.

        An idle connection with something to read has been closed (or told
        off) by the apiserver, e.g. after a restart: reusing it would fail a
        probe that a new connection passes. One ``poll`` of the socket, as
        httpcore does before reusing a pooled connection.
        """
        if self._h11.our_state is not h11.IDLE or self._h11.their_state is not h11.IDLE:
            return False
        poller = select.poll()
        try:
            poller.register(self.stream.transport_stream.socket.fileno(), select.POLLIN)
        except (OSError, ValueError):  # already closed
            return False
        return not poller.poll(0)

    async def get(self, target: str, headers: list[tuple[str, str]]) -> Answer:
        """Send ``GET target`` and read the whole answer.

        Raises:
          ProbeProtocolError: not HTTP, or the connection ended mid-answer.
          trio.BrokenResourceError: TLS error or reset.
        """
        conn = self._h11
        request = h11.Request(
            method="GET",
            target=target,
            headers=[("Host", self.host), ("User-Agent", USER_AGENT), ("Accept", "*/*"), *headers],
        )
        data = conn.send(request) + (conn.send(h11.EndOfMessage()) or b"")
        sent = trio.current_time()
        await self.stream.send_all(data)
        status: int | None = None
        latency = 0.0
        body = bytearray()
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(bytes(await self.stream.receive_some(RECEIVE_SIZE)))
                elif isinstance(event, h11.Response):
                    status, latency = event.status_code, trio.current_time() - sent
                elif isinstance(event, h11.Data):
                    body += event.data[: max(0, MAX_BODY - len(body))]
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise ProbeProtocolError("connection closed before the answer")
                # h11.InformationalResponse (1xx): the real answer follows.
        except h11.RemoteProtocolError as e:
            raise ProbeProtocolError(f"bad HTTP answer: {e}") from None
        assert status is not None  # h11 gives a Response before EndOfMessage
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        return Answer(status=status, body=bytes(body), latency=latency)

    async def aclose(self) -> None:
        """Close; a TLS close_notify at most. The caller bounds it."""
        await self.stream.aclose()


async def open_tls(
    address: Address, context: ssl.SSLContext, server_name: str
) -> trio.SSLStream[trio.SocketStream]:
    """TCP connect and TLS handshake to ``address``.

    The certificate is checked against ``server_name`` (sent as SNI) when
    given, else against the address itself, as the context says
    (``check_hostname``). ``selected_alpn_protocol()`` of the stream says
    which protocol the apiserver picked.

    Raises:
      OSError: the connect failed (refused, unreachable, no such name).
      trio.BrokenResourceError: the handshake failed (its cause is the
        ``ssl.SSLError``, e.g. a certificate that does not verify).
    """
    tcp = await trio.open_tcp_stream(address.host, address.port)
    tls = trio.SSLStream(
        tcp, context, server_hostname=server_name or address.host, https_compatible=True
    )
    try:
        await tls.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(tcp)
        raise
    return tls
