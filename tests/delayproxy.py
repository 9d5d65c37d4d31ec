"""A TCP forwarder on loopback that delays every byte a fixed time each way.

It stands in for a distant apiserver (netem is not available here): with
``delay=0.02`` an apiserver behind it is a 40 ms round trip away. A local
accept completes at once, where a real connect takes one round trip, so the
client's first bytes are held one extra round trip: what the client sends
arrives as it would over a 40 ms path (a TLS handshake then takes two round
trips from the connect call, a request one).

Bounded: at most ``MAX_CHUNKS_IN_FLIGHT`` received chunks wait per direction
(the reader stops reading beyond that), and it forwards only to the target
it was given. Use it as ``await nursery.start(DelayProxy(target, 0.02).run)``.
"""

from __future__ import annotations

import functools

import attrs
import trio

CHUNK = 65536
MAX_CHUNKS_IN_FLIGHT = 64
STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


@attrs.define
class DelayProxy:
    """Forward ``host:<port>`` to ``target``, each byte ``delay`` seconds late each way."""

    target: tuple[str, int]
    delay: float
    host: str = "127.0.0.1"
    address: tuple[str, int] | None = attrs.field(init=False, default=None)
    connections_total: int = attrs.field(init=False, default=0)

    async def run(
        self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = await trio.open_tcp_listeners(0, host=self.host)
        host, port = listeners[0].socket.getsockname()[:2]
        self.address = (host, port)
        async with trio.open_nursery() as nursery:
            await nursery.start(
                functools.partial(
                    trio.serve_listeners, self._handle, listeners, handler_nursery=nursery
                )
            )
            task_status.started(self.address)

    async def _handle(self, client: trio.SocketStream) -> None:
        """One connection; its errors end it (both sides closed), nothing else."""
        accepted = trio.current_time()
        self.connections_total += 1
        try:
            upstream = await trio.open_tcp_stream(*self.target)
        except OSError:
            await trio.aclose_forcefully(client)
            return
        try:
            async with trio.open_nursery() as nursery:
                # The connect's round trip, which the local accept skipped.
                first = accepted + 2 * self.delay
                nursery.start_soon(self._pipe, client, upstream, first, nursery.cancel_scope)
                nursery.start_soon(self._pipe, upstream, client, accepted, nursery.cancel_scope)
        finally:
            await trio.aclose_forcefully(client)
            await trio.aclose_forcefully(upstream)

    async def _pipe(
        self,
        source: trio.SocketStream,
        sink: trio.SocketStream,
        not_before: float,
        connection: trio.CancelScope,
    ) -> None:
        """Copy one direction: each chunk is sent ``delay`` after it arrived; EOF too.

        An error on either side ends the whole connection, as a reset would.
        """
        send, receive = trio.open_memory_channel[tuple[float, bytes]](MAX_CHUNKS_IN_FLIGHT)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._deliver, receive, sink)
                async with send:
                    while True:
                        data = bytes(await source.receive_some(CHUNK))
                        due = max(trio.current_time(), not_before) + self.delay
                        await send.send((due, data))
                        if not data:
                            return
        except* STREAM_ERRORS:
            connection.cancel()

    async def _deliver(
        self, receive: trio.MemoryReceiveChannel[tuple[float, bytes]], sink: trio.SocketStream
    ) -> None:
        async with receive:
            async for due, data in receive:
                await trio.sleep_until(due)
                if data:
                    await sink.send_all(data)
                else:
                    await sink.send_eof()
